"""Settings an experiment spells out that have no effect on it: the section of a cluster policy it does not run, a
field of another scheduler, a pipeline setting without a pipeline. Such a config is valid (a sweep's base may set
sarathi's chunk size for its fcfs points too), but a user who set ``chunk_size`` on the default ``vllm_v1``
scheduler believing it applied would read results of a setting that never ran: ``llmsim run`` and ``llmsim check``
name each one. Only what the config gives counts, never a default; nor does a results folder's ``config.yaml``
(which records every field).
"""

from __future__ import annotations

from llmsim.config import ExperimentConfig
from llmsim.models.spec import ModelSpec


def unused_settings(cfg: ExperimentConfig, num_experts: int) -> list[str]:
    """What ``cfg`` sets to no effect, a line each; ``num_experts``: the model's (1 for a dense model)."""
    if cfg.llmsim_version is not None:  # read back from a results folder: every field is written out there
        return []
    notes = []
    cluster, scheduler = cfg.cluster, cfg.scheduler
    given = cluster.model_fields_set
    for section in ("distserve", "llumnix"):
        if section in given and cluster.policy != section:
            notes.append(f"cluster.{section} has no effect: cluster.policy is {cluster.policy}")
    if cluster.policy == "llumnix":
        for name in ("router", "prefix_aware"):
            if name in given:
                notes.append(f"cluster.{name} has no effect: cluster.policy llumnix dispatches by its instances' load")
    elif "prefix_aware" in given and cluster.router != "prefix_aware":
        notes.append(f"cluster.prefix_aware has no effect: cluster.router is {cluster.router}")
    if cluster.policy == "distserve":
        if "num_replicas" in given:
            notes.append("cluster.num_replicas has no effect: cluster.policy distserve runs the replicas of "
                         "cluster.distserve.prefill and .decode")
        for name in ("tp", "pp", "micro_batches", "pp_layer_partition"):
            if name in cfg.parallel.model_fields_set:
                notes.append(f"parallel.{name} has no effect: cluster.policy distserve runs the plans of "
                             "cluster.distserve.prefill and .decode")
    elif "micro_batches" in cfg.parallel.model_fields_set and cfg.parallel.pp == 1:
        notes.append("parallel.micro_batches has no effect: parallel.pp is 1 (no pipeline)")
    set_fields = scheduler.model_fields_set
    if "chunk_size" in set_fields and scheduler.name != "sarathi":
        notes.append(f"scheduler.chunk_size has no effect: it is sarathi's step budget; {scheduler.name} steps "
                     "take up to scheduler.max_num_batched_tokens")
    if "long_prefill_token_threshold" in set_fields and scheduler.name != "vllm_v1":
        notes.append(f"scheduler.long_prefill_token_threshold has no effect: it is vllm_v1's, the scheduler is "
                     f"{scheduler.name}")
    if "swap_space_gib" in set_fields and scheduler.preemption != "swap":
        notes.append(f"scheduler.swap_space_gib has no effect: scheduler.preemption is {scheduler.preemption}")
    if num_experts == 1:
        for name in ("triton_cache", "fused_moe_build_s"):
            if name in set_fields:
                notes.append(f"scheduler.{name} has no effect: {cfg.model.name} is a dense model (fused-MoE kernels "
                             "only)")
    return notes


def model_notes(model: ModelSpec) -> list[str]:
    """What the model has that the simulator prices otherwise, a line each (a config.json can say more than the
    cost model reads)."""
    if not model.num_sliding_layers:
        return []
    return [f"model {model.name}: sliding-window attention ({model.sliding_window} tokens, on "
            f"{model.num_sliding_layers} of {model.num_layers} layers) is priced as full attention and its KV cache as "
            "every layer's: past the window, attention time and KV memory come out above what vLLM spends"]
