"""Power and energy of a replica's GPUs, from each iteration's compute and memory utilisation.

During an iteration every GPU of the replica draws ``min(max_w, idle_w + per_mfu_w * MFU + per_mbu_w * MBU)``,
where MFU and MBU are that iteration's achieved FLOP rate and memory traffic over the replica's peak; between
iterations it draws ``idle_w``. The two slopes are not free constants: they are solved so that this simulator's
own model of Splitwise's measurement setup (Llama-2-70B on 8 GPUs, TP 8) reproduces the two operating points
Splitwise measured -- a 2,048-token prefill draws ``max_w`` and a decode of 16 requests at 1,024 tokens of
context draws ``decode_w`` (Patel et al., "Splitwise", ISCA 2024: A100 400 W / ~250 W, H100 700 W / ~380 W).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llmsim.hardware.profile import HardwareProfile

# Where a profile publishes no decode power: decode draws this share of the idle-to-max range, the mean of
# Splitwise's A100 ((250 - 63) / (400 - 63) = 0.55) and H100 ((380 - 75) / (700 - 75) = 0.49) measurements.
DECODE_SHARE_OF_RANGE = 0.52


@dataclass(frozen=True)
class PowerModel:
    idle_w: float
    max_w: float
    # Watts per FLOP/s and per byte/s of the whole replica: ``per_mfu_w * MFU = w_per_flop_s * flops / duration``.
    w_per_flop_s: float
    w_per_byte_s: float
    num_gpus: int

    def power_w(self, duration_s, flops, num_bytes) -> np.ndarray:
        """Per-GPU draw during iterations of the replica (``flops``/``num_bytes`` summed over its GPUs): numbers or
        arrays of them, elementwise (numpy's float arithmetic rounds as Python's does; the recorder works out a
        run's power from its iteration rows at once)."""
        duration_s = np.asarray(duration_s, dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            w = self.idle_w + (self.w_per_flop_s * np.asarray(flops, dtype=float)
                               + self.w_per_byte_s * np.asarray(num_bytes, dtype=float)) / duration_s
        return np.where(duration_s <= 0.0, self.idle_w, np.where(w < self.max_w, w, self.max_w))


def _operating_points(profile: HardwareProfile) -> tuple[tuple[float, float], tuple[float, float]]:
    """(MFU, MBU) of Splitwise's prefill and decode points under this profile's execution model."""
    from llmsim.execution.model import ExecutionModel, ParallelPlan
    from llmsim.models.spec import load_model

    dtype = next((d for d in ("fp16", "bf16", "fp32") if d in profile.peak_flops), next(iter(profile.peak_flops)))
    ex = ExecutionModel(load_model("Llama-2-70B", dtype), profile, ParallelPlan(tp=8))
    gpus, peak, bw = 8, ex.peak_flops, ex.bandwidth
    prefill = ex.iteration(((2048, 0),), 0, 0, 1)
    decode = ex.decode_iteration(16, 16 * 1024)
    return tuple((c.flops / (peak * gpus * c.time_s), c.num_bytes / (bw * gpus * c.time_s))  # type: ignore
                 for c in (prefill, decode))


def power_model(profile: HardwareProfile, peak_flops: float, bandwidth: float, num_gpus: int) -> PowerModel:
    p = profile.power
    decode_w = p.decode_w if p.decode_w is not None else p.idle_w + DECODE_SHARE_OF_RANGE * (p.max_w - p.idle_w)
    (mfu_p, mbu_p), (mfu_d, mbu_d) = _operating_points(profile)
    a = np.array([[mfu_p, mbu_p], [mfu_d, mbu_d]])
    b = np.array([p.max_w - p.idle_w, decode_w - p.idle_w])
    per_mfu, per_mbu = (float(v) for v in np.linalg.solve(a, b))
    if per_mfu < 0 or per_mbu < 0:  # operating points that cannot both hold: compute sets prefill, memory decode
        per_mfu, per_mbu = (p.max_w - p.idle_w) / mfu_p, (decode_w - p.idle_w) / mbu_d
    return PowerModel(p.idle_w, p.max_w, per_mfu / (peak_flops * num_gpus), per_mbu / (bandwidth * num_gpus),
                      num_gpus)
