"""How many KV blocks a replica holds: GPU memory minus weights, activation workspace and runtime reserve."""

from __future__ import annotations

import math
from dataclasses import dataclass

from llmsim.errors import PlanError
from llmsim.execution.model import ParallelPlan, pipeline_layers
from llmsim.execution.ops import ShardShapes
from llmsim.hardware.profile import HardwareProfile
from llmsim.models.spec import ModelSpec

GIB = 2**30


@dataclass(frozen=True)
class MemoryPlan:
    weights_bytes: float  # per GPU, on the pipeline stage with room for the fewest KV blocks
    activation_bytes: float  # per GPU, peak workspace of one forward pass (on that stage)
    reserve_bytes: float  # CUDA context, communicator buffers, allocator slack
    kv_bytes_per_block: float  # per GPU (on that stage)
    num_blocks: int  # KV blocks per replica (every GPU holds its shard of each block)
    largest_kv_bytes_per_block: float = 0.0  # per GPU, on the stage with the most layers' KV

    def swap_space_blocks(self, swap_space_gib: float) -> int:
        """Blocks of swapped-out KV the host holds: vLLM gives every worker ``swap_space_gib`` and takes the
        fewest blocks any worker has room for (``num_cpu_blocks``)."""
        return int(swap_space_gib * GIB // (self.largest_kv_bytes_per_block or self.kv_bytes_per_block))


def plan_memory(model: ModelSpec, hardware: HardwareProfile, plan: ParallelPlan, *, block_size: int,
                gpu_memory_utilization: float, max_num_batched_tokens: int, max_num_seqs: int,
                runtime_reserve_gib: float, max_model_len: int) -> MemoryPlan:
    """Every GPU of a stage holds the same; the KV block count is the smallest any stage has room for (vLLM
    profiles each worker and takes the minimum). Stages hold the layers vLLM gives them (``pipeline_layers``);
    the first also holds the embedding, the last the final norm, the LM head and the logits."""
    s = ShardShapes.of(model, plan.tp)
    w, d = model.dtype_bytes, model.act_bytes  # weights; activations (and the unquantised embedding, LM head)
    embed_params = model.vocab_size * model.hidden_size / plan.tp
    routed = max_num_batched_tokens * model.experts_per_token
    # Live tensors at the widest point of a layer (residual, normed input, QKV, MLP intermediate) ...
    mlp_live = routed * 3 * s.ffn
    if s.shared_ffn:  # shared experts run beside the routed ones
        mlp_live += max_num_batched_tokens * 3 * s.shared_ffn
    if model.num_dense_layers:  # the dense layers' MLP, where it is the wider
        mlp_live = max(mlp_live, max_num_batched_tokens * 3 * (model.dense_ffn_size // plan.tp))
    layer_activations = (max_num_batched_tokens * (3 * s.hidden + s.q + 2 * s.kv) + mlp_live) * d
    logits = max_num_seqs * s.vocab * 4  # ... plus fp32 logits for every sequence that samples (on the last stage)
    reserve = runtime_reserve_gib * GIB
    usable = hardware.memory_bytes * gpu_memory_utilization
    stages = []  # (weights, activations, KV bytes per block, blocks) per stage
    first_layer = 0
    for k, layers in enumerate(pipeline_layers(model.num_layers, plan.pp, plan.layer_partition)):
        first, last = k == 0, k == plan.pp - 1
        # The embedding on the first stage, the LM head and the final norm on the last (both where one stage; one
        # matrix for both where they are tied, as a stage holding both ties them).
        tables = (1 if first else 0) + (1 if last else 0)
        if tables == 2 and model.tied_embeddings:
            tables = 1
        head = embed_params * tables + (model.hidden_size if last else 0)
        weights = model.layer_params(first_layer, layers) / plan.tp * w + head * d
        first_layer += layers
        activations = layer_activations + (logits if last else 0)
        kv_per_block = 2 * layers * s.kv * model.kv_dtype_bytes * block_size
        free = usable - weights - activations - reserve
        stages.append((weights, activations, kv_per_block, int(free // kv_per_block) if free > 0 else 0))
    weights, activations, kv_per_block, num_blocks = min(stages, key=lambda stage: stage[3])
    needed = math.ceil(max_model_len / block_size)
    if num_blocks < needed:
        raise PlanError(
            f"{model.name} does not fit on {hardware.name} with TP={plan.tp}, PP={plan.pp}: per GPU "
            f"{usable / GIB:.1f} GiB usable, weights {weights / GIB:.1f} GiB, "
            f"activations {activations / GIB:.1f} GiB, reserve {reserve / GIB:.1f} GiB, leaving room for "
            f"{num_blocks} KV blocks but one {max_model_len}-token sequence needs {needed}. "
            "Raise tp/pp, use a larger device or lower max_model_len / max_num_batched_tokens."
        )
    return MemoryPlan(weights, activations, reserve, kv_per_block, num_blocks, max(stage[2] for stage in stages))
