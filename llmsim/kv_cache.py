"""Paged KV cache block manager (mechanism only; schedulers decide *who* gets blocks).

Blocks are interchangeable, so the manager tracks how many each request holds rather than block ids:
``num_free_blocks + sum(held) == num_blocks`` is the conservation law ``check_integrity`` asserts.
"""

from __future__ import annotations

from llmsim.request import Request


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, watermark_blocks: int = 0):
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Admission keeps this many blocks free so running requests can keep decoding (vLLM's watermark).
        self.watermark_blocks = watermark_blocks
        self.num_free_blocks = num_blocks
        self._held: dict[int, int] = {}  # request id -> blocks held

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_held(self, request: Request) -> int:
        return self._held.get(request.id, 0)

    def num_new_blocks(self, request: Request, num_new_tokens: int) -> int:
        """Blocks to add so the request can hold ``num_computed_tokens + num_new_tokens`` tokens of KV."""
        need = self.blocks_for(request.num_computed_tokens + num_new_tokens) - self._held.get(request.id, 0)
        return need if need > 0 else 0

    def can_admit(self, request: Request, num_new_tokens: int) -> bool:
        """Room to start (or resume) a request, keeping the watermark free for running ones."""
        return self.num_new_blocks(request, num_new_tokens) + self.watermark_blocks <= self.num_free_blocks

    def can_allocate(self, request: Request, num_new_tokens: int) -> bool:
        return self.num_new_blocks(request, num_new_tokens) <= self.num_free_blocks

    def allocate(self, request: Request, num_new_tokens: int) -> None:
        need = self.num_new_blocks(request, num_new_tokens)
        if need > self.num_free_blocks:
            raise RuntimeError(f"request {request.id} needs {need} blocks, {self.num_free_blocks} free")
        if need:
            self._held[request.id] = self._held.get(request.id, 0) + need
            self.num_free_blocks -= need

    def append_slot(self, request: Request) -> None:
        """Room for one more token of a request whose blocks exactly hold its computed tokens."""
        if request.num_computed_tokens % self.block_size == 0:
            if self.num_free_blocks == 0:
                raise RuntimeError(f"request {request.id} needs a block, none free")
            self._held[request.id] = self._held.get(request.id, 0) + 1
            self.num_free_blocks -= 1

    def grow_to(self, request_id: int, num_blocks: int) -> None:
        """Bring a request's holding up to ``num_blocks`` (bulk decode bookkeeping)."""
        need = num_blocks - self._held.get(request_id, 0)
        if need > self.num_free_blocks:
            raise RuntimeError(f"request {request_id} needs {need} blocks, {self.num_free_blocks} free")
        if need > 0:
            self._held[request_id] = num_blocks
            self.num_free_blocks -= need

    def free(self, request: Request) -> int:
        """Release every block of the request; returns how many."""
        n = self._held.pop(request.id, 0)
        self.num_free_blocks += n
        return n

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def check_integrity(self) -> None:
        held = sum(self._held.values())
        assert all(v > 0 for v in self._held.values()), "a request holds a non-positive number of blocks"
        assert 0 <= self.num_free_blocks <= self.num_blocks, "free block count out of range"
        assert held + self.num_free_blocks == self.num_blocks, (
            f"KV blocks not conserved: {held} held + {self.num_free_blocks} free != {self.num_blocks}")
