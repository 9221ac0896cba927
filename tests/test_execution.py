import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmsim.errors import ConfigError, PlanError
from llmsim.execution import ops
from llmsim.execution.memory import plan_memory
from llmsim.execution.model import ExecutionModel, ParallelPlan
from llmsim.hardware.attention import (decode_attention_s, decode_memory_rate, decode_stream_s, prefill_attention_s,
                                       prefill_tiles)
from llmsim.hardware.profile import PROFILES_DIR, load_profile, profile_files
from llmsim.hardware.roofline import (all_gather_s, all_reduce_s, custom_all_reduce_factor, custom_all_reduce_rounds,
                                      op_time_s)
from llmsim.models import load_model

LLAMA7 = load_model("Llama-2-7B")
A100 = load_profile("a100-80gb")


def by_name(op_list):
    return {op.name: op for op in op_list}


def test_layer_flops_and_bytes_by_hand():
    # Llama-2-7B, TP=1, 100 tokens, fp16: hand-computed from the shapes.
    s = ops.ShardShapes.of(LLAMA7, 1)
    layer = by_name(ops.dense_layer_ops(s, 100))
    assert layer["attn_pre_proj"].flops == 2 * 100 * 4096 * (3 * 4096)
    assert layer["attn_pre_proj"].num_bytes == (100 * 4096 + 4096 * 12288 + 100 * 12288) * 2
    assert layer["mlp_up_proj"].flops == 2 * 100 * 4096 * 2 * 11008
    assert layer["mlp_down_proj"].num_bytes == (100 * 11008 + 11008 * 4096 + 100 * 4096) * 2
    assert layer["input_layernorm"].num_bytes == (2 * 100 * 4096 + 4096) * 2


def test_tensor_parallel_shards_the_weights():
    s1, s4 = ops.ShardShapes.of(LLAMA7, 1), ops.ShardShapes.of(LLAMA7, 4)
    q1 = by_name(ops.dense_layer_ops(s1, 1))["attn_pre_proj"]
    q4 = by_name(ops.dense_layer_ops(s4, 1))["attn_pre_proj"]
    assert q4.flops == pytest.approx(q1.flops / 4)
    # Llama-2-70B has 8 KV heads: at TP=16 each shard still keeps one whole KV head.
    s = ops.ShardShapes.of(load_model("Llama-2-70B"), 16)
    assert s.kv == 128


def test_attention_flops_by_hand():
    s = ops.ShardShapes.of(LLAMA7, 1)
    decode = ops.decode_attention(s, num_decode=4, kv_tokens=4000)
    assert decode.flops == 4 * 32 * 128 * 4000
    assert decode.num_bytes == (2 * 4000 * 4096 + 2 * 4 * 4096 + 2 * 4 * 4096) * 2
    prefill = ops.prefill_attention(s, ((10, 0),))
    assert prefill.flops == 4 * 32 * 128 * 10 * 5.5  # causal: 5.5 keys per query on average


def _tile_units_by_enumeration(new, cached, g, block_m, block_n):
    tiles = -(-new * g // block_m)
    units = 0
    for j in range(tiles):
        last_token = min(new - 1, ((j + 1) * block_m - 1) // g)  # rows are (token, head of the group) pairs
        units += -(-(cached + last_token + 1) // block_n)
    return tiles, units


@settings(max_examples=300, deadline=None)
@given(new=st.integers(1, 5000), cached=st.integers(0, 20000), g=st.integers(1, 16),
       block=st.sampled_from([(128, 128), (64, 128), (128, 64), (192, 128), (128, 160)]))
def test_prefill_tile_units_closed_form_equals_enumeration(new, cached, g, block):
    assert ops.chunk_tile_units(new, cached, g, *block) == _tile_units_by_enumeration(new, cached, g, *block)


def test_prefill_attention_grid_by_hand():
    # Llama-2-70B at TP 8: 8 query heads over 1 KV head per GPU. FlashAttention 3 packs the group: a 128-row
    # tile holds 16 tokens x 8 heads; a 256-token chunk after 100 cached tokens has 16 tiles, tile j seeing
    # 100 + 16 (j + 1) keys in 128-key blocks: 1 unit for j = 0, 2 for j = 1-8, 3 for j = 9-15: 1 + 16 + 21.
    s = ops.ShardShapes.of(load_model("Llama-2-70B"), 8)
    assert ops.prefill_attention_grid(s, ((256, 100),), 128, 128, True) == (16, 38, 3)
    # FlashAttention 2 (no packing): each of the 8 heads has 4 tiles of 64 tokens seeing 164, 228, 292, 356 keys.
    assert ops.prefill_attention_grid(s, ((256, 100),), 64, 128, False) == (8 * 4, 8 * (2 + 2 + 3 + 3), 3)
    # ... except for single-token queries, whose GQA group it packs (seqlenq_ngroups_swapped): 1 tile each.
    assert ops.prefill_attention_grid(s, ((1, 300), (1, 10)), 64, 128, False) == (2, 3 + 1, 3)


def test_flash_attention_3_takes_64_row_tiles_for_short_queries():
    """FlashAttention 3 (``use_one_mma_wg``, ``hopper/heuristics.h``) runs one MMA warpgroup, 64-row tiles, when
    the batch's longest query times the query heads per KV head is at most 64 rows: 64 x 128 for 16-bit KV, 64 x 96
    for its FP8 kernel (``tile_size_fwd_sm90``). The execution model counts the grid in those tiles."""
    h100, a100 = load_profile("h100-sxm"), load_profile("a100-80gb")
    fit, fp8 = h100.prefill_attention, h100.prefill_attention_8bit_kv
    assert prefill_tiles(fit, 8, 8) == (64, 128) and prefill_tiles(fit, 9, 8) == (128, 128)
    assert prefill_tiles(fp8, 1, 64) == (64, 96) and prefill_tiles(fp8, 64, 2) == (128, 160)
    assert prefill_tiles(a100.prefill_attention, 1, 1) == (a100.prefill_attention.block_m,
                                                           a100.prefill_attention.block_n)  # FlashAttention 2
    ex = ExecutionModel(load_model("Llama-2-70B"), h100, ParallelPlan(tp=8))  # 8 query heads over 1 KV head
    for chunks, tiles in ((((8, 100),) * 4, (64, 128)), (((8, 100), (9, 0)), (128, 128))):
        op = ops.prefill_attention(ex.shapes, chunks)
        grid = ops.prefill_attention_grid(ex.shapes, chunks, *tiles, True)
        cold = sum(2 * cached for _, cached in chunks) * ex.shapes.kv * ex.shapes.kv_dtype_bytes
        assert ex._prefill_attention_s(op, chunks) == prefill_attention_s(
            fit, h100.num_sms, ex.act_peak_flops, ex.bandwidth, op.num_bytes, 128, 8, *grid, 0.0, h100.l2_cache_bytes,
            cold, tiles[0] * tiles[1])


def test_roofline_regimes():
    ex = ExecutionModel(LLAMA7, A100, ParallelPlan())
    small = ex.iteration((), 1, 1000, 1)
    # One decode token: bound by reading ~13.5 GB of weights at 2 TB/s -> a few ms.
    assert LLAMA7.weight_bytes / A100.memory_bandwidth_bytes_per_s < small.time_s < 3 * LLAMA7.weight_bytes / 2.039e12
    big = ex.iteration(((4096, 0),), 0, 0, 1)
    # A 4k-token prefill is compute bound: 2 * params * tokens FLOPs, within a factor of 2 of peak time.
    ideal = 2 * LLAMA7.num_params * 4096 / A100.peak("fp16")
    assert ideal < big.time_s < 2.5 * ideal


def test_decode_iteration_is_the_general_path():
    ex = ExecutionModel(LLAMA7, A100, ParallelPlan(tp=2))
    assert ex.decode_iteration(37, 12345) == ex.iteration((), 37, 12345, 37)
    # The cached decode-attention path is exactly ops.decode_attention through the fitted kernel model
    # (or, for a profile without one, through the roofline).
    op = ops.decode_attention(ex.shapes, 37, 12345)
    fit = A100.decode_attention
    kv_heads = ex.shapes.kv_heads
    mha = kv_heads == ex.shapes.num_heads  # Llama-2-7B: MHA, which A100's kernel does not split
    assert mha and fit.gqa_only_split_kv
    layer_s = decode_attention_s(fit, decode_stream_s(fit, 37, kv_heads), op.num_bytes,
                                 decode_memory_rate(fit, A100.memory_bandwidth_bytes_per_s, 37, kv_heads, mha), mha)
    assert ex._decode_attention(37, 12345) == pytest.approx((32 * layer_s, 32 * op.flops * 2, 32 * op.num_bytes * 2),
                                                            rel=1e-12)
    roofline = ExecutionModel(LLAMA7, A100.model_copy(update={"decode_attention": None}), ParallelPlan(tp=2))
    assert roofline._decode_attention(37, 12345) == (32 * roofline.op_cost(op), 32 * op.flops * 2,
                                                     32 * op.num_bytes * 2)
    for model in (ex, roofline):  # decode runs inline the same arithmetic: bit for bit
        times, flops, num_bytes = model.decode_run(37, 12345, 5)
        for j in range(5):
            assert (times[j], flops[j], num_bytes[j]) == tuple(model.decode_iteration(37, 12345 + 37 * j))


def test_flash_attention_2_packing_copies_cost_where_the_reshape_copies():
    """FlashAttention 2 (A100) packs a GQA decode's query group into the query rows by reshaping q and the output
    on the host side; that is a copy unless the batch or the KV heads per GPU are 1. The copies are charged to
    pure-decode steps of GQA models with 2+ KV heads per GPU and 2+ sequences, and nowhere else: not to MHA
    (Llama-2-7B), not to one KV head per GPU (Llama-3-70B at TP 8), not to a mixed step (its varlen call has
    prefill rows, so no packing), not on H100 (FlashAttention 3 packs inside the kernel)."""
    fit = A100.decode_attention
    assert fit.gqa_only_split_kv and fit.swapped_copy_s > 0
    bw = A100.memory_bandwidth_bytes_per_s

    def layer_s(ex, batch, kv_tokens, pure):
        return ex._decode_attention(batch, kv_tokens, pure)[0] / ex.model.num_layers

    llama3 = ExecutionModel(load_model("Llama-3-8B"), A100, ParallelPlan(tp=1))  # 32 query / 8 KV heads
    s = llama3.shapes
    for batch in (2, 37):
        copy_s = fit.swapped_copy_s + 4.0 * batch * s.num_heads * s.head_dim * s.dtype_bytes / bw
        assert layer_s(llama3, batch, 1000 * batch, True) == pytest.approx(
            layer_s(llama3, batch, 1000 * batch, False) + copy_s, rel=1e-12)
    assert layer_s(llama3, 1, 1000, True) == layer_s(llama3, 1, 1000, False)  # batch 1: a view
    for ex in (ExecutionModel(LLAMA7, A100, ParallelPlan(tp=1)),  # MHA: no packing
               ExecutionModel(load_model("Llama-3-70B"), A100, ParallelPlan(tp=8)),  # 1 KV head per GPU: a view
               ExecutionModel(load_model("Llama-3-8B"), load_profile("h100-sxm"), ParallelPlan(tp=1))):
        assert layer_s(ex, 37, 37000, True) == layer_s(ex, 37, 37000, False)
    # A mixed step's decodes run without the copies; a pure-decode step (stepped or fast-forwarded) with them.
    mixed = llama3.iteration(((100, 0),), 37, 37000, 38)
    plain = ExecutionModel(load_model("Llama-3-8B"),
                           A100.model_copy(update={"decode_attention": fit.model_copy(update={"swapped_copy_s": None})}),
                           ParallelPlan(tp=1))
    assert mixed == plain.iteration(((100, 0),), 37, 37000, 38)
    assert llama3.decode_iteration(37, 37000).time_s > plain.decode_iteration(37, 37000).time_s
    assert llama3.decode_run(37, 37000, 3)[0] == [llama3.decode_iteration(37, 37000 + 37 * j).time_s for j in range(3)]


def test_flash_attention_2_packs_a_prefill_batch_of_single_tokens_with_the_same_copies():
    """A prefill batch whose chunks are all one token (prefix-cache hits that leave one token to compute) takes
    FlashAttention 2's packed single-token path too, and pays its copies where a decode would: 2+ sequences over
    2+ KV heads of a GQA model; not with a longer chunk in the batch, one sequence, MHA, or on H100."""
    fit = A100.prefill_attention
    assert not fit.pack_gqa and fit.swapped_copy_s > 0
    plain_profile = A100.model_copy(update={"prefill_attention": fit.model_copy(update={"swapped_copy_s": None})})
    bw = A100.memory_bandwidth_bytes_per_s

    def attention_s(ex, chunks):
        op = ops.prefill_attention(ex.shapes, chunks)
        return ex._prefill_attention_s(op, chunks)

    llama3, plain = (ExecutionModel(load_model("Llama-3-8B"), p, ParallelPlan(tp=1)) for p in (A100, plain_profile))
    s = llama3.shapes
    ones = ((1, 700), (1, 1500), (1, 90))
    copy_s = fit.swapped_copy_s + 4.0 * 3 * s.num_heads * s.head_dim * s.dtype_bytes / bw
    assert attention_s(llama3, ones) == pytest.approx(attention_s(plain, ones) + copy_s, rel=1e-12)
    for chunks in (((1, 700),), ((1, 700), (2, 1500))):  # one sequence: a view; a 2-token chunk: no packing
        assert attention_s(llama3, chunks) == attention_s(plain, chunks)
    for model, tp in (("Llama-2-7B", 1), ("Llama-3-70B", 8)):  # MHA; one KV head per GPU (a view)
        assert attention_s(ExecutionModel(load_model(model), A100, ParallelPlan(tp=tp)), ones) == \
            attention_s(ExecutionModel(load_model(model), plain_profile, ParallelPlan(tp=tp)), ones)
    # FlashAttention 3 (H100) packs inside the kernel: no copies even with a copy cost in its fit.
    h100 = load_profile("h100-sxm")
    with_copies = h100.model_copy(update={"prefill_attention": h100.prefill_attention.model_copy(
        update={"swapped_copy_s": 1e-5})})
    assert h100.prefill_attention.pack_gqa
    assert attention_s(ExecutionModel(load_model("Llama-3-8B"), with_copies, ParallelPlan(tp=1)), ones) == \
        attention_s(ExecutionModel(load_model("Llama-3-8B"), h100, ParallelPlan(tp=1)), ones)


@pytest.mark.parametrize("profile", [A100, A100.model_copy(update={"decode_attention": None, "prefill_attention": None})],
                         ids=["fitted attention", "roofline attention"])
def test_time_factors_scale_each_kernel_group_and_nothing_else(profile):
    """hardware.time_factors: a group's factor multiplies exactly that group's time (decode runs too); factors of
    1 change nothing, bit for bit."""
    base = ExecutionModel(LLAMA7, profile, ParallelPlan(tp=2))
    ones = ExecutionModel(LLAMA7, profile, ParallelPlan(tp=2), time_factors={"gemm": 1.0, "attention_decode": 1.0})
    batch = (((300, 200),), 37, 12345, 38)
    assert ones.iteration(*batch) == base.iteration(*batch)
    assert ones.decode_run(37, 12345, 4) == base.decode_run(37, 12345, 4)
    attn = ExecutionModel(LLAMA7, profile, ParallelPlan(tp=2), time_factors={"attention_decode": 2.0})
    assert attn._decode_attention(37, 12345)[0] == pytest.approx(2 * base._decode_attention(37, 12345)[0], rel=1e-12)
    assert attn._fixed(38, 38) == base._fixed(38, 38)  # nothing else moves
    times, _, _ = attn.decode_run(37, 12345, 3)
    assert times == [attn.decode_iteration(37, 12345 + 37 * j).time_s for j in range(3)]
    gemm = ExecutionModel(LLAMA7, profile, ParallelPlan(tp=2), time_factors={"gemm": 1.5})
    linear = [op for op in ops.dense_layer_ops(base.shapes, 64) if op.kind == "linear"]
    assert sum(map(gemm.op_cost, linear)) == pytest.approx(1.5 * sum(map(base.op_cost, linear)), rel=1e-12)
    comm = ExecutionModel(LLAMA7, profile, ParallelPlan(tp=2), time_factors={"collective": 3.0})
    extra = comm._fixed(64, 1).time_s - base._fixed(64, 1).time_s
    # Two all-reduces a layer and the embedding's, and the logits' all-gather of the one sampling token.
    assert extra == pytest.approx(2.0 * ((32 * 2 + 1) * all_reduce_s(base._custom_link, 64 * 4096 * 2, 2, True)
                                         + all_gather_s(profile.all_gather, 32000 * 2, 2)), rel=1e-9)


def test_vocab_parallel_embedding_and_logits_collectives():
    """Under TP the embedding and the LM head are vocabulary-parallel, as vLLM's VocabParallelEmbedding and
    LogitsProcessor run them: the embedding's output is all-reduced (its part of the step's fixed cost) and the
    sampling tokens' logits are all-gathered (NCCL; the fitted all_gather link inside a node, the TP all-reduce link
    where the profile has none), num_samples x vocabulary x activation bytes; at TP 1 neither exists."""
    from llmsim.calibration.predict import link_s

    slow = A100.model_copy(update={"all_gather": A100.all_gather.model_copy(update={"latency_s": 1.0})})
    for tokens, samples in ((64, 1), (300, 0), (38, 38)):
        assert ExecutionModel(LLAMA7, slow, ParallelPlan(tp=1))._fixed(tokens, samples) == \
            ExecutionModel(LLAMA7, A100, ParallelPlan(tp=1))._fixed(tokens, samples)
        extra = (ExecutionModel(LLAMA7, slow, ParallelPlan(tp=2))._fixed(tokens, samples).time_s
                 - ExecutionModel(LLAMA7, A100, ParallelPlan(tp=2))._fixed(tokens, samples).time_s)
        assert extra == pytest.approx(1.0 - A100.all_gather.latency_s if samples else 0.0, abs=1e-12)
    for tp in (2, 4, 8):
        ex = ExecutionModel(LLAMA7, A100, ParallelPlan(tp=tp))
        logits_bytes = 38 * 32000 * 2  # the whole vocabulary's bf16 logits of 38 sampling tokens
        link = A100.all_gather
        # NCCL's ring: a fixed latency, n - 1 steps of the per-step latency, (n - 1) / n of the result received.
        want = (link.latency_s + (tp - 1) * link.peer_latency_s
                + (tp - 1) / tp * logits_bytes / link.bandwidth_bytes_per_s)
        assert ex._sample_part(38)[-1] == (pytest.approx(want, rel=1e-12), 0.0, 0.0)
        assert all_gather_s(link, logits_bytes, tp) == pytest.approx(float(link_s(
            "all_gather", logits_bytes, tp, link.latency_s, link.bandwidth_bytes_per_s, link.peer_latency_s)), rel=1e-12)
    assert A100.all_gather.peer_latency_s > 0 and A100.all_reduce.peer_latency_s > 0
    bare = ExecutionModel(LLAMA7, A100.model_copy(update={"all_gather": None}), ParallelPlan(tp=2))
    link = A100.all_reduce
    want = link.latency_s + link.peer_latency_s + 0.5 * 38 * 32000 * 2 / link.bandwidth_bytes_per_s
    assert bare._sample_part(38)[-1][0] == pytest.approx(want, rel=1e-12)
    assert len(ExecutionModel(LLAMA7, A100, ParallelPlan(tp=1))._sample_part(38)) == 2  # final norm, LM head
    # The embedding's all-reduce: the embedding part of the step, which the first pipeline stage runs.
    ex = ExecutionModel(LLAMA7, A100, ParallelPlan(tp=2))
    emb = ex.op_cost(ops.embedding(ex.shapes, 64))
    custom = all_reduce_s(A100.all_reduce_custom, 64 * 4096 * 2, 2, True)
    assert ex._token_part(64)[3] == pytest.approx(emb + custom, rel=1e-12)
    one = ExecutionModel(LLAMA7, A100, ParallelPlan(tp=1))
    assert one._token_part(64)[3] == one.op_cost(ops.embedding(one.shapes, 64))


def test_tp_and_pp_add_communication():
    t1 = ExecutionModel(LLAMA7, A100, ParallelPlan(tp=1)).iteration(((512, 0),), 0, 0, 1).time_s
    t2 = ExecutionModel(LLAMA7, A100, ParallelPlan(tp=2)).iteration(((512, 0),), 0, 0, 1).time_s
    assert t2 < t1  # halving the work outweighs the all-reduces
    p2 = ExecutionModel(LLAMA7, A100, ParallelPlan(pp=2)).iteration(((512, 0),), 0, 0, 1).time_s
    assert p2 > t1  # without micro-batching, stages run one after another plus the hand-off


def test_vllm_custom_all_reduce_kernel_by_size():
    """vLLM's custom all-reduce (csrc/custom_all_reduce.cuh, full NVLink): the one-stage kernel reads every peer's
    whole buffer (n - 1 bytes per byte) for 2 GPUs, under 512 KiB on 4 and under 256 KiB on 8; the two-stage one
    moves 2 (n - 1) / n in two rounds; each round's barrier pays a latency per peer. A step's all-reduces take that
    kernel under the custom limit (should_custom_ar: inp_size < max_size), NCCL's ring from it."""
    assert custom_all_reduce_factor(2, 64 << 20) == 1.0
    assert custom_all_reduce_factor(4, (512 << 10) - 1) == 3.0 and custom_all_reduce_factor(4, 512 << 10) == 1.5
    assert custom_all_reduce_factor(8, (256 << 10) - 1) == 7.0 and custom_all_reduce_factor(8, 256 << 10) == 1.75
    h100 = load_profile("h100-sxm")
    ex = ExecutionModel(LLAMA7, h100, ParallelPlan(tp=8))
    bare = ExecutionModel(LLAMA7, h100.model_copy(update={"all_reduce_custom": None}), ParallelPlan(tp=8))
    for tokens in (4, 64, 1024, 2048):  # 32 KiB (one-stage), 512 KiB (two-stage), 8 MiB and 16 MiB (NCCL)
        activation_bytes = tokens * 4096 * 2
        custom = activation_bytes < h100.custom_all_reduce_max_bytes
        assert custom == (tokens < 1024)
        link = h100.all_reduce_custom if custom else h100.all_reduce
        got = ex._fixed(tokens, 0).time_s - bare._fixed(tokens, 0).time_s
        # Two a layer and the embedding's.
        want = (LLAMA7.num_layers * 2 + 1) * (all_reduce_s(link, activation_bytes, 8, custom)
                                              - all_reduce_s(h100.all_reduce, activation_bytes, 8))
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12)
    link = h100.all_reduce_custom
    assert link.peer_latency_s > 0
    round_s = link.latency_s + 7 * link.peer_latency_s  # a barrier over 7 peers
    assert all_reduce_s(link, 32 << 10, 8, True) == pytest.approx(round_s + 7 * (32 << 10) / link.bandwidth_bytes_per_s)
    # The two-stage kernel's all-gather reads what its reduce-scatter wrote, after a barrier: two rounds of reads
    # from the peers, each paying the round's latency.
    assert custom_all_reduce_rounds(8, (256 << 10) - 1) == 1.0 and custom_all_reduce_rounds(8, 256 << 10) == 2.0
    assert all_reduce_s(link, 512 << 10, 8, True) == pytest.approx(
        2 * round_s + 1.75 * (512 << 10) / link.bandwidth_bytes_per_s)
    assert all_reduce_s(link, 512 << 10, 2, True) == pytest.approx(
        link.latency_s + link.peer_latency_s + (512 << 10) / link.bandwidth_bytes_per_s)


def test_nccl_ring_all_reduce_pays_a_latency_per_step():
    """NCCL's ring all-reduce takes 2 (n - 1) steps, each with its per-step latency (the A100 fit on 2 and 4 GPUs
    has one; 8 GPUs are held out): 14 steps at 8 GPUs, 2 at 2. With none (H100's fit), the plain alpha-beta."""
    a100 = load_profile("a100-80gb")
    link = a100.all_reduce
    assert link.peer_latency_s > 0
    size = 16 << 20  # a 16 MiB message: NCCL's, above vLLM's custom kernel's limit
    for gpus in (2, 4, 8):
        steps = 2 * (gpus - 1)
        want = link.latency_s + steps * link.peer_latency_s + steps / gpus * size / link.bandwidth_bytes_per_s
        assert all_reduce_s(link, size, gpus) == pytest.approx(want, rel=1e-12)
    h100 = load_profile("h100-sxm").all_reduce
    assert all_reduce_s(h100, size, 8) == h100.latency_s + 1.75 * size / h100.bandwidth_bytes_per_s


def test_nccl_ring_all_gather_pays_a_latency_per_step(tmp_path):
    """NCCL's ring all-gather takes n - 1 steps, each with its per-step latency, fitted where the rows span two GPU
    counts or more (aiconfigurator's 2 and 4; 8 held out): its small messages take 5.3 / 7.2 / 10.4 us on 2 / 4 / 8
    H100s, which one latency (7.4 us, fitted on 2 and 4) put 29% fast at 8. The fit recovers a known per-step
    latency from exact rows."""
    import numpy as np
    import pandas as pd

    from llmsim.calibration.fit import fit_link
    from llmsim.calibration.measurements import read_measurements
    from llmsim.calibration.predict import Rows, link_s

    h100 = load_profile("h100-sxm").all_gather
    assert h100.peer_latency_s > 0
    for gpus in (2, 4, 8):
        want = (h100.latency_s + (gpus - 1) * h100.peer_latency_s
                + (gpus - 1) / gpus * 4096 / h100.bandwidth_bytes_per_s)
        assert all_gather_s(h100, 4096, gpus) == pytest.approx(want, rel=1e-12)
    sizes, gpus = np.repeat([512.0, 65536.0, 8 << 20, 64 << 20], 2), np.tile([2, 4], 4)
    truth = link_s("all_gather", sizes, gpus, 4e-6, 200e9, 1e-6)
    frame = pd.DataFrame({"device": "h100-sxm", "op": "all_gather", "dtype": "bf16", "size_bytes": sizes,
                          "num_workers": gpus, "devices_per_node": 8, "median_ms": truth * 1e3})
    path = tmp_path / "ag.csv"
    frame.to_csv(path, index=False)
    rows = Rows(read_measurements(path))
    link = fit_link(rows, np.ones(len(rows), dtype=bool), "all_gather")
    assert (link.latency_s, link.bandwidth_bytes_per_s, link.peer_latency_s) == pytest.approx((4e-6, 200e9, 1e-6),
                                                                                              rel=1e-3)
    one_count = fit_link(rows, gpus == 2, "all_gather")  # one GPU count: the steps cannot be told apart
    assert one_count.peer_latency_s == 0.0


def test_an_8bit_kv_cache_runs_its_own_attention_fits():
    """H100 has attention kernels fitted on fp8-KV measurements (slower per byte than bf16's); A100 has none, so
    an fp8 KV cache there runs the 16-bit fits at the 8-bit bytes."""
    h100 = load_profile("h100-sxm")
    assert h100.decode_attention_8bit_kv is not None and h100.prefill_attention_8bit_kv is not None
    fp8_kv = load_model("Llama-2-7B", "bf16", kv_cache_dtype="fp8")
    ex = ExecutionModel(fp8_kv, h100, ParallelPlan(tp=1))
    assert ex._decode_attention_constants(32)[3] is h100.decode_attention_8bit_kv
    op = ops.prefill_attention(ex.shapes, ((1024, 0),))
    fit = h100.prefill_attention_8bit_kv
    grid = ops.prefill_attention_grid(ex.shapes, ((1024, 0),), fit.block_m, fit.block_n, fit.pack_gqa)
    assert ex._prefill_attention_s(op, ((1024, 0),)) == prefill_attention_s(
        fit, 132, ex.act_peak_flops, ex.bandwidth, op.num_bytes, 128, 32, *grid, 0.0, h100.l2_cache_bytes)
    assert ExecutionModel(LLAMA7, h100, ParallelPlan(tp=1))._decode_attention_constants(32)[3] is h100.decode_attention
    assert A100.decode_attention_8bit_kv is None
    assert ExecutionModel(fp8_kv, A100, ParallelPlan(tp=1))._decode_attention_constants(32)[3] is A100.decode_attention


def test_memory_plan_and_fit_error():
    kw = dict(block_size=16, gpu_memory_utilization=0.9, max_num_batched_tokens=8192, max_num_seqs=256,
              runtime_reserve_gib=1.0, max_model_len=4096)
    plan = plan_memory(LLAMA7, A100, ParallelPlan(), **kw)
    assert plan.weights_bytes == pytest.approx(LLAMA7.weight_bytes, rel=1e-9)
    assert plan.kv_bytes_per_block == 16 * LLAMA7.kv_bytes_per_token()
    # 72 GiB usable - 12.6 GiB weights - 0.9 GiB activations - 1 GiB reserve = 57.5 GiB at 8 MiB per block
    # (vLLM reports ~7,000+ blocks for this setup).
    assert plan.num_blocks == int((0.9 * 80 * 2**30 - plan.weights_bytes - plan.activation_bytes - 2**30) // 2**23)
    assert 7000 < plan.num_blocks < 7600
    with pytest.raises(PlanError, match="does not fit"):
        plan_memory(load_model("Llama-2-70B"), A100, ParallelPlan(), **kw)
    assert plan_memory(load_model("Llama-2-70B"), A100, ParallelPlan(tp=4), **kw).num_blocks > 0
    # PP 3: vLLM gives the stages 11, 11 and 10 of the 32 layers; the first also holds the embedding (a 250 MiB
    # table), which leaves it room for the fewest blocks of 11 layers; the count is that stage's.
    staged = plan_memory(LLAMA7, A100, ParallelPlan(pp=3), **kw)
    embedding = LLAMA7.vocab_size * LLAMA7.hidden_size * LLAMA7.act_bytes
    assert staged.weights_bytes == pytest.approx(11 * LLAMA7.params_per_layer * LLAMA7.dtype_bytes + embedding)
    assert staged.kv_bytes_per_block == pytest.approx(11 / 32 * plan.kv_bytes_per_block)
    assert staged.num_blocks == int((0.9 * 80 * 2**30 - staged.weights_bytes - (plan.activation_bytes - 256 * 32000 * 4)
                                     - 2**30) // staged.kv_bytes_per_block)


def test_unknown_device_and_dtype():
    with pytest.raises(ConfigError, match="allowed: .*a100-80gb"):
        load_profile("b200")
    with pytest.raises(ConfigError, match="no peak FLOPS for dtype"):
        load_profile("t4").peak("bf16")


def test_precision_as_engines_have_it():
    """FP8 weights halve weight bytes and run GEMMs at the FP8 peak; activations (and TP all-reduce payloads)
    stay 16-bit; the KV cache has its own dtype."""
    h100 = load_profile("h100-sxm")
    bf16 = load_model("Llama-2-7B", "bf16")
    fp8 = load_model("Llama-2-7B", "fp8")
    fp8_kv8 = load_model("Llama-2-7B", "fp8", kv_cache_dtype="fp8")
    assert (fp8.act_dtype, fp8.kv_dtype, fp8_kv8.kv_dtype) == ("bf16", "bf16", "fp8")
    a, b = ops.ShardShapes.of(bf16, 2), ops.ShardShapes.of(fp8, 2)
    assert (b.dtype_bytes, b.weight_bytes, b.kv_dtype_bytes, b.gemm_kind) == (2, 1, 2, "linear_fp8")
    qkv_a, qkv_b = (by_name(ops.dense_layer_ops(s, 64))["attn_pre_proj"] for s in (a, b))
    h, n_out = 4096, (4096 + 2 * 4096) // 2
    assert qkv_a.num_bytes - qkv_b.num_bytes == h * n_out  # one byte less per weight, activations unchanged
    head_a, head_b = ops.lm_head(a, 8)[1], ops.lm_head(b, 8)[1]
    assert head_a == head_b  # vLLM leaves the LM head unquantised
    ex_a, ex_b = (ExecutionModel(m, h100, ParallelPlan(tp=2)) for m in (bf16, fp8))
    assert ex_b.peak_flops == h100.peak("fp8") and ex_b.act_peak_flops == h100.peak("bf16")
    # FP8 GEMMs on their own fitted curve at the FP8 peak; attention at the activations' peak.
    bw = h100.memory_bandwidth_bytes_per_s
    assert (qkv_b.gemm_k, qkv_b.gemm_n) == (h, n_out)
    fp8_curve = h100.efficiency["linear_fp8"]
    assert ex_b.op_cost(qkv_b) == op_time_s(fp8_curve, h100.peak("fp8"), bw, qkv_b.flops, qkv_b.num_bytes,
                                            qkv_b.num_tokens, h, n_out, quant_bytes=qkv_b.quant_bytes)
    # ... after quantizing their 16-bit input as a served engine does, one fused pass: the absolute maximum, then
    # read again and written as FP8 (5 bytes per element), at the curve's fitted bandwidth fraction.
    assert (qkv_a.quant_bytes, qkv_b.quant_bytes) == (0.0, 64 * h * 5.0) and head_b.quant_bytes == 0.0
    assert ex_b.op_cost(qkv_b) - op_time_s(fp8_curve, h100.peak("fp8"), bw, qkv_b.flops, qkv_b.num_bytes,
                                           qkv_b.num_tokens, h, n_out) == pytest.approx(
        qkv_b.quant_bytes / (bw * fp8_curve.quant_memory_eff), rel=1e-9)
    mlp = by_name(ops.dense_layer_ops(b, 64))
    gate = by_name(ops.dense_layer_ops(ops.ShardShapes.of(load_model("Mixtral-8x7B", "fp8"), 2), 64))["moe_gate"]
    assert (gate.kind, gate.quant_bytes, gate.num_bytes) == ("linear", 0.0, (64 * 4096 + 64 * 8 + 4096 * 8) * 2)
    assert (mlp["mlp_up_proj"].quant_bytes, mlp["mlp_down_proj"].quant_bytes) == (64 * h * 5.0, 64 * 11008 // 2 * 5.0)
    rope = by_name(ops.dense_layer_ops(b, 64))["attn_rope"]
    assert ex_b.op_cost(rope) == op_time_s(h100.efficiency["rope"], h100.peak("bf16"), bw, rope.flops,
                                           rope.num_bytes, rope.num_tokens)
    plan = dict(block_size=16, gpu_memory_utilization=0.9, max_num_batched_tokens=8192, max_num_seqs=256,
                runtime_reserve_gib=1.0, max_model_len=4096)
    mem_a, mem_b, mem_c = (plan_memory(m, h100, ParallelPlan(tp=1), **plan) for m in (bf16, fp8, fp8_kv8))
    assert mem_b.weights_bytes < 0.55 * mem_a.weights_bytes
    assert mem_c.kv_bytes_per_block == mem_b.kv_bytes_per_block / 2 and mem_c.num_blocks > 1.9 * mem_b.num_blocks
    assert fp8_kv8.kv_bytes_per_token() == bf16.kv_bytes_per_token() / 2


def test_block_scaled_fp8_runs_its_own_kernels_where_a_profile_has_them():
    """Block-scaled FP8 checkpoints (128 x 128 weight blocks; DeepSeek-V3's, Qwen3's) run vLLM's block-FP8 GEMM
    and fused MoE, which aiconfigurator measured at 1.3-2x the per-tensor FP8 kernels' time on H100: priced as
    per-tensor FP8 they came out that much fast. A profile without those curves refuses them by name."""
    h100 = load_profile("h100-sxm")
    block, fp8 = load_model("Llama-3-8B", "fp8_block"), load_model("Llama-3-8B", "fp8")
    s = ops.ShardShapes.of(block, 1)
    assert (s.weight_bytes, s.dtype_bytes, s.gemm_kind, s.moe_kind) == (1, 2, "linear_fp8_block", "moe_fp8_block")
    ex_block, ex_fp8 = (ExecutionModel(m, h100, ParallelPlan(tp=1)) for m in (block, fp8))
    assert ex_block.peak_flops == h100.peak("fp8")
    up_block, up_fp8 = (by_name(ops.dense_layer_ops(ops.ShardShapes.of(m, 1), 2048))["mlp_up_proj"]
                        for m in (block, fp8))
    assert up_block.num_bytes == up_fp8.num_bytes and up_block.flops == up_fp8.flops
    assert ex_block.op_cost(up_block) == op_time_s(h100.efficiency["linear_fp8_block"], h100.peak("fp8"),
                                                   h100.memory_bandwidth_bytes_per_s, up_block.flops,
                                                   up_block.num_bytes, up_block.num_tokens, up_block.gemm_k,
                                                   up_block.gemm_n, h100.num_sms, up_block.quant_bytes)
    assert up_block.quant_bytes == 2048 * 4096 * 3.0  # per-group scales: one pass, read 16-bit, write FP8
    steps = {t: ex_block.iteration(((t, 0),), 0, 0, 1).time_s / ex_fp8.iteration(((t, 0),), 0, 0, 1).time_s
             for t in (16, 8192)}
    assert 1.3 < steps[16] < 2.5 and 1.0 < steps[8192] < steps[16], steps  # the gap narrows as M grows
    assert ops.ShardShapes.of(load_model("Qwen3-30B-A3B", "fp8_block"), 1).moe_kind == "moe_fp8_block"
    with pytest.raises(ConfigError, match=r"mi325x has no curve for block-scaled FP8 \(linear_fp8_block"):
        ExecutionModel(block, load_profile("mi325x"), ParallelPlan(tp=1)).iteration(((512, 0),), 0, 0, 1)
    with pytest.raises(ConfigError, match=r"no peak FLOPS for dtype 'fp8' \(model.dtype fp8_block\)"):
        load_profile("a100-80gb").peak("fp8_block")


def test_moe_layer_is_one_fused_expert_kernel():
    """Mixtral at TP2: the gate, then vLLM's fused MoE kernel over the experts the tokens are routed to."""
    mixtral = load_model("Mixtral-8x7B", "bf16")
    s = ops.ShardShapes.of(mixtral, 2)
    layer = by_name(ops.dense_layer_ops(s, 4))
    assert "mlp_up_proj" not in layer and layer["moe_gate"].flops == 2 * 4 * 4096 * 8
    moe = layer["moe_experts"]
    routed, ffn = 8, 14336 // 2
    assert moe.flops == 2.0 * routed * 4096 * 2 * ffn + 5.0 * routed * ffn + 2.0 * routed * ffn * 4096
    # 4 tokens x top-2 reach all 8 experts: every expert's weights are read once.
    assert moe.num_bytes - ops.moe_experts(s, 2).num_bytes > 3 * 4096 * ffn * 2 * 3
    assert moe.num_tokens == 1.0  # each expert's GEMM gets one token
    h100 = load_profile("h100-sxm")
    # Shape terms of the first grouped GEMM, per expert (the Triton kernel tiles each expert's GEMM apart).
    assert (moe.gemm_k, moe.gemm_n) == (4096, 2 * ffn)
    # vLLM ships a tuned kernel configuration for E=8, N=7168 (TP2) on H100, none for N=14336 (TP1): the fused
    # MoE runs on the profile's ``moe`` and ``moe_untuned`` curves.
    for tp, kind in ((2, "moe"), (1, "moe_untuned")):
        op = ops.moe_experts(ops.ShardShapes.of(mixtral, tp), 4)
        ex = ExecutionModel(mixtral, h100, ParallelPlan(tp=tp))
        assert ex.op_cost(op) == op_time_s(h100.efficiency[kind], h100.peak("bf16"), h100.memory_bandwidth_bytes_per_s,
                                           op.flops, op.num_bytes, op.num_tokens, 4096, op.gemm_n)
    # A device without the tuned list (A100: no MoE measurements) runs it on the GEMM curve.
    a100 = load_profile("a100-80gb")
    assert not a100.fused_moe_tuned and "moe" not in a100.efficiency
    assert ExecutionModel(mixtral, a100, ParallelPlan(tp=2)).op_cost(moe) == op_time_s(
        a100.efficiency["linear"], a100.peak("bf16"), a100.memory_bandwidth_bytes_per_s, moe.flops, moe.num_bytes,
        moe.num_tokens, 4096, 2 * ffn)


def test_moe_default_configuration_pads_each_experts_tokens_to_its_block():
    """Without a tuned kernel configuration vLLM runs its default one: 16-row blocks while a step has no more
    tokens than experts, 64-row ones beyond; each expert's tokens are padded to the block and both grouped GEMMs
    compute the padded rows. Tuned configurations (block sizes varying with M) keep the unpadded work."""
    mixtral = load_model("Mixtral-8x7B", "bf16")
    s = ops.ShardShapes.of(mixtral, 1)
    ffn, h = 14336, 4096
    per_row = 2.0 * h * 2 * ffn + 2.0 * ffn * h  # both grouped GEMMs, one token
    for tokens, rows_per_expert, block in ((4, 1, 16), (8, 2, 16), (256, 64, 64), (320, 80, 128), (2048, 512, 512)):
        layer = by_name(ops.dense_layer_ops(s, tokens, moe_default_config=True))
        moe, plain = layer["moe_experts"], ops.moe_experts(s, tokens)
        assert plain.num_tokens == rows_per_expert and moe.num_tokens == block
        assert moe.flops - plain.flops == pytest.approx(8 * (block - rows_per_expert) * per_row)
        assert moe.num_bytes == plain.num_bytes  # padding reads no more weights
    assert ops.vllm_default_moe_block_m(8, 8) == 16 and ops.vllm_default_moe_block_m(9, 8) == 64
    # The execution model pads where the device has no tuned configuration for the shape: Mixtral's TP1 shard on
    # H100 (steps of 80 tokens a expert cost as two 64-row blocks), not its tuned TP2 shard.
    h100 = load_profile("h100-sxm")
    ex = ExecutionModel(mixtral, h100, ParallelPlan(tp=1))
    padded, plain = (sum(ex.op_cost(op) for op in ops.dense_layer_ops(s, 320, moe_default_config=pad))
                     for pad in (True, False))
    assert padded > 1.2 * plain and ex._token_part(320)[0] == padded  # one layer at TP 1: no all-reduce
    tp2 = ExecutionModel(mixtral, h100, ParallelPlan(tp=2))
    plain_tp2 = sum(tp2.op_cost(op) for op in ops.dense_layer_ops(ops.ShardShapes.of(mixtral, 2), 320))
    assert tp2._token_part(320)[0] > plain_tp2  # the all-reduces come on top of the unpadded ops
    assert ex._moe_default_config and not tp2._moe_default_config


def test_fused_moe_of_an_expert_width_not_a_multiple_of_16_runs_slower_by_the_fitted_factor():
    """Triton specializes integer arguments divisible by 16; an expert width on the GPU that is not (here 232 = 1,856
    at TP 8, as the measured 128-expert shape) costs the default-configuration curve's ``unaligned_factor`` more,
    and an aligned one (224) nothing more."""
    h100 = load_profile("h100-sxm")
    eff = h100.efficiency["moe_untuned"]
    assert eff.unaligned_factor is not None and eff.unaligned_factor > 1.2
    base = load_model("Mixtral-8x7B", "bf16")
    costs = {}
    for ffn in (8 * 232, 8 * 224):
        model = base.model_copy(update={"ffn_size": ffn})
        s = ops.ShardShapes.of(model, 8)
        op = ops.moe_experts(s, 64, ops.vllm_default_moe_block_m(64, s.num_experts))
        assert h100.fused_moe_kind(s.moe_kind, s.num_experts, s.ffn) == "moe_untuned"
        plain = op_time_s(eff, h100.peak("bf16"), h100.memory_bandwidth_bytes_per_s, op.flops, op.num_bytes,
                          op.num_tokens, op.gemm_k, op.gemm_n)
        costs[s.ffn] = ExecutionModel(model, h100, ParallelPlan(tp=8)).op_cost(op) / plain
    assert ops.moe_width_unaligned(232) and not ops.moe_width_unaligned(224)
    assert costs == {232: pytest.approx(eff.unaligned_factor), 224: 1.0}


def test_prefill_attention_cache_returns_what_it_would_compute(monkeypatch):
    """The execution model remembers a step's prefill attention by its chunks; a remembered batch costs exactly what
    a fresh model computes, and the memory is bounded (cleared at once when full)."""
    from llmsim.execution import model as model_module
    monkeypatch.setattr(model_module, "_PREFILL_CACHE_ENTRIES", 3)
    h100 = load_profile("h100-sxm")
    ex = ExecutionModel(LLAMA7, h100, ParallelPlan(tp=2))
    batches = [((512, 0),), ((512, 512), (100, 0)), ((7, 3000),), ((512, 1024),), ((512, 0),)]
    for chunks in batches + batches:
        model_module.forget_shared_costs()  # the fresh model below computes its costs anew
        assert ex.iteration(chunks, 5, 4000, 6) == ExecutionModel(LLAMA7, h100, ParallelPlan(tp=2)).iteration(
            chunks, 5, 4000, 6)
        assert len(ex._prefill_cache) <= 3


def test_execution_models_of_one_model_device_plan_and_factors_share_their_costs():
    """A sweep's points build new execution models; those of the same model, device, plan and what-if factors
    share the cost tables (a step priced by one is looked up by the next), and the costs are those a model
    alone in the process computes."""
    from llmsim.execution import model as model_module
    h100 = load_profile("h100-sxm")
    steps = [(((512, 0),), 5, 4000, 6), ((), 64, 64 * 900, 64), (((300, 1200), (17, 0)), 9, 7000, 11)]
    first = ExecutionModel(LLAMA7, h100, ParallelPlan(tp=2))
    costs = [first.iteration(*step) for step in steps]
    second = ExecutionModel(LLAMA7.model_copy(), h100, ParallelPlan(tp=2))  # equal, not the same object
    assert second._token_cache is first._token_cache and second._prefill_cache is first._prefill_cache
    assert [second.iteration(*step) for step in steps] == costs
    slower = ExecutionModel(LLAMA7, h100, ParallelPlan(tp=2), time_factors={"gemm": 1.1})
    other_plan = ExecutionModel(LLAMA7, h100, ParallelPlan(tp=1))
    assert slower._token_cache is not first._token_cache and other_plan._token_cache is not first._token_cache
    model_module.forget_shared_costs()
    alone = ExecutionModel(LLAMA7, h100, ParallelPlan(tp=2))
    assert alone._token_cache is not first._token_cache
    assert [alone.iteration(*step) for step in steps] == costs


@pytest.mark.parametrize("model,device,plan", [("Llama-2-7B", "h100-sxm", ParallelPlan(tp=2)),
                                               ("Mixtral-8x7B", "a100-80gb", ParallelPlan(tp=4, pp=2)),
                                               ("Llama-3-70B", "h100-sxm", ParallelPlan(tp=8))])
def test_prefill_flops_is_the_steps_flops_without_pricing_it(model, device, plan):
    """The summary's prefill FLOPs equal those of the step ``iteration`` prices, bit for bit, whether the step's
    costs are cached whole, cached for its token count only, or not at all (and it prices nothing)."""
    from llmsim.execution import model as model_module
    spec = load_model(model, "fp8") if model == "Llama-3-70B" else load_model(model)
    model_module.forget_shared_costs()
    ex = ExecutionModel(spec, load_profile(device), plan)
    chunks = [(1, 0), (7, 3), (512, 0), (300, 1200), (4096, 0), (1234, 8191)]
    for new, cached in chunks:  # nothing cached: priced by nothing
        ex.prefill_flops(new, cached)
    assert not ex._token_cache and not ex._fixed_cache
    for new, cached in chunks:
        ex.iteration(((new, cached),), 0, 0, 0)  # the token count's costs cached, not the step's
        assert ex.prefill_flops(new, cached) == ex.iteration(((new, cached),), 0, 0, 1).flops
        assert ex.prefill_flops(new, cached) == ex.iteration(((new, cached),), 0, 0, 1).flops  # the step's, cached
    model_module.forget_shared_costs()
    fresh = ExecutionModel(spec, load_profile(device), plan)
    assert [fresh.prefill_flops(n, c) for n, c in chunks] == [ex.iteration(((n, c),), 0, 0, 1).flops
                                                              for n, c in chunks]


@pytest.mark.parametrize("model,device,plan", [("Llama-3-8B", "a100-80gb", ParallelPlan(tp=1)),
                                               ("Mixtral-8x7B", "h100-sxm", ParallelPlan(tp=2)),
                                               ("Llama-3-70B", "h100-sxm", ParallelPlan(tp=4, pp=2))])
@pytest.mark.parametrize("cpu_overlaps", [None, False, True])
def test_a_chunk_runs_costs_are_its_steps_iterations(model, device, plan, cpu_overlaps):
    """``chunk_run_costs`` (a mixed run's chunk steps) gives each step what ``iteration`` gives it, bit for bit:
    time, FLOPs and bytes, with the decodes' KV growing a step at a time, with no CPU time, CPU time added, or
    CPU time overlapping the GPU's; steps whose costs are cached or not; and with no decodes."""
    from llmsim.execution import model as model_module
    from llmsim.execution.cpu_overhead import CpuOverhead
    spec = load_model(model, "fp8") if model == "Llama-3-70B" else load_model(model)
    cpu = None if cpu_overlaps is None else CpuOverhead(2e-3, 4e-5, 1e-5)
    steps = [(512, 0, 9), (512, 512, 9), (512, 1024, 9), (137, 1536, 10), (1, 1673, 10)]
    for num_decode, kv in ((9, 9 * 700), (0, 0)):
        samples = [n - 9 + num_decode for _, _, n in steps]
        chunk_steps = [(new, cached, n) for (new, cached, _), n in zip(steps, samples)]
        model_module.forget_shared_costs()
        ex = ExecutionModel(spec, load_profile(device), plan, cpu, bool(cpu_overlaps))
        for _ in range(2):  # cold, then from the caches
            times, flops, num_bytes = ex.chunk_run_costs(chunk_steps, num_decode, kv)
            model_module.forget_shared_costs()
            ref = ExecutionModel(spec, load_profile(device), plan, cpu, bool(cpu_overlaps))
            costs = [ref.iteration(((new, cached),), num_decode, kv + num_decode * j, n)
                     for j, (new, cached, n) in enumerate(chunk_steps)]
            assert times == [c.time_s for c in costs]
            assert flops == [c.flops for c in costs] and num_bytes == [c.num_bytes for c in costs]


def test_prefill_attention_moves_a_batch_that_fits_in_l2_faster_but_not_a_cached_prefix():
    """The L2 term (``PrefillAttentionFit.l2_speedup``): on both calibrated GPUs the fit finds about 1.6-2.2x
    for batches whose bytes fit in about half the L2 (A100 1.63x; H100 1.77x until FlashAttention 3's 64-row tiles
    for short queries, 2.14x since), and none for batches several times its size. A cached prefix's KV (written
    steps before) stays at HBM speed: with the term off it costs what it did."""
    for name in ("h100-sxm", "a100-80gb"):
        profile = load_profile(name)
        fit = profile.prefill_attention
        assert 1.5 < fit.l2_speedup < 2.2 and 0.4 < fit.l2_fraction < 0.7
        off = profile.model_copy(update={"prefill_attention": fit.model_copy(update={"l2_fraction": None})})
        on_ex, off_ex = (ExecutionModel(LLAMA7, p, ParallelPlan(tp=1)) for p in (profile, off))

        def attention_s(ex, chunks):
            return ex._prefill_attention_s(ops.prefill_attention(ex.shapes, chunks), chunks)

        small, large = ((64, 0),) * 4, ((4096, 0),) * 8  # ~12 MB and ~1.6 GB of attention traffic
        assert attention_s(on_ex, small) < attention_s(off_ex, small)
        assert attention_s(on_ex, large) == pytest.approx(attention_s(off_ex, large), rel=1e-9)
        # A chunk over a short cached prefix fits too, but only the new tokens' bytes are sped up.
        prefixed = ((64, 256),)
        op = ops.prefill_attention(on_ex.shapes, prefixed)
        block_m, block_n = prefill_tiles(fit, 64, 1)  # H100: FlashAttention 3's 64-row tiles (64 query rows)
        assert (block_m, block_n) == ((64, 128) if name == "h100-sxm" else (fit.block_m, fit.block_n))
        grid = ops.prefill_attention_grid(on_ex.shapes, prefixed, block_m, block_n, fit.pack_gqa)
        cold = 2 * 256 * on_ex.shapes.kv * on_ex.shapes.kv_dtype_bytes
        args = (fit, profile.num_sms, on_ex.act_peak_flops, on_ex.bandwidth, op.num_bytes, 128, 32, *grid, 0.0,
                profile.l2_cache_bytes)
        assert op.num_bytes < fit.l2_fraction * profile.l2_cache_bytes / 2
        assert attention_s(on_ex, prefixed) == prefill_attention_s(*args, cold, block_m * block_n)
        assert prefill_attention_s(*args, 0.0, block_m * block_n) < attention_s(on_ex, prefixed) < attention_s(
            off_ex, prefixed)
        # The speed-up never exceeds the fitted factor on the memory term, nor slows anything.
        for chunks in (((16, 0),), ((256, 0),) * 8, ((512, 128),) * 16, ((2048, 0),)):
            assert attention_s(off_ex, chunks) / fit.l2_speedup <= attention_s(on_ex, chunks) <= \
                attention_s(off_ex, chunks)


def test_a_short_kv_history_splits_less_and_decode_runs_follow_it_exactly():
    """``DecodeAttentionFit.split_keys``: a batch of fewer sequences than ``min_splits`` is split along its KV,
    into no more splits than its KV tokens per sequence / ``split_keys`` (FlashAttention never splits a few KV
    blocks), so its read rate grows with the KV length until ``min_splits``; a decode run evaluates the rate
    step by step, with the same arithmetic as single iterations, and a batch of ``min_splits`` keeps one rate."""
    for name in ("h100-sxm", "a100-80gb"):
        profile = load_profile(name)
        fit = profile.decode_attention
        assert fit.split_keys is not None
        bw = profile.memory_bandwidth_bytes_per_s
        short, long = fit.split_keys * 2, fit.split_keys * fit.min_splits * 4
        assert decode_memory_rate(fit, bw, 2, 8, False, short) < decode_memory_rate(fit, bw, 2, 8, False, long)
        assert decode_memory_rate(fit, bw, 2, 8, False, long) == decode_memory_rate(fit, bw, 2, 8, False)
        ex = ExecutionModel(load_model("Llama-3-8B"), profile, ParallelPlan(tp=1))
        assert ex._decode_attention_constants(4)[5] is None  # per step
        kv0 = 4 * int(fit.split_keys)
        run = ex.decode_run(4, kv0, 3000)
        assert run[0] == [ex.decode_iteration(4, kv0 + 4 * j).time_s for j in range(3000)]
        for kv in (kv0, kv0 + 7, 4 * long):  # the simulator's inlined rate is calibration's, exactly
            assert ex._decode_rate(4, kv) == decode_memory_rate(fit, bw, 4, ex.shapes.kv_heads, False, kv / 4)
        big = int(fit.min_splits) + 1  # at least min_splits sequences: the splits are never capped
        assert ex._decode_attention_constants(big)[5] is not None


def test_a_profile_edited_while_the_process_runs_is_read_again(tmp_path):
    """A notebook that edits its profile YAML (or the profile it is based on) and simulates again gets the edit: the
    profiles were cached by path alone, so the process kept simulating the profile as first read."""
    import os

    base = tmp_path / "base.yaml"
    base.write_text("base: h100-sxm\nmemory_bytes: 85899345920\n")
    mine = tmp_path / "mine.yaml"
    mine.write_text("base: base.yaml\nname: mine\n")
    assert load_profile(str(mine)).memory_bytes == 85899345920
    mine.write_text("base: base.yaml\nname: mine\nmemory_bytes: 42949672960\n")
    os.utime(mine, ns=(1, 1))  # a new version even within the file system's clock tick
    assert load_profile(str(mine)).memory_bytes == 42949672960
    mine.write_text("base: base.yaml\nname: mine\n")
    os.utime(mine, ns=(2, 2))
    base.write_text("base: h100-sxm\nmemory_bytes: 21474836480\n")
    os.utime(base, ns=(3, 3))
    assert load_profile(str(mine)).memory_bytes == 21474836480
    # The base re-pointed at another base: that one's edits count from then on (the chain was walked once per
    # version of the first file only, so the new base was never watched).
    other = tmp_path / "other.yaml"
    other.write_text("base: h100-sxm\nmemory_bytes: 10737418240\n")
    base.write_text("base: other.yaml\n")
    os.utime(base, ns=(4, 4))
    assert load_profile(str(mine)).memory_bytes == 10737418240
    assert profile_files(str(mine)) == (mine.resolve(), base.resolve(), other.resolve(),
                                        PROFILES_DIR / "h100-sxm.yaml")
    other.write_text("base: h100-sxm\nmemory_bytes: 5368709120\n")
    os.utime(other, ns=(5, 5))
    assert load_profile(str(mine)).memory_bytes == 5368709120
