"""vLLM's fused-MoE Triton kernel compiling while it serves.

Triton compiles a kernel once per set of compile-time constants and per specialisation of its integer arguments
(an int divisible by 16 gets its own build). vLLM's fused MoE (``fused_moe_kernel``, two launches a layer: the
gate-and-up and the down projection) takes its tile configuration from the step's token count M -- the nearest
batch size in the tuned file for the shape and GPU, or the default configuration's tiles -- and two of its ints
vary with M: ``num_valid_tokens`` = M x top-k and ``EM``, the expert-sorted token slots (M x top-k plus
experts x (BLOCK_SIZE_M - 1), a multiple of 16 exactly when M x top-k - experts is, or M x top-k <= experts).
So a variant is (configuration, the two divisibilities).

At start-up vLLM compiles what its profiling run (M = ``max_num_batched_tokens``) and CUDA-graph capture (M =
each captured batch size, ``capture_sizes``: V1's, or v0's decode-only ones) reach. Later a step pads to a captured size where it fits one (vLLM
V1 pads every step that fits; vLLM v0 only decodes), else runs at its own M; a variant not built yet is built
then, two kernels, and the step waits. ``benchmarks/bench_moe_jit.py`` replayed that start-up and every M up to
2,048 on an H100 with a fresh Triton cache for Mixtral-8x7B's TP 2 shard: exactly the variants this module
names compiled (20 kernels at start-up, 26 for steps of 257-2,048 tokens), 1.03-1.29 s a variant
(``hardware_profiles/measurements/llmsim-moe-jit-h100.csv``). The build time is the engine's
(``scheduler.fused_moe_build_s``): the host's CPU compiles, whatever the GPU.
"""

from __future__ import annotations

from bisect import bisect_left

from llmsim.execution.ops import vllm_default_moe_block_m

# The batch sizes vLLM's MoE tuning script tunes (``benchmarks/kernels/benchmark_moe.py``), the keys of its tuned
# files: a step takes the configuration of the nearest one (ties to the smaller). Each is taken as its own
# configuration; tuned files repeat a configuration under a few small keys, which graph capture builds anyway.
TUNED_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024, 1536, 2048, 3072, 4096)
KERNELS_PER_VARIANT = 2  # the gate-and-up and the down projection launch the kernel with other constants


def capture_sizes(max_num_seqs: int, max_num_batched_tokens: int, v1: bool = True) -> list[int]:
    """vLLM's default CUDA-graph batch sizes. V1 (``VllmConfig._set_cudagraph_sizes``): 1, 2, 4, every 8 to 256,
    every 16 beyond, up to min(2 x max_num_seqs, 512, max_num_batched_tokens). v0 (``_BATCH_SIZES_TO_CAPTURE``,
    decode batches only): 1, 2, 4, every 8 up to max_num_seqs rounded up to 8, at most 256."""
    if not v1:
        top = min(256, -(-max_num_seqs // 8) * 8)
        return [s for s in (1, 2, 4, *range(8, 257, 8)) if s <= top]
    top = min(2 * max_num_seqs, 512, max_num_batched_tokens)
    return [s for s in (1, 2, 4, *range(8, 256, 8), *range(256, top + 1, 16)) if s <= top]


def variant(num_tokens: int, num_experts: int, top_k: int, tuned: bool) -> tuple[int, bool, bool]:
    """The compiled kernel a fused MoE over ``num_tokens`` runs: (its configuration -- the tuned batch size
    vLLM picks, or the default configuration's BLOCK_SIZE_M --, M x top-k divisible by 16, EM divisible by 16)."""
    if tuned:
        config = min(TUNED_BATCH_SIZES, key=lambda size: abs(size - num_tokens))
    else:
        config = vllm_default_moe_block_m(num_tokens, num_experts)
    routed = num_tokens * top_k
    return config, routed % 16 == 0, routed <= num_experts or (routed - num_experts) % 16 == 0


class FusedMoeCompiles:
    """The fused-MoE variants one engine has built, from its start-up on. ``stall_s(num_tokens, pure_decode)``:
    the seconds a step waits for the variants it needs (0 once built)."""

    def __init__(self, num_experts: int, top_k: int, tuned: bool, build_s: float, max_num_seqs: int,
                 max_num_batched_tokens: int, pads_every_step: bool):
        self.num_experts, self.top_k, self.tuned = num_experts, top_k, tuned
        self.variant_s = KERNELS_PER_VARIANT * build_s
        self.sizes = capture_sizes(max_num_seqs, max_num_batched_tokens, v1=pads_every_step)
        self.pads_every_step = pads_every_step
        self.built = {self._variant(m) for m in (max_num_batched_tokens, *self.sizes)}
        self.num_built_serving = 0

    def _variant(self, num_tokens: int) -> tuple[int, bool, bool]:
        return variant(num_tokens, self.num_experts, self.top_k, self.tuned)

    def runs_at(self, num_tokens: int, pure_decode: bool) -> int:
        """The M the kernel runs at: the captured size the step pads to, or its own."""
        sizes = self.sizes
        if num_tokens <= sizes[-1] and (pure_decode or self.pads_every_step):
            return sizes[bisect_left(sizes, num_tokens)]
        return num_tokens

    def is_built(self, num_tokens: int, pure_decode: bool) -> bool:
        return self._variant(self.runs_at(num_tokens, pure_decode)) in self.built

    def stall_s(self, num_tokens: int, pure_decode: bool) -> float:
        v = self._variant(self.runs_at(num_tokens, pure_decode))
        if v in self.built:
            return 0.0
        self.built.add(v)
        self.num_built_serving += 1
        return self.variant_s
