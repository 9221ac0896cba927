"""Model shape specs, from the shipped catalog or from a HuggingFace ``config.json``."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import yaml
from pydantic import ConfigDict, Field, ValidationError, model_validator

from llmsim.bool_numbers import NumbersNotBools
from llmsim.errors import ConfigError

CATALOG_PATH = Path(__file__).with_name("catalog.yaml")
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1, "int8": 1, "fp8_block": 1}


WIDE_DTYPES = ("fp32", "fp16", "bf16")  # dtypes activations can have


class ModelSpec(NumbersNotBools):
    """Transformer decoder shapes. Sizes are counts. Precision as engines have it: ``dtype`` is the weights'
    (``fp8``/``int8``: a quantised checkpoint, GEMMs at that dtype's peak, W8A8 as vLLM's ``--quantization fp8``
    runs them; ``fp8_block``: FP8 weights scaled per 128 x 128 block and activations per 128-element group, as
    DeepSeek-V3's and Qwen3's FP8 checkpoints are and vLLM's block-FP8 kernels run them); activations, and so TP
    all-reduce payloads, stay 16-bit (``activation_dtype``, default the weights' dtype when it is 16/32-bit, else
    bf16); the KV cache has its own (``kv_cache_dtype``, vLLM's ``--kv-cache-dtype``, default the activations')."""

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
    # MoE layers beside the routed experts: shared experts, one gated MLP of this width that every token runs
    # (DeepSeek's and GLM's n_shared_experts x moe_intermediate_size, Qwen2-MoE's shared_expert_intermediate_size).
    shared_expert_ffn_size: int = Field(default=0, ge=0)
    # The first layers with a dense MLP of dense_ffn_size instead of experts (DeepSeek's and GLM's
    # first_k_dense_replace, their intermediate_size).
    num_dense_layers: int = Field(default=0, ge=0)
    dense_ffn_size: int = Field(default=0, ge=0)
    max_position: int = Field(default=4096, gt=0)
    # The LM head is the embedding's own matrix (HuggingFace's tie_word_embeddings): held once where one stage
    # holds both.
    tied_embeddings: bool = False
    # Sliding-window attention, read from a config.json so that a run can say what it prices otherwise: that many
    # layers attend to the last ``sliding_window`` tokens only (0: none). Not priced: every layer's attention and KV
    # cache are priced as full attention's (README, What does not work yet).
    sliding_window: int = Field(default=0, ge=0)
    num_sliding_layers: int = Field(default=0, ge=0)
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

    @model_validator(mode="after")
    def _moe_layouts_of_moe_models(self) -> "ModelSpec":
        if (self.shared_expert_ffn_size or self.num_dense_layers) and self.num_experts == 1:
            raise ValueError("shared experts and dense layers among MoE ones are for a model with experts")
        if self.num_dense_layers >= self.num_layers:
            raise ValueError(f"num_dense_layers {self.num_dense_layers} leaves none of the {self.num_layers} layers "
                             "MoE")
        if self.num_dense_layers and not self.dense_ffn_size:
            raise ValueError("num_dense_layers needs the dense layers' MLP width, dense_ffn_size")
        if bool(self.sliding_window) != bool(self.num_sliding_layers):
            raise ValueError("sliding_window and num_sliding_layers come together (the window's tokens and the layers "
                             "that use it), or neither")
        if self.num_sliding_layers > self.num_layers:
            raise ValueError(f"num_sliding_layers {self.num_sliding_layers} is more than the {self.num_layers} layers")
        return self

    def _mlp_params(self, ffn_size: int) -> int:
        return (3 if self.gated_mlp else 2) * self.hidden_size * ffn_size

    @property
    def _attention_params(self) -> int:
        return self.hidden_size * (self.q_size + 2 * self.kv_size) + self.q_size * self.hidden_size

    @property
    def params_per_layer(self) -> int:
        """A layer's parameters: an MoE layer's where the first layers are dense (``dense_layer_params``)."""
        mlp = self._mlp_params(self.ffn_size) * self.num_experts + self._mlp_params(self.shared_expert_ffn_size)
        router = self.hidden_size * self.num_experts if self.num_experts > 1 else 0
        return self._attention_params + mlp + router + 2 * self.hidden_size

    @property
    def dense_layer_params(self) -> int:
        return self._attention_params + self._mlp_params(self.dense_ffn_size) + 2 * self.hidden_size

    def layer_params(self, first: int, count: int) -> int:
        """Parameters of layers ``first`` .. ``first + count - 1`` (a pipeline stage's)."""
        dense = max(0, min(first + count, self.num_dense_layers) - first)
        return (count - dense) * self.params_per_layer + dense * self.dense_layer_params

    @property
    def num_params(self) -> int:
        embed = self.vocab_size * self.hidden_size
        return (self.layer_params(0, self.num_layers) + (1 if self.tied_embeddings else 2) * embed
                + self.hidden_size)

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
                "intermediate_size", "ffn_dim", "head_dim", *_EXPERT_FIELDS, "num_experts_per_tok",
                "moe_intermediate_size", "max_position_embeddings", "sliding_window", "sliding_window_pattern"):
        _whole_number(cfg, path, key, 1)
    _whole_number(cfg, path, "max_window_layers", 0)
    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size"):
        if key not in cfg:
            if isinstance(cfg.get("text_config"), dict) and key in cfg["text_config"]:
                # A multimodal model (Gemma 3, Llama 4, Qwen-VL, ...): its language model's fields are nested, and
                # its vision encoder's weights and encoder cache, which the engine holds too, are not modelled.
                raise ConfigError(f"model: HuggingFace config {path} lacks the field {key!r}: it is a multimodal "
                                  "model's, whose language model is under text_config (vision encoders are not "
                                  "modelled); to price the language model alone, give a config.json of its "
                                  "text_config's fields")
            raise ConfigError(f"model: HuggingFace config {path} lacks the field {key!r}")
    for key in ("_name_or_path", "model_type"):
        if key in cfg and not isinstance(cfg[key], str):
            raise ConfigError(f"model: HuggingFace config {path}: {key} is {cfg[key]!r}, expected a string")
    _flag(cfg, path, "use_sliding_window", False)
    tied = _flag(cfg, path, "tie_word_embeddings", cfg.get("model_type") in _TIED_MODEL_TYPES)
    architectures = cfg.get("architectures")
    if architectures is not None and not (isinstance(architectures, list)
                                          and all(isinstance(a, str) for a in architectures)):
        raise ConfigError(f"model: HuggingFace config {path}: architectures is {architectures!r}, expected a list of "
                          "class names")
    _refuse_layers_other_than_attention(cfg, path)
    num_experts, experts_per_token, expert_ffn = _experts(cfg, path)
    shared_ffn, num_dense = _moe_layout(cfg, path, num_experts > 1, expert_ffn)
    torch_dtype = cfg.get("torch_dtype")
    if dtype is None and torch_dtype is not None and not (isinstance(torch_dtype, str) and torch_dtype in _HF_DTYPES):
        raise ConfigError(f"model: HuggingFace config {path}: torch_dtype {torch_dtype!r} is none of "
                          f"{', '.join(_HF_DTYPES)}; set model.dtype")
    quantization = cfg.get("quantization_config")
    if dtype is None and quantization is not None:
        # The engine runs the checkpoint's quantised weights; reading the 16-bit torch_dtype would price them as
        # 16-bit, so the precision is the user's to say.
        method = quantization.get("quant_method") if isinstance(quantization, dict) else None
        blocks = quantization.get("weight_block_size") if isinstance(quantization, dict) else None
        hint = (f"fp8_block: its weight_block_size {blocks} is block-scaled FP8" if blocks is not None else
                "fp8, fp8_block or int8; weights of fewer bits are not modelled")
        raise ConfigError(f"model: HuggingFace config {path} is a quantised checkpoint (quantization_config, "
                          f"quant_method {method!r}): set model.dtype to the precision its GEMMs run at ({hint})")
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
        ffn = expert_ffn or cfg.get("intermediate_size") or cfg.get("ffn_dim")  # OPT's name for it
        if ffn is None:  # no default: a guessed MLP width would price every layer wrong
            raise ConfigError(f"model: HuggingFace config {path} lacks the field 'intermediate_size' (or 'ffn_dim')")
        max_position = cfg.get("max_position_embeddings", 4096)
        num_sliding = _sliding_layers(cfg, cfg["num_hidden_layers"], max_position)
        ungated = (cfg.get("model_type") in _UNGATED_MODEL_TYPES
                   or (cfg.get("architectures") or [""])[0] in _UNGATED_ARCHITECTURES)
        spec = ModelSpec(
            # Without _name_or_path: the folder's name, as HuggingFace lays a model out (or the file's own).
            name=cfg.get("_name_or_path") or (path.parent.name if path.name == "config.json" else path.stem),
            num_layers=cfg["num_hidden_layers"],
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            ffn_size=ffn,
            gated_mlp=not ungated,
            norm="layernorm" if ungated else "rmsnorm",
            vocab_size=cfg["vocab_size"],
            num_experts=num_experts,
            experts_per_token=experts_per_token,
            shared_expert_ffn_size=shared_ffn,
            num_dense_layers=num_dense,
            dense_ffn_size=cfg.get("intermediate_size", 0) if num_dense else 0,
            max_position=max_position,
            tied_embeddings=tied,
            sliding_window=cfg["sliding_window"] if num_sliding else 0,
            num_sliding_layers=num_sliding,
            dtype=dtype or _hf_dtype(cfg.get("torch_dtype")),
        )
    except ValidationError as exc:
        raise ConfigError(f"model: HuggingFace config {path} is not usable: {exc}") from None
    return spec


_HF_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}

# The routed-expert count under each family's name: Mixtral's (also MiniMax's and gpt-oss's), Qwen-MoE's (and
# OLMoE's), DeepSeek's. The expert's width is ``moe_intermediate_size`` where the config has one (Qwen-MoE,
# DeepSeek, whose ``intermediate_size`` is a dense MLP's), else ``intermediate_size`` (Mixtral).
_EXPERT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts")

# Architectures whose MLP is an up projection and an activation, no gate, with LayerNorm (as vLLM's model files for
# them run it): by model_type, or by class name. Every other architecture is read as Llama's descendants are built:
# a gated (SwiGLU-style) MLP and RMSNorm.
_UNGATED_MODEL_TYPES = {"opt", "phi", "gpt_neox", "gptj", "gpt2", "gpt_bigcode", "starcoder2", "falcon", "bloom",
                        "mpt"}
_UNGATED_ARCHITECTURES = {"OPTForCausalLM", "PhiForCausalLM", "GPTNeoXForCausalLM", "GPTJForCausalLM",
                          "GPT2LMHeadModel", "GPTBigCodeForCausalLM", "Starcoder2ForCausalLM", "FalconForCausalLM",
                          "BloomForCausalLM", "MPTForCausalLM"}


# Families whose config class ties the LM head to the embedding when the file does not say (transformers' Gemma
# configs, and OPT's, which keeps PretrainedConfig's default: OPT-13B's published 12.85B parameters count its
# embedding once); Llama's and its descendants' default to untied, as do the families not listed here.
_TIED_MODEL_TYPES = {"gemma", "gemma2", "gemma3_text", "opt"}


# Fields that only a model with layers other than attention has (linear attention: Qwen3-Next; state-space layers:
# Jamba, Nemotron-H, Falcon-H1, Granite 4.0-H): read as a transformer, every layer would be priced as attention with a
# growing KV cache.
_NON_ATTENTION_FIELDS = ("full_attention_interval", "linear_num_value_heads", "attn_layer_period",
                         "hybrid_override_pattern", "mamba_d_state", "mamba_d_ssm", "ssm_state_size")
_ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention", "attention"}


def _refuse_layers_other_than_attention(cfg: dict, path: Path) -> None:
    key = next((key for key in _NON_ATTENTION_FIELDS if key in cfg), None)
    layer_types = cfg.get("layer_types")
    if key is None and isinstance(layer_types, list):
        other = sorted({str(t) for t in layer_types} - _ATTENTION_LAYER_TYPES)
        if other:
            key = f"layer_types ({', '.join(other)})"
    if key is not None:
        raise ConfigError(f"model: HuggingFace config {path}: {key}: layers other than attention (linear attention, "
                          "state-space layers) are not modelled")


def _sliding_layers(cfg: dict, num_layers: int, max_position: int) -> int:
    """How many layers attend within ``sliding_window`` tokens (0: none), as the families' config classes lay them
    out: ``layer_types`` where the config lists them (Gemma 3, gpt-oss, Cohere 2); Gemma 2's every other layer, the
    first sliding; an older Gemma 3 config's every layer but each ``sliding_window_pattern``-th; Qwen2's and Qwen3's
    only with ``use_sliding_window``, from ``max_window_layers`` on (their config classes' default: 28); else every
    layer (Mistral-7B v0.1, Phi-3). A window as long as the context never binds."""
    window = cfg.get("sliding_window", 0)
    if not window or window >= max_position or cfg.get("use_sliding_window") is False:
        return 0
    layer_types = cfg.get("layer_types")
    if isinstance(layer_types, list):
        return sum(1 for t in layer_types if t == "sliding_attention")
    if cfg.get("model_type") == "gemma2":
        return (num_layers + 1) // 2
    pattern = cfg.get("sliding_window_pattern")
    if pattern:
        return num_layers - num_layers // pattern
    if cfg.get("use_sliding_window"):
        return max(0, num_layers - cfg.get("max_window_layers", 28))
    return num_layers


def _experts(cfg: dict, path: Path) -> tuple[int, int, int | None]:
    """(routed experts, experts a token is routed to, an expert's MLP width or None: ``intermediate_size``'s) of
    a config; a dense model is one expert of one."""
    named = [(key, cfg[key]) for key in _EXPERT_FIELDS if key in cfg]
    if len({n for _, n in named}) > 1:
        raise ConfigError(f"model: HuggingFace config {path}: "
                          f"{' and '.join(f'{key} {n}' for key, n in named)} disagree on the number of experts")
    top_k = cfg.get("num_experts_per_tok")
    if not named:
        if top_k is not None and top_k > 1:
            raise ConfigError(f"model: HuggingFace config {path}: num_experts_per_tok {top_k} with no expert count "
                              f"({', '.join(_EXPERT_FIELDS)})")
        return 1, 1, None
    key, num_experts = named[0]
    if num_experts > 1 and top_k is None:  # transformers' defaults differ by family (Mixtral 2, Qwen3-MoE 8)
        raise ConfigError(f"model: HuggingFace config {path}: {key} {num_experts} but no num_experts_per_tok (the "
                          "experts each token is routed to)")
    if (top_k or 1) > num_experts:
        raise ConfigError(f"model: HuggingFace config {path}: num_experts_per_tok {top_k} is more than {key} "
                          f"{num_experts}")
    return num_experts, top_k or 1, cfg.get("moe_intermediate_size") if num_experts > 1 else None


def _whole_number(cfg: dict, path: Path, key: str, minimum: int) -> int | None:
    """The config's ``key`` (None where absent), which must be a whole number of at least ``minimum``."""
    value = cfg.get(key)
    if value is not None and (type(value) is not int or value < minimum):
        raise ConfigError(f"model: HuggingFace config {path}: {key} is {value!r}, expected a whole number >= {minimum}")
    return value


def _flag(cfg: dict, path: Path, key: str, default: bool) -> bool:
    """The config's boolean ``key`` (``default`` where absent), which must be true or false."""
    value = cfg.get(key, default)
    if type(value) is not bool:
        raise ConfigError(f"model: HuggingFace config {path}: {key} is {value!r}, expected true or false")
    return value


def _moe_layout(cfg: dict, path: Path, moe: bool, expert_ffn: int | None) -> tuple[int, int]:
    """(shared experts' MLP width, dense layers first) of an MoE config; what the model does not price is an error
    naming its field, not a model priced as if it had Llama's or Mixtral's layers."""
    def count(key: str) -> int:
        return _whole_number(cfg, path, key, 0) or 0

    if "kv_lora_rank" in cfg:
        raise ConfigError(f"model: HuggingFace config {path}: kv_lora_rank {cfg['kv_lora_rank']!r}: multi-head latent "
                          "attention (DeepSeek-V2/V3's, a compressed KV cache) is not modelled")
    if not moe:
        return 0, 0
    # Shared experts, which vLLM runs as one gated MLP: a count of expert-wide ones (DeepSeek's, GLM's names) or
    # their width (Qwen2-MoE's, whose sigmoid gate on them, one output per token, is not priced).
    num_shared = sum(count(key) for key in ("n_shared_experts", "num_shared_experts"))
    if num_shared and not expert_ffn:
        raise ConfigError(f"model: HuggingFace config {path}: {num_shared} shared experts without "
                          "moe_intermediate_size, their width")
    shared = num_shared * (expert_ffn or 0) + count("shared_expert_intermediate_size")
    num_dense = count("first_k_dense_replace")
    if num_dense and "intermediate_size" not in cfg:
        raise ConfigError(f"model: HuggingFace config {path}: first_k_dense_replace {num_dense} without "
                          "intermediate_size, the dense layers' MLP width")
    if num_dense >= cfg["num_hidden_layers"]:
        raise ConfigError(f"model: HuggingFace config {path}: first_k_dense_replace {num_dense} makes every one of the "
                          f"{cfg['num_hidden_layers']} layers dense")
    mlp_only = cfg.get("mlp_only_layers", [])
    if not isinstance(mlp_only, list):
        raise ConfigError(f"model: HuggingFace config {path}: mlp_only_layers is {mlp_only!r}, expected a list")
    interleaved = [(key, cfg[key]) for key in ("decoder_sparse_step", "moe_layer_freq", "interleave_moe_layer_step")
                   if count(key) > 1]
    if mlp_only:
        interleaved.append(("mlp_only_layers", mlp_only))
    if interleaved:
        key, value = interleaved[0]
        raise ConfigError(f"model: HuggingFace config {path}: {key} {value}: dense layers interleaved with the MoE "
                          "ones are not modelled (only the first layers may be dense: first_k_dense_replace)")
    return shared, num_dense


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
