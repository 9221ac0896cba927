"""How many KV blocks a replica holds: GPU memory minus weights, activation workspace and runtime reserve."""

from __future__ import annotations

import math
from dataclasses import dataclass

from llmsim.errors import PlanError
from llmsim.execution.model import ParallelPlan
from llmsim.execution.ops import ShardShapes
from llmsim.hardware.profile import HardwareProfile
from llmsim.models.spec import ModelSpec

GIB = 2**30


@dataclass(frozen=True)
class MemoryPlan:
    weights_bytes: float  # per GPU, the most loaded pipeline stage
    activation_bytes: float  # per GPU, peak workspace of one forward pass
    reserve_bytes: float  # CUDA context, communicator buffers, allocator slack
    kv_bytes_per_block: float  # per GPU
    num_blocks: int  # KV blocks per replica (every GPU holds its shard of each block)


def plan_memory(model: ModelSpec, hardware: HardwareProfile, plan: ParallelPlan, *, block_size: int,
                gpu_memory_utilization: float, max_num_batched_tokens: int, max_num_seqs: int,
                runtime_reserve_gib: float, max_model_len: int) -> MemoryPlan:
    s = ShardShapes.of(model, plan.tp)
    w, d = model.dtype_bytes, model.act_bytes  # weights; activations (and the unquantised embedding, LM head)
    layers = math.ceil(model.num_layers / plan.pp)
    embed_params = model.vocab_size * model.hidden_size / plan.tp
    # With one stage, the GPU holds both embedding and LM head; with several, each end stage holds one.
    weights = (layers * model.params_per_layer / plan.tp * w
               + (embed_params * (2 if plan.pp == 1 else 1) + model.hidden_size) * d)  # + final norm
    routed = max_num_batched_tokens * model.experts_per_token
    # Live tensors at the widest point of a layer (residual, normed input, QKV, MLP intermediate),
    # plus fp32 logits for every sequence that samples.
    activations = (max_num_batched_tokens * (3 * s.hidden + s.q + 2 * s.kv) + routed * 3 * s.ffn) * d
    activations += max_num_seqs * s.vocab * 4
    reserve = runtime_reserve_gib * GIB
    kv_per_block = 2 * layers * s.kv * model.kv_dtype_bytes * block_size
    free = hardware.memory_bytes * gpu_memory_utilization - weights - activations - reserve
    num_blocks = int(free // kv_per_block) if free > 0 else 0
    needed = math.ceil(max_model_len / block_size)
    if num_blocks < needed:
        raise PlanError(
            f"{model.name} does not fit on {hardware.name} with TP={plan.tp}, PP={plan.pp}: per GPU "
            f"{hardware.memory_bytes * gpu_memory_utilization / GIB:.1f} GiB usable, weights {weights / GIB:.1f} GiB, "
            f"activations {activations / GIB:.1f} GiB, reserve {reserve / GIB:.1f} GiB, leaving room for "
            f"{num_blocks} KV blocks but one {max_model_len}-token sequence needs {needed}. "
            "Raise tp/pp, use a larger device or lower max_model_len / max_num_batched_tokens."
        )
    return MemoryPlan(weights, activations, reserve, kv_per_block, num_blocks)
