"""Hardware profiles: datasheet numbers with sources, plus fitted efficiency curves.

Profiles live in ``hardware_profiles/<name>.yaml`` at the repository root (or any path a config names).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import ConfigDict, Field, ValidationError, model_validator

from llmsim.bool_numbers import NumbersNotBools
from llmsim.errors import ConfigError, validation_error_loc
from llmsim.yaml_text import load_yaml_text

PROFILES_DIR = Path(__file__).resolve().parents[2] / "hardware_profiles"


class _Frozen(NumbersNotBools):
    # A profile's numbers are rates, times and fitted shapes: an infinite or NaN one is a typo, which the cost
    # models would turn into a division by zero or NaN step times far from the file.
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


GEMM_TILE = 128  # output tile edge of the GEMM kernels cuBLAS / CUTLASS run on A100 and H100 (128 x 128)


class ComputeEfficiency(_Frozen):
    """Achieved / peak FLOP rate as a function of the token (GEMM M) dimension:
    ``eff(M) = max_eff * M / (M + half_tokens)`` -- small batches under-fill the tensor cores.

    A GEMM [M, K] x [K, N] also has shape terms (each 1 when its ``half_*`` is 0, or for ops that are no GEMM):
    ``K / (K + half_k)``: each output tile pays a fixed set-up and epilogue, worth ``half_k`` reduction steps;
    ``N / (N + half_n)``: work per input row that a wide output amortises (an FP8 GEMM's input quantization has a
    term of its own, ``OpEfficiency.quant_memory_eff``);
    ``T / (T + half_tiles)``, ``T = M N / 128^2`` output tiles: too few tiles leave streaming multiprocessors idle."""

    max_eff: float = Field(gt=0, le=1)
    half_tokens: float = Field(ge=0)
    half_k: float = Field(default=0.0, ge=0)
    half_n: float = Field(default=0.0, ge=0)
    half_tiles: float = Field(default=0.0, ge=0)

    def at(self, num_tokens: float) -> float:
        return self.max_eff * num_tokens / (num_tokens + self.half_tokens)

    def at_shape(self, num_tokens: float, gemm_k: int, gemm_n: int) -> float:
        """Efficiency of a GEMM of ``num_tokens`` x ``gemm_k`` x ``gemm_n`` (``gemm_k`` 0: not a GEMM)."""
        eff = self.max_eff * num_tokens / (num_tokens + self.half_tokens)
        if gemm_k:
            tiles = num_tokens * gemm_n / (GEMM_TILE * GEMM_TILE)
            eff *= (gemm_k / (gemm_k + self.half_k) * gemm_n / (gemm_n + self.half_n)
                    * tiles / (tiles + self.half_tiles))
        return eff


class OpEfficiency(_Frozen):
    """Efficiency of one kind of operator: compute curve, memory-bandwidth fraction, fixed overhead."""

    compute: ComputeEfficiency
    memory_eff: float = Field(gt=0, le=1)
    overhead_s: float = Field(ge=0)  # kernel launch + tail, per kernel
    # GEMMs: time per element of K that one thread block walks in sequence (the reduction's latency, which
    # shows when few blocks run: a decode GEMV)
    k_latency_s: float = Field(default=0.0, ge=0)
    # GEMMs: split-K. With fewer output tiles than SMs the library splits K across thread blocks, which shortens
    # the serial reduction: ``k_latency_s * K / splits``, ``splits = clip(min(num_sms / tiles, K / split_k_min_k),
    # 1)`` (continuous: the library's integer choice varies by shape). None: never split.
    split_k_min_k: float | None = Field(default=None, gt=0)
    # How compute and memory time combine: ``(c^p + m^p)^(1/p)`` (they overlap imperfectly); None: ``max``.
    softness: float | None = Field(default=None, ge=1)
    # vLLM's fused MoE (a Triton kernel): the time factor where an expert's width on the GPU is not a multiple of
    # 16 (``moe_width_unaligned``). Triton specializes a kernel's integer arguments on divisibility by 16, which lets
    # it vectorise loads; the down GEMM's K and the strides of the intermediate rows are that width, so without it
    # every tile loads narrower. Fitted where the measurements have such widths; None: none (no factor).
    unaligned_factor: float | None = Field(default=None, ge=1)
    # FP8 GEMMs: the fraction of memory bandwidth at which the quantization of the 16-bit input streams its bytes
    # (a kernel of its own before the GEMM; ``ops.ACTIVATION_QUANT_BYTES`` per input element in a served engine).
    # None: the curve has no such term (the quantization, if any, is in its fitted shape terms).
    quant_memory_eff: float | None = Field(default=None, gt=0, le=1)


class LinkModel(_Frozen):
    """Alpha-beta model of a collective: ``latency_s + algorithm_bytes / bus_bandwidth``.

    ``peer_latency_s``, per peer: in vLLM's custom all-reduce each round's barrier writes a flag to every peer and
    waits for every peer's, so a round costs ``latency_s + peer_latency_s * (GPUs - 1)``; NCCL's ring all-reduce
    takes ``2 (GPUs - 1)`` steps of ``peer_latency_s`` each after ``latency_s``
    (``roofline.ring_all_reduce_latency_s``), its ring all-gather ``GPUs - 1`` (``ring_all_gather_latency_s``)."""

    latency_s: float = Field(ge=0)
    bandwidth_bytes_per_s: float = Field(gt=0)
    peer_latency_s: float = Field(default=0.0, ge=0)


class PrefillAttentionFit(_Frozen):
    """vLLM's flash-attention prefill kernel, fitted on measured latencies (``hardware/attention.py``)::

        time    = overhead + (compute^p + memory^p)^(1/p)
        compute = (bulk^q + path^q)^(1/q)
        bulk    = (tiles * tile_s + units * unit_s) / num_sms      every SM busy
        path    = tile_s + max_units * unit_s                       the longest tile, alone on its SM
        unit_s  = 4 * block_m * block_n * head_dim / (peak / num_sms * max_eff)
        memory  = (cold + hot / l2) / (bandwidth * memory_eff * H / (H + half_heads))
        l2      = 1 + (l2_speedup - 1) / (1 + exp((ln(bytes) - ln(l2_fraction * L2)) / 0.2))

    The kernel's grid: query tiles of ``block_m`` rows, each walking the keys it may see (causal, after any cached
    prefix) in blocks of ``block_n``; a *unit* is one tile times one KV block (the tile's inner loop). ``tiles`` and
    ``units`` are summed over the batch, ``max_units`` is the longest tile's (``execution/ops.py``,
    ``prefill_attention_grid``). ``pack_gqa``: a tile's rows are (token, query head) pairs of one KV head's group,
    as FlashAttention 3 lays out varlen batches; without it every query head has its own tiles, as FlashAttention
    2 does except for single-token queries, whose GQA groups it packs. ``tile_s``: a tile's own cost (loading its
    queries, writing its output); ``H``: query heads on the GPU (the fitted memory traffic runs slower with few:
    layouts of 1-4 heads move their bytes at a third to two thirds of the rate of 32-64); ``p`` (``softness``):
    how much compute and memory traffic overlap. ``block_m``, ``block_n`` and ``pack_gqa`` are the kernel's, set by
    hand with their source, and ``num_sms`` the profile's; the rest is fitted. ``one_wg_block_m``,
    ``one_wg_block_n``: the tiles FlashAttention 3 switches to for short queries (``hardware.attention.prefill_tiles``),
    which then take ``block_m``'s and ``block_n``'s place in the grid and in ``unit_s``. ``swapped_copy_s``: without
    ``pack_gqa``, a batch of single-token queries goes FlashAttention 2's packed path, whose q and output copies
    cost what they cost a decode (``DecodeAttentionFit.swapped_copy_s``; fitted on these rows, None: no copies).
    ``l2_speedup``, ``l2_fraction``: a batch whose bytes fit in the L2 cache (``L2``, the profile's
    ``l2_cache_bytes``; about half of it, where the queries, keys and values the step's earlier kernels just wrote
    are still there) moves them that much faster: measured on H100 and A100 alike, the kernels jump by about 1.8x
    between batches that fit and those that do not, at the same FLOPs (``l2_fraction`` None: no such term).
    ``hot``: the bytes of the step's new tokens; ``cold``: a cached prefix's KV, written steps before and read
    from HBM."""

    overhead_s: float = Field(ge=0)
    tile_s: float = Field(ge=0)
    max_eff: float = Field(gt=0, le=1)
    path_softness: float = Field(ge=1)
    memory_eff: float = Field(gt=0, le=1)
    half_heads: float = Field(ge=0)
    softness: float = Field(ge=1)
    block_m: int = Field(ge=1)
    block_n: int = Field(ge=1)
    pack_gqa: bool
    # FlashAttention 3's tiles for a batch whose longest query, times the query heads per KV head, is at most 64
    # rows (``use_one_mma_wg``: one MMA warpgroup, a 64-row tile); None: the kernel has no such tiles.
    one_wg_block_m: int | None = Field(default=None, ge=1)
    one_wg_block_n: int | None = Field(default=None, ge=1)
    swapped_copy_s: float | None = Field(default=None, ge=0)
    l2_speedup: float = Field(default=1.0, ge=1)
    l2_fraction: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _one_wg_tiles_whole(self):
        if (self.one_wg_block_m is None) != (self.one_wg_block_n is None):
            raise ValueError("one_wg_block_m and one_wg_block_n come together (the short-query tiles' rows and "
                             "keys), or neither")
        return self


class DecodeAttentionFit(_Frozen):
    """vLLM's paged decode attention, fitted on measured latencies (``hardware/attention.py``)::

        time = overhead + (stream^p + memory^p)^(1/p)
        stream = batch * kv_heads * per_stream_s      (per sequence and KV head: block table, query, softmax)
        memory = KV bytes / (bandwidth * memory_eff * n / (n + half_streams)),  n = kv_heads * max(batch, splits)
        splits = min(min_splits, KV tokens per sequence / split_keys)

    ``n`` counts the parallel KV streams: a small batch is split along the KV length (split-KV), which the
    measurements show levels off at about ``min_splits`` streams per KV head; and a split needs ``split_keys``
    keys or so of its own (FlashAttention's ``num_splits_heuristic`` never splits fewer than 5 KV blocks and
    never into more splits than blocks), so short histories split less (``split_keys`` None: no such cap).

    ``gqa_only_split_kv``: the kernel splits the KV only for GQA decodes (FlashAttention 2, vLLM's kernel on
    A100: ``mha_varlen_fwd`` applies split-KV only when it packs a GQA group into the query rows,
    ``seqlenq_ngroups_swapped``). An MHA decode (as many KV heads as query heads) then runs one CTA per
    (sequence, head) over its whole KV, ``n = kv_heads * batch``, and skips the packing and the split-combine
    step, so its fixed cost is its own, ``mha_overhead_s``. FlashAttention 3 (H100) splits both.

    ``swapped_copy_s``: that packing is a reshape on the host side of the kernel (``flash_api.cpp``: q becomes
    [batch x group, kv_heads, head_dim] and the output goes back after the kernel), which is a view only when the
    batch or the KV heads are 1; otherwise both tensors are copied, two more kernels per layer. A GQA decode of 2+
    sequences over 2+ KV heads per GPU then pays ``swapped_copy_s`` plus the copies' bytes (q and the output, each
    read and written, at the activations' width) at HBM bandwidth (``hardware/attention.swap_copy_s``).
    Only pure-decode steps take this path (``max_seqlen_q == 1``)."""

    overhead_s: float = Field(ge=0)
    per_stream_s: float = Field(ge=0)
    memory_eff: float = Field(gt=0, le=1)
    half_streams: float = Field(ge=0)
    min_splits: float = Field(ge=1)
    softness: float = Field(ge=1)
    gqa_only_split_kv: bool = False
    mha_overhead_s: float | None = Field(default=None, ge=0)  # with gqa_only_split_kv (None: overhead_s)
    swapped_copy_s: float | None = Field(default=None, ge=0)  # with gqa_only_split_kv (None: no copies)
    split_keys: float | None = Field(default=None, gt=0)


class Interconnect(_Frozen):
    name: str
    bandwidth_bytes_per_s: float = Field(gt=0)  # one direction, per GPU
    latency_s: float = Field(ge=0)


class Power(_Frozen):
    idle_w: float = Field(ge=0)
    max_w: float = Field(gt=0)
    decode_w: float | None = None  # typical draw in memory-bound decode, where published

    @model_validator(mode="after")
    def _ordered(self) -> "Power":
        if self.idle_w > self.max_w or not (self.decode_w is None or self.idle_w <= self.decode_w <= self.max_w):
            raise ValueError(f"expected idle_w <= decode_w <= max_w, got {self.idle_w}, {self.decode_w}, "
                             f"{self.max_w}")
        return self


class HardwareProfile(_Frozen):
    name: str
    description: str
    calibrated: bool  # False: efficiencies are documented assumptions, not fits
    peak_flops: dict[str, Annotated[float, Field(gt=0)]]  # dense, per dtype
    memory_bytes: float = Field(gt=0)
    memory_bandwidth_bytes_per_s: float = Field(gt=0)
    gpus_per_node: int = Field(default=8, ge=1)
    # Streaming multiprocessors (compute units): the thread blocks a kernel runs at once. The GEMM split-K and the
    # prefill-attention grid models need it.
    num_sms: int | None = Field(default=None, ge=1)
    intra_node: Interconnect
    inter_node: Interconnect
    host_link: Interconnect  # PCIe to host memory, used by KV swap
    power: Power
    efficiency: dict[str, OpEfficiency]  # by op kind: linear, norm, elementwise, attention_prefill, ...
    all_reduce: LinkModel  # inside a node (NVLink / NVSwitch / Infinity Fabric)
    send_recv: LinkModel
    all_reduce_inter_node: LinkModel | None = None  # fitted where multi-node measurements exist
    send_recv_inter_node: LinkModel | None = None
    all_gather: LinkModel | None = None
    # vLLM's custom all-reduce (inside CUDA graphs), used inside a node for messages under
    # ``custom_all_reduce_max_bytes`` (``should_custom_ar``: ``inp_size < max_size``); NCCL (``all_reduce``) from it.
    all_reduce_custom: LinkModel | None = None
    custom_all_reduce_max_bytes: float | None = Field(default=None, gt=0)
    # How attention kernels are modelled: the roofline ``efficiency`` kinds (any device), or vLLM's flash-attention
    # kernels (``prefill_attention`` / ``decode_attention``, which ``llmsim calibrate`` fits on measured kernels).
    attention_model: Literal["roofline", "flash_attention"] = "roofline"
    # How GEMMs are fitted: the roofline's M curve alone, or with a GPU GEMM's shape terms (``ComputeEfficiency``:
    # output tiles over the SMs, per-tile cost against K, the reduction's latency, a soft maximum).
    gemm_model: Literal["roofline", "tiled"] = "roofline"
    prefill_attention: PrefillAttentionFit | None = None
    decode_attention: DecodeAttentionFit | None = None
    # The same kernels over an 8-bit KV cache (vLLM's --kv-cache-dtype fp8), fitted apart where measured: they
    # cost more per byte than the 16-bit ones (H100: 5-17% slower prefill than bf16 KV at equal shape, not the
    # fewer bytes' speed-up). Absent: the 16-bit fits, at the 8-bit bytes.
    prefill_attention_8bit_kv: PrefillAttentionFit | None = None
    decode_attention_8bit_kv: DecodeAttentionFit | None = None
    # vLLM's fused-MoE Triton kernel runs a tuned tile configuration where vLLM ships one for the device and the
    # shape (``fused_moe/configs/E=<experts>,N=<intermediate per GPU>,device_name=<GPU>[,dtype=fp8_w8a8].json``)
    # and a default one (small tiles) otherwise; the two reach very different speeds (H100 at 16k tokens: 430-630
    # vs ~200 TFLOPS in bf16, ~1,000 vs ~230 in FP8). By weight dtype (``bf16``: 16-bit weights, ``fp8``: W8A8),
    # the (experts, intermediate per GPU) pairs with a tuned file. Untuned shapes run on the ``*_untuned``
    # curves; a dtype without a list runs every shape on its ``moe`` / ``moe_fp8`` curve.
    fused_moe_tuned: dict[Literal["bf16", "fp8"], list[tuple[int, int]]] = {}
    l2_cache_bytes: float | None = Field(default=None, gt=0)  # which decode measurements sat in L2; prefill's L2 term
    sources: dict[str, str]
    calibration: dict[str, Any] = {}  # what the efficiencies were fitted on, and how
    validation: dict[str, Any] = {}  # error of the fit, per op, on fitted and held-out data

    @model_validator(mode="after")
    def _sms_where_needed(self) -> "HardwareProfile":
        if self.num_sms is None:
            if self.prefill_attention is not None or self.prefill_attention_8bit_kv is not None:
                raise ValueError("prefill_attention needs num_sms (the GPU's streaming multiprocessors)")
            split = [kind for kind, eff in self.efficiency.items() if eff.split_k_min_k is not None]
            if split:
                raise ValueError(f"efficiency.{split[0]}.split_k_min_k needs num_sms (the GPU's streaming "
                                 "multiprocessors)")
        return self

    def prefill_attention_for(self, kv_dtype_bytes: int) -> PrefillAttentionFit | None:
        """The fitted prefill kernel for a KV cache of this element size."""
        if kv_dtype_bytes == 1 and self.prefill_attention_8bit_kv is not None:
            return self.prefill_attention_8bit_kv
        return self.prefill_attention

    def decode_attention_for(self, kv_dtype_bytes: int) -> DecodeAttentionFit | None:
        """The fitted decode kernel for a KV cache of this element size."""
        if kv_dtype_bytes == 1 and self.decode_attention_8bit_kv is not None:
            return self.decode_attention_8bit_kv
        return self.decode_attention

    def fused_moe_kind(self, kind: str, num_experts: int, shard_ffn: int) -> str:
        """``moe_untuned`` / ``moe_fp8_untuned`` for a fused MoE whose shape vLLM has no tuned configuration for
        on this device; ``kind`` otherwise."""
        if kind not in ("moe", "moe_fp8"):
            return kind
        tuned = self.fused_moe_tuned.get("fp8" if kind == "moe_fp8" else "bf16")
        if tuned is not None and (num_experts, shard_ffn) not in tuned:
            return f"{kind}_untuned"
        return kind

    def peak(self, dtype: str) -> float:
        try:
            return self.peak_flops[peak_dtype(dtype)]
        except KeyError:
            named = f"{peak_dtype(dtype)!r} (model.dtype {dtype})" if peak_dtype(dtype) != dtype else repr(dtype)
            raise ConfigError(
                f"hardware: {self.name} has no peak FLOPS for dtype {named}; allowed: {', '.join(self.peak_flops)}"
            ) from None


def peak_dtype(dtype: str) -> str:
    """The dtype whose peak FLOP/s a GEMM of weights ``dtype`` runs at: block-scaled FP8 at FP8's."""
    return "fp8" if dtype == "fp8_block" else dtype


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


# What a profile that names a ``base`` does not take from it: the base's fit was made and checked on the base's
# part, not this one.
_NOT_INHERITED = ("calibration", "validation")


def _profile_fields(path: Path, seen: tuple[Path, ...]) -> dict:
    """A profile file's fields. ``base: <profile name or path>`` takes every field of that profile (but
    ``_NOT_INHERITED``) and the file's own fields over them, mappings merged key by key: a part that shares a
    chip with a profiled one (``h200`` on ``h100-sxm``) states only what differs."""
    try:
        raw = load_yaml_text(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"hardware.device: profile {where} is not valid YAML: "
                          f"{getattr(exc, 'problem', None) or exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"hardware.device: cannot read profile {path}: not a readable text file ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"hardware.device: profile {path} is not a YAML mapping of profile fields")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: a profile name or a path to a profile YAML, not {base!r}")
    base_path = _base_file(path, base)
    if not base_path.exists():
        raise ConfigError(f"{path}: base: unknown profile {base!r}; allowed: {', '.join(available_profiles())} "
                          "or a path to a profile YAML")
    if base_path.resolve() in seen:
        raise ConfigError(f"{path}: base: {base!r} leads back to this profile")
    fields = _profile_fields(base_path, seen + (path.resolve(),))
    for key in _NOT_INHERITED:
        fields.pop(key, None)
    return _merged(fields, raw)


def _base_file(path: Path, base: str) -> Path:
    """The file a profile's ``base:`` names: a shipped profile's name, or a path relative to the profile."""
    return path.parent / base if Path(base).suffix else profile_file(base)


def profile_file(name_or_path: str) -> Path:
    """The YAML file of a shipped profile's name (case-insensitive), or the path itself."""
    return PROFILES_DIR / f"{name_or_path.lower()}.yaml" if not Path(name_or_path).suffix else Path(name_or_path)


# name or path -> (its chain of files, their versions, the version of its own file when walked)
_chains: dict[str, tuple[tuple[Path, ...], tuple, tuple[int, int] | None]] = {}


def profile_files(name_or_path: str) -> tuple[Path, ...]:
    """The files a profile is read from: its own, then the profiles its ``base:`` chain names (those that exist;
    ``load_profile`` reports the others). Walked again only when one of those files has changed, since any of
    them may name another base (``load_profile`` and every resumed sweep point's ``input_digests`` ask)."""
    own = _version(profile_file(name_or_path))
    cached = _chains.get(name_or_path)
    if cached is not None and cached[2] == own and _versions(cached[0]) == cached[1]:
        return cached[0]
    files = _walk_chain(name_or_path)
    if len(_chains) >= 64:
        _chains.clear()
    _chains[name_or_path] = (files, _versions(files), own)
    return files


def _walk_chain(name_or_path: str) -> tuple[Path, ...]:
    files = []
    path = profile_file(name_or_path)
    while path.is_file() and path.resolve() not in files:
        files.append(path.resolve())
        try:
            raw = load_yaml_text(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            break
        base = raw.get("base") if isinstance(raw, dict) else None
        if not isinstance(base, str):
            break
        path = _base_file(path, base)
    return tuple(files)


def _merged(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_profile(name_or_path: str) -> HardwareProfile:
    """A profile name from ``hardware_profiles/`` (case-insensitive) or a path to a profile YAML. Read once per
    version of its files (the profile and its ``base:`` chain, by modification time and size): a profile edited
    while a process runs (a notebook's) is read again, not served from before the edit."""
    path = profile_file(name_or_path)
    if not path.exists():
        raise ConfigError(
            f"hardware.device: unknown device {name_or_path!r}; allowed: {', '.join(available_profiles())} "
            "or a path to a profile YAML"
        )
    return _load_profile(name_or_path, _versions(profile_files(name_or_path)))


def _version(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


def _versions(files: tuple[Path, ...]) -> tuple:
    return tuple(_version(p) for p in files)


def forget_loaded_profiles() -> None:
    """Read every profile afresh (after rewriting one: two writes in the same clock tick keep its time)."""
    _chains.clear()
    _load_profile.cache_clear()


@lru_cache(maxsize=32)
def _load_profile(name_or_path: str, versions: tuple) -> HardwareProfile:
    path = profile_file(name_or_path)
    raw = _profile_fields(path, ())
    try:
        return HardwareProfile(**raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        # "[key]": pydantic's marker for a dict's key
        where = ".".join(str(p) for p in validation_error_loc(first) if p != "[key]")
        msg = first["msg"].removeprefix("Value error, ")  # a validator's own message says what and where
        raise ConfigError(f"{path}: {where}: {msg}" if where else f"{path}: {msg}") from None
