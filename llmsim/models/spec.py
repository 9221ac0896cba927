"""Model shape specs, from the shipped catalog or from a HuggingFace ``config.json``."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import yaml
from pydantic import ConfigDict, Field, ValidationError

from llmsim.bool_numbers import NumbersNotBools
from llmsim.errors import ConfigError

CATALOG_PATH = Path(__file__).with_name("catalog.yaml")
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1, "int8": 1}


WIDE_DTYPES = ("fp32", "fp16", "bf16")  # dtypes activations can have


class ModelSpec(NumbersNotBools):
    """Transformer decoder shapes. Sizes are counts. Precision as engines have it: ``dtype`` is the weights'
    (``fp8``/``int8``: a quantised checkpoint, GEMMs at that dtype's peak, W8A8 as vLLM's ``--quantization fp8``
    runs them); activations, and so TP all-reduce payloads, stay 16-bit (``activation_dtype``, default the
    weights' dtype when it is 16/32-bit, else bf16); the KV cache has its own (``kv_cache_dtype``, vLLM's
    ``--kv-cache-dtype``, default the activations')."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    num_layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    ffn_size: int = Field(gt=0)  # intermediate size of one (expert) MLP
    gated_mlp: bool = True  # SwiGLU-style up+gate projections
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    vocab_size: int = Field(gt=0)
    num_experts: int = Field(default=1, ge=1)
    experts_per_token: int = Field(default=1, ge=1)
    max_position: int = Field(default=4096, gt=0)
    dtype: str = "fp16"
    activation_dtype: str | None = None
    kv_cache_dtype: str | None = None

    @property
    def dtype_bytes(self) -> int:
        """Bytes per weight."""
        return DTYPE_BYTES[self.dtype]

    @property
    def act_dtype(self) -> str:
        return self.activation_dtype or (self.dtype if self.dtype in WIDE_DTYPES else "bf16")

    @property
    def act_bytes(self) -> int:
        return DTYPE_BYTES[self.act_dtype]

    @property
    def kv_dtype(self) -> str:
        return self.kv_cache_dtype or self.act_dtype

    @property
    def kv_dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.kv_dtype]

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def params_per_layer(self) -> int:
        attn = self.hidden_size * (self.q_size + 2 * self.kv_size) + self.q_size * self.hidden_size
        mlp = (3 if self.gated_mlp else 2) * self.hidden_size * self.ffn_size * self.num_experts
        router = self.hidden_size * self.num_experts if self.num_experts > 1 else 0
        return attn + mlp + router + 2 * self.hidden_size

    @property
    def num_params(self) -> int:
        embed = self.vocab_size * self.hidden_size
        return self.num_layers * self.params_per_layer + 2 * embed + self.hidden_size

    @property
    def weight_bytes(self) -> int:
        return self.num_params * self.dtype_bytes

    def kv_bytes_per_token(self) -> int:
        """K and V of every layer for one token, whole model."""
        return 2 * self.num_layers * self.kv_size * self.kv_dtype_bytes


@lru_cache(maxsize=1)
def catalog() -> dict[str, dict]:
    with CATALOG_PATH.open() as f:
        return yaml.safe_load(f)


def from_hf_config(path: Path, dtype: str | None = None) -> ModelSpec:
    """Read the fields that decide cost from a HuggingFace ``config.json``."""
    path = Path(path).absolute()
    try:
        cfg = json.loads(path.read_text(encoding="utf-8-sig"))  # a byte-order mark, if any, is no JSON
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"model: cannot read HuggingFace config {path}: {exc}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"model: HuggingFace config {path} is not a JSON object")
    # A null field is an absent one, as transformers' PretrainedConfig reads it (its default applies).
    cfg = {key: value for key, value in cfg.items() if value is not None}
    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "num_key_value_heads",
                "intermediate_size", "ffn_dim", "head_dim", "num_local_experts", "num_experts_per_tok",
                "max_position_embeddings"):
        value = cfg.get(key)
        if value is not None and (type(value) is not int or value < 1):
            raise ConfigError(f"model: HuggingFace config {path}: {key} is {value!r}, expected a whole number >= 1")
    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size"):
        if key not in cfg:
            raise ConfigError(f"model: HuggingFace config {path} lacks the field {key!r}")
    for key in ("_name_or_path", "model_type"):
        if key in cfg and not isinstance(cfg[key], str):
            raise ConfigError(f"model: HuggingFace config {path}: {key} is {cfg[key]!r}, expected a string")
    architectures = cfg.get("architectures")
    if architectures is not None and not (isinstance(architectures, list)
                                          and all(isinstance(a, str) for a in architectures)):
        raise ConfigError(f"model: HuggingFace config {path}: architectures is {architectures!r}, expected a list of "
                          "class names")
    if cfg.get("num_experts_per_tok", 1) > cfg.get("num_local_experts", 1):
        raise ConfigError(f"model: HuggingFace config {path}: num_experts_per_tok {cfg['num_experts_per_tok']} is "
                          f"more than num_local_experts {cfg.get('num_local_experts', 1)}")
    torch_dtype = cfg.get("torch_dtype")
    if dtype is None and torch_dtype is not None and not (isinstance(torch_dtype, str) and torch_dtype in _HF_DTYPES):
        raise ConfigError(f"model: HuggingFace config {path}: torch_dtype {torch_dtype!r} is none of "
                          f"{', '.join(_HF_DTYPES)}; set model.dtype")
    quantization = cfg.get("quantization_config")
    if dtype is None and quantization is not None:
        # The engine runs the checkpoint's quantised weights; reading the 16-bit torch_dtype would price them as
        # 16-bit, so the precision is the user's to say.
        method = quantization.get("quant_method") if isinstance(quantization, dict) else None
        raise ConfigError(f"model: HuggingFace config {path} is a quantised checkpoint (quantization_config, "
                          f"quant_method {method!r}): set model.dtype to the precision its GEMMs run at (fp8 or "
                          "int8; weights of fewer bits are not modelled)")
    try:
        hidden = cfg["hidden_size"]
        heads = cfg["num_attention_heads"]
        kv_heads = cfg.get("num_key_value_heads", heads)
        if heads % kv_heads:
            raise ConfigError(f"model: HuggingFace config {path}: num_attention_heads {heads} is not a multiple of "
                              f"num_key_value_heads {kv_heads}")
        if not cfg.get("head_dim") and hidden % heads:
            raise ConfigError(f"model: HuggingFace config {path}: hidden_size {hidden} is not a multiple of "
                              f"num_attention_heads {heads} (and there is no head_dim)")
        ffn = cfg.get("intermediate_size") or cfg.get("ffn_dim")  # OPT's name for it
        if ffn is None:  # no default: a guessed MLP width would price every layer wrong
            raise ConfigError(f"model: HuggingFace config {path} lacks the field 'intermediate_size' (or 'ffn_dim')")
        arch = (cfg.get("architectures") or [""])[0].lower()
        is_opt = cfg.get("model_type") == "opt" or "opt" in arch
        spec = ModelSpec(
            # Without _name_or_path: the folder's name, as HuggingFace lays a model out (or the file's own).
            name=cfg.get("_name_or_path") or (path.parent.name if path.name == "config.json" else path.stem),
            num_layers=cfg["num_hidden_layers"],
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            ffn_size=ffn,
            gated_mlp=not is_opt,
            norm="layernorm" if is_opt else "rmsnorm",
            vocab_size=cfg["vocab_size"],
            num_experts=cfg.get("num_local_experts", 1),
            experts_per_token=cfg.get("num_experts_per_tok", 1),
            max_position=cfg.get("max_position_embeddings", 4096),
            dtype=dtype or _hf_dtype(cfg.get("torch_dtype")),
        )
    except ValidationError as exc:
        raise ConfigError(f"model: HuggingFace config {path} is not usable: {exc}") from None
    return spec


_HF_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def _hf_dtype(torch_dtype: str | None) -> str:
    """The weights' precision from ``torch_dtype`` (fp16 where the config names none, as HF's default)."""
    return _HF_DTYPES.get(torch_dtype or "float16")


def load_model(name: str, dtype: str | None = None, activation_dtype: str | None = None,
               kv_cache_dtype: str | None = None) -> ModelSpec:
    """A catalog name (case-insensitive) or a path to a HuggingFace ``config.json`` (or its folder), with the
    precisions a config chose (None: the model's own, see ``ModelSpec``)."""
    spec = _load_model(name, dtype)
    if activation_dtype or kv_cache_dtype:
        spec = spec.model_copy(update={"activation_dtype": activation_dtype, "kv_cache_dtype": kv_cache_dtype})
    return spec


def hf_config_file(name: str) -> Path | None:
    """The HuggingFace ``config.json`` a model name is a path to (the file, or its folder); None for a catalog
    name."""
    path = Path(name)
    if name.endswith(".json"):
        return path
    return path / "config.json" if path.is_dir() else None


def _load_model(name: str, dtype: str | None) -> ModelSpec:
    path = hf_config_file(name)
    if path is not None:
        return from_hf_config(path, dtype)
    entries = {k.lower(): (k, v) for k, v in catalog().items()}
    if name.lower() not in entries:
        raise ConfigError(
            f"model: unknown model {name!r}; allowed: {', '.join(sorted(catalog()))} "
            "or a path to a HuggingFace config.json"
        )
    key, fields = entries[name.lower()]
    fields = dict(fields, name=key)
    if dtype:
        fields["dtype"] = dtype
    return ModelSpec(**fields)
