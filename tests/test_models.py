import json

import pytest

from llmsim.errors import ConfigError
from llmsim.models import load_model
from llmsim.models.spec import catalog


@pytest.mark.parametrize("name,billions", [("Llama-2-7B", 6.74), ("Llama-2-13B", 13.0), ("Llama-2-70B", 69.0),
                                           ("Llama-3-8B", 8.03), ("Llama-3-70B", 70.6), ("Mistral-7B", 7.24),
                                           ("Mixtral-8x7B", 46.7), ("Qwen2-72B", 72.7),
                                           ("Yi-34B", 34.4)])
def test_catalog_parameter_counts_match_published_sizes(name, billions):
    assert load_model(name).num_params / 1e9 == pytest.approx(billions, rel=0.02)


def test_catalog_has_required_models():
    for name in ["Llama-2-7B", "Llama-2-13B", "Llama-2-70B", "Llama-3-8B", "Llama-3-70B", "Mistral-7B", "OPT-13B",
                 "Qwen2-72B", "Mixtral-8x7B"]:
        assert name in catalog()


def test_hf_config_json(tmp_path):
    cfg = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "num_attention_heads": 32,
           "num_key_value_heads": 8, "num_hidden_layers": 32, "intermediate_size": 14336, "vocab_size": 128256,
           "max_position_embeddings": 8192, "torch_dtype": "bfloat16"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    spec = load_model(str(tmp_path))
    assert spec.num_kv_heads == 8 and spec.dtype == "bf16" and spec.head_dim == 128
    assert spec.num_params == load_model("Llama-3-8B").num_params


def test_unknown_model_lists_catalog():
    with pytest.raises(ConfigError, match="allowed: .*Llama-2-7B"):
        load_model("gpt-5")


def test_hf_config_missing_field(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ConfigError, match="lacks the field"):
        load_model(str(tmp_path / "config.json"))


def test_hf_config_null_fields_are_absent_ones(tmp_path):
    """transformers reads a null field as absent (its default applies); llmsim compared null with numbers and
    crashed on null expert counts, context lengths and KV heads."""
    cfg = {"hidden_size": 4096, "num_attention_heads": 32, "num_hidden_layers": 32, "intermediate_size": 11008,
           "vocab_size": 32000}
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "nulls").mkdir()
    (tmp_path / "nulls" / "config.json").write_text(json.dumps({
        **cfg, "num_key_value_heads": None, "num_local_experts": None, "num_experts_per_tok": None,
        "max_position_embeddings": None, "head_dim": None, "torch_dtype": None, "architectures": None}))
    plain, nulls = load_model(str(tmp_path / "plain")), load_model(str(tmp_path / "nulls"))
    assert nulls.model_dump(exclude={"name"}) == plain.model_dump(exclude={"name"})
