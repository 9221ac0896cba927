import json
import re

import pytest

from llmsim.errors import ConfigError
from llmsim.models import load_model
from llmsim.models.spec import catalog


@pytest.mark.parametrize("name,billions", [("Llama-2-7B", 6.74), ("Llama-2-13B", 13.0), ("Llama-2-70B", 69.0),
                                           ("Llama-3-8B", 8.03), ("Llama-3-70B", 70.6), ("Mistral-7B", 7.24),
                                           ("Mixtral-8x7B", 46.7), ("Qwen2-72B", 72.7),
                                           ("Yi-34B", 34.4), ("Qwen3-30B-A3B", 30.5), ("Qwen3-235B-A22B", 235.0),
                                           ("OPT-13B", 12.85), ("GLM-4.5-Air", 106.0), ("Llama-3.1-70B", 70.6),
                                           ("Qwen3-8B", 8.2), ("Qwen3-14B", 14.8), ("Qwen3-32B", 32.8)])
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


# Published config.json fields of the models below (the fields that decide cost, and a few that do not).
QWEN3_30B_A3B = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
                 "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48,
                 "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
                 "num_experts_per_tok": 8, "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True,
                 "vocab_size": 151936, "max_position_embeddings": 40960, "tie_word_embeddings": False,
                 "sliding_window": None, "use_sliding_window": False, "torch_dtype": "bfloat16"}
QWEN3_235B_A22B = {**QWEN3_30B_A3B, "hidden_size": 4096, "intermediate_size": 12288, "moe_intermediate_size": 1536,
                   "num_hidden_layers": 94, "num_attention_heads": 64}
DEEPSEEK_V2_LITE = {"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "hidden_size": 2048,
                    "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
                    "num_attention_heads": 16, "num_key_value_heads": 16, "n_routed_experts": 64, "n_shared_experts": 2,
                    "num_experts_per_tok": 6, "first_k_dense_replace": 1, "kv_lora_rank": 512, "q_lora_rank": None,
                    "vocab_size": 102400, "max_position_embeddings": 163840, "torch_dtype": "bfloat16"}
PHI_2 = {"architectures": ["PhiForCausalLM"], "model_type": "phi", "hidden_size": 2560, "intermediate_size": 10240,
         "num_attention_heads": 32, "num_key_value_heads": 32, "num_hidden_layers": 32, "vocab_size": 51200,
         "max_position_embeddings": 2048, "partial_rotary_factor": 0.4, "tie_word_embeddings": False,
         "torch_dtype": "float16"}
GEMMA_2_9B = {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "hidden_size": 3584,
              "intermediate_size": 14336, "num_hidden_layers": 42, "num_attention_heads": 16, "num_key_value_heads": 8,
              "head_dim": 256, "vocab_size": 256000, "max_position_embeddings": 8192, "sliding_window": 4096,
              "torch_dtype": "float32"}  # as published: no tie_word_embeddings (Gemma2Config ties by default)


def _config(tmp_path, fields) -> str:
    path = tmp_path / f"c{len(list(tmp_path.iterdir()))}.json"
    path.write_text(json.dumps(fields))
    return str(path)


@pytest.mark.parametrize("fields,name", [(QWEN3_30B_A3B, "Qwen3-30B-A3B"), (QWEN3_235B_A22B, "Qwen3-235B-A22B"),
                                         (PHI_2, "Phi-2")])
def test_hf_configs_of_catalog_models_read_as_the_catalog_has_them(tmp_path, fields, name):
    """Qwen-MoE names its experts num_experts and their width moe_intermediate_size (intermediate_size is a dense
    MLP's): read as Mixtral's names only, Qwen3-30B-A3B was refused ("num_experts_per_tok 8 is more than
    num_local_experts 1") and, without a top-k, would have been priced dense. Phi-2's MLP has no gate: it was read
    as gated, its MLP priced 1.5x."""
    spec = load_model(_config(tmp_path, fields))
    assert spec.model_dump(exclude={"name"}) == load_model(name).model_dump(exclude={"name"})


def test_gemma_ties_its_lm_head_to_the_embedding_unless_the_config_says_not(tmp_path):
    """Gemma's published config.json does not say tie_word_embeddings (its config class ties them): counted twice,
    Gemma-2-9B came to 10.2B parameters."""
    assert load_model(_config(tmp_path, GEMMA_2_9B)).num_params / 1e9 == pytest.approx(9.24, rel=0.01)
    untied = load_model(_config(tmp_path, {**GEMMA_2_9B, "tie_word_embeddings": False}))
    assert untied.num_params - load_model(_config(tmp_path, GEMMA_2_9B)).num_params == 256000 * 3584
    assert load_model(_config(tmp_path, {**QWEN3_30B_A3B, "tie_word_embeddings": True})).tied_embeddings


def test_tied_embeddings_are_one_matrix_where_one_stage_holds_both():
    from llmsim.execution.memory import plan_memory
    from llmsim.execution.model import ParallelPlan
    from llmsim.hardware.profile import load_profile

    untied = load_model("Llama-3-8B")
    tied = untied.model_copy(update={"tied_embeddings": True})
    device = load_profile("a100-80gb")
    kwargs = dict(block_size=16, gpu_memory_utilization=0.9, max_num_batched_tokens=8192, max_num_seqs=256,
                  runtime_reserve_gib=1.0, max_model_len=8192)
    one = [plan_memory(m, device, ParallelPlan(tp=2, pp=1), **kwargs) for m in (untied, tied)]
    assert one[0].weights_bytes - one[1].weights_bytes == untied.vocab_size * untied.hidden_size / 2 * 2
    assert one[1].num_blocks > one[0].num_blocks
    two = [plan_memory(m, device, ParallelPlan(tp=2, pp=2), **kwargs) for m in (untied, tied)]
    assert two[0] == two[1]  # the first stage holds the embedding, the last the LM head: one matrix each


@pytest.mark.parametrize("fields,needle", [
    (DEEPSEEK_V2_LITE, "kv_lora_rank 512: multi-head latent attention"),
    ({**QWEN3_30B_A3B, "mlp_only_layers": [0, 1]}, "mlp_only_layers [0, 1]: dense layers interleaved with the MoE"),
    ({**QWEN3_30B_A3B, "decoder_sparse_step": 2}, "decoder_sparse_step 2: dense layers interleaved with the MoE"),
    ({**QWEN3_30B_A3B, "first_k_dense_replace": 48}, "first_k_dense_replace 48 makes every one of the 48 layers"),
    ({**QWEN3_30B_A3B, "moe_intermediate_size": None, "n_shared_experts": 1},
     "1 shared experts without moe_intermediate_size"),
    ({**QWEN3_30B_A3B, "num_experts_per_tok": None}, "num_experts 128 but no num_experts_per_tok"),
    ({**QWEN3_30B_A3B, "num_local_experts": 64}, "num_local_experts 64 and num_experts 128 disagree"),
    ({**PHI_2, "num_experts_per_tok": 2}, "num_experts_per_tok 2 with no expert count"),
    ({**QWEN3_30B_A3B, "n_shared_experts": "2"}, "n_shared_experts is '2', expected a whole number"),
    ({**GEMMA_2_9B, "tie_word_embeddings": "yes"}, "tie_word_embeddings is 'yes', expected true or false"),
    ({**QWEN3_30B_A3B, "full_attention_interval": 4, "linear_num_value_heads": 32},
     "full_attention_interval: layers other than attention"),
    ({**PHI_2, "layer_types": ["mamba", "attention", "mamba"]}, "layer_types (mamba): layers other than attention"),
])
def test_hf_config_features_that_are_not_modelled_are_named(tmp_path, fields, needle):
    """MLA, dense layers interleaved with MoE ones and layers other than attention (Qwen3-Next's linear attention,
    Jamba's or Granite 4.0-H's state-space layers) would be priced as layers they are not; each is an error naming
    its field. (Sliding-window layer types load: priced as full attention, as the README says.)"""
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_model(_config(tmp_path, fields))


def test_a_block_scaled_fp8_checkpoint_asks_for_fp8_block(tmp_path):
    """Qwen3's and DeepSeek-V3's FP8 checkpoints scale weights per 128 x 128 block; vLLM runs them on its block-FP8
    kernels, not the per-tensor ones that model.dtype fp8 prices."""
    fp8 = {**QWEN3_30B_A3B, "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}
    path = _config(tmp_path, fp8)
    with pytest.raises(ConfigError, match=re.escape("(fp8_block: its weight_block_size [128, 128] is block-scaled")):
        load_model(path)
    spec = load_model(path, "fp8_block")
    assert (spec.dtype, spec.dtype_bytes, spec.act_dtype) == ("fp8_block", 1, "bf16")
    with pytest.raises(ConfigError, match=re.escape("(fp8, fp8_block or int8; weights of fewer bits")):
        load_model(_config(tmp_path, {**QWEN3_30B_A3B, "quantization_config": {"quant_method": "awq"}}))


def test_a_multimodal_config_says_where_its_language_model_is(tmp_path):
    """Gemma 3's, Llama 4's and Qwen-VL's configs nest the language model under text_config: 'lacks the field
    hidden_size' alone did not say so."""
    nested = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
              "text_config": {"hidden_size": 2560, "num_hidden_layers": 34, "num_attention_heads": 8,
                              "vocab_size": 262208, "intermediate_size": 10240},
              "vision_config": {"hidden_size": 1152, "num_hidden_layers": 27}}
    with pytest.raises(ConfigError, match="lacks the field 'hidden_size': it is a multimodal model's, whose "
                                          "language model is under text_config"):
        load_model(_config(tmp_path, nested))
    assert load_model(_config(tmp_path, {**nested["text_config"], "model_type": "gemma3_text"})).tied_embeddings


GLM_4_5_AIR = {"architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe", "hidden_size": 4096,
               "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 46,
               "num_attention_heads": 96, "num_key_value_heads": 8, "head_dim": 128, "n_routed_experts": 128,
               "n_shared_experts": 1, "num_experts_per_tok": 8, "first_k_dense_replace": 1,
               "num_nextn_predict_layers": 1, "vocab_size": 151552, "max_position_embeddings": 131072,
               "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
QWEN2_57B_A14B = {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "hidden_size": 3584,
                  "intermediate_size": 18944, "moe_intermediate_size": 2560, "shared_expert_intermediate_size": 20480,
                  "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "num_experts": 64,
                  "num_experts_per_tok": 8, "decoder_sparse_step": 1, "mlp_only_layers": [], "vocab_size": 151936,
                  "max_position_embeddings": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def test_shared_experts_and_dense_first_layers_are_read_and_priced(tmp_path):
    """GLM-4.5-Air's MoE layers run a shared expert beside the routed ones, and its first layer a dense MLP;
    Qwen2-57B-A14B's a 20,480-wide shared expert. Both were refused; read, their parameters come to the published
    totals (106B, 57.4B), and a step prices each kind of layer for as many layers as it has."""
    from llmsim.execution import ops
    from llmsim.execution.model import ExecutionModel, ParallelPlan
    from llmsim.hardware.profile import load_profile

    glm = load_model(_config(tmp_path, GLM_4_5_AIR))
    assert glm.model_dump(exclude={"name"}) == load_model("GLM-4.5-Air").model_dump(exclude={"name"})
    assert (glm.shared_expert_ffn_size, glm.num_dense_layers, glm.dense_ffn_size) == (1408, 1, 10944)
    assert load_model(_config(tmp_path, QWEN2_57B_A14B)).num_params / 1e9 == pytest.approx(57.4, rel=0.01)
    assert glm.num_params == 45 * glm.params_per_layer + glm.dense_layer_params + 2 * 151552 * 4096 + 4096
    ex = ExecutionModel(glm, load_profile("h100-sxm"), ParallelPlan(tp=4))
    moe, dense = ex._layer_groups(256)
    assert (moe[0], dense[0]) == (45, 1)
    names = {op.name for op in moe[1]}
    assert {"moe_gate", "moe_experts", "shared_up_proj", "shared_down_proj"} <= names and "mlp_up_proj" not in names
    assert {op.name for op in dense[1]} >= {"mlp_up_proj", "mlp_down_proj"} and "moe_experts" not in {
        op.name for op in dense[1]}
    up = next(op for op in dense[1] if op.name == "mlp_up_proj")
    assert (up.gemm_k, up.gemm_n) == (4096, 2 * 10944 // 4)
    flops = [sum(op.flops for op in group) for _, group in (moe, dense)]
    assert ex._token_part(256)[1] == (45 * flops[0] + flops[1]) / 46  # the mean layer's, weighed by count
    assert ex.prefill_flops(256, 0) == ex.iteration(((256, 0),), 0, 0, 1).flops
    # The memory plan: a pipeline's first stage holds the dense layer.
    from llmsim.execution.memory import plan_memory
    kwargs = dict(block_size=16, gpu_memory_utilization=0.9, max_num_batched_tokens=8192, max_num_seqs=256,
                  runtime_reserve_gib=1.0, max_model_len=8192)
    one = plan_memory(glm, load_profile("h100-sxm"), ParallelPlan(tp=4), **kwargs)
    assert one.weights_bytes == glm.layer_params(0, 46) / 4 * 2 + (151552 * 4096 / 4 * 2 + 4096) * 2
    assert glm.layer_params(0, 23) - glm.layer_params(23, 23) == glm.dense_layer_params - glm.params_per_layer


def test_sliding_window_layer_types_load(tmp_path):
    """Gemma 3's and gpt-oss's layer_types mix sliding-window and full attention layers: priced as full attention
    (README), not refused; the layers that slide are counted, for the run to say so."""
    spec = load_model(_config(tmp_path, {**GEMMA_2_9B, "layer_types": ["sliding_attention", "full_attention"] * 21}))
    assert spec.num_layers == 42
    assert (spec.sliding_window, spec.num_sliding_layers) == (4096, 21)


MISTRAL_7B_V01 = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
                  "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                  "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 32768,
                  "sliding_window": 4096, "torch_dtype": "bfloat16"}


@pytest.mark.parametrize("fields,window,layers", [
    (GEMMA_2_9B, 4096, 21),  # Gemma 2: every other layer, the first sliding
    ({**GEMMA_2_9B, "num_hidden_layers": 41}, 4096, 21),
    ({**GEMMA_2_9B, "model_type": "gemma3_text", "num_hidden_layers": 34, "sliding_window": 1024,
      "sliding_window_pattern": 6, "max_position_embeddings": 131072}, 1024, 29),  # 5 of each 6
    (MISTRAL_7B_V01, 4096, 32),  # every layer
    ({**MISTRAL_7B_V01, "sliding_window": 32768}, 0, 0),  # as long as the context: never binds
    ({**MISTRAL_7B_V01, "sliding_window": None}, 0, 0),  # Mistral-7B v0.2 on: none
    (QWEN3_30B_A3B, 0, 0),  # sliding_window null, use_sliding_window false
    ({**QWEN3_30B_A3B, "sliding_window": 4096}, 0, 0),  # Qwen2's and Qwen3's: off unless use_sliding_window
    ({**QWEN3_30B_A3B, "sliding_window": 4096, "use_sliding_window": True, "max_window_layers": 28}, 4096, 20),
    ({**QWEN3_30B_A3B, "sliding_window": 4096, "use_sliding_window": True}, 4096, 20),  # the config class's 28
    ({**MISTRAL_7B_V01, "layer_types": ["full_attention"] * 32}, 0, 0),
])
def test_sliding_window_layers_as_each_family_lays_them_out(tmp_path, fields, window, layers):
    """Which layers attend within the window, as transformers' config classes lay them out; a window is not
    priced (every layer as full attention), and the run names it (``model_notes``)."""
    from llmsim.config_notes import model_notes

    spec = load_model(_config(tmp_path, fields))
    assert (spec.sliding_window, spec.num_sliding_layers) == (window, layers)
    notes = model_notes(spec)
    assert len(notes) == (1 if layers else 0)
    if layers:
        assert f"({window} tokens, on {layers} of {spec.num_layers} layers) is priced as full attention" in notes[0]
    plain = {k: v for k, v in fields.items() if k not in ("sliding_window", "sliding_window_pattern", "layer_types",
                                                          "use_sliding_window", "max_window_layers")}
    assert spec.num_params == load_model(_config(tmp_path, plain)).num_params  # the window prices nothing


def test_sliding_window_fields_are_checked(tmp_path):
    for bad, needle in (({"sliding_window": 0}, "sliding_window is 0, expected a whole number >= 1"),
                        ({"sliding_window": 4096.0}, "sliding_window is 4096.0"),
                        ({"use_sliding_window": "yes"}, "use_sliding_window is 'yes', expected true or false"),
                        ({"sliding_window_pattern": 0}, "sliding_window_pattern is 0"),
                        ({"max_window_layers": -1}, "max_window_layers is -1, expected a whole number >= 0")):
        with pytest.raises(ConfigError, match=re.escape(needle)):
            load_model(_config(tmp_path, {**MISTRAL_7B_V01, **bad}))
    with pytest.raises(ConfigError, match="num_sliding_layers 33 is more than the 32 layers"):
        load_model(_config(tmp_path, {**MISTRAL_7B_V01, "layer_types": ["sliding_attention"] * 33}))
