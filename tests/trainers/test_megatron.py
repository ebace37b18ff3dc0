"""Megatron-core <-> HF mapping: hand-built shards in Megatron's layout (always), and real GPTModels on
4 gloo ranks with TP=2 x PP=2 and TP=2 x EP=2 (when megatron-core is installed): HF weights loaded
through the inverse mapping come back bitwise, and Megatron's logits equal HF's."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from transformers import AutoConfig

from gyre.trainers.adapters.megatron_mapping import Layout, from_hf, rule, to_hf

from .helpers import spawn

PADDED_VOCAB = 2048  # the tiny models' 1536 padded further, so that stripping the padding is exercised


def checkpoint(path: str) -> dict[str, torch.Tensor]:
    return load_file(f"{path}/model.safetensors")


# -- mapping level: no megatron-core needed ----------------------------------------------------------
def test_qkv_is_grouped_per_kv_head():
    nh, ng, d, hidden = 8, 2, 3, 5  # 4 query heads per KV group
    q, k, v = torch.randn(nh * d, hidden), torch.randn(ng * d, hidden), torch.randn(ng * d, hidden)
    layout = Layout(
        num_layers=1, num_heads=nh, num_kv_heads=ng, head_dim=d, vocab_size=10, tie_word_embeddings=False
    )
    rows = []  # Megatron's order, written out: per group, its query heads, its key head, its value head
    for g in range(ng):
        rows += [q[h * d : (h + 1) * d] for h in range(g * nh // ng, (g + 1) * nh // ng)]
        rows += [k[g * d : (g + 1) * d], v[g * d : (g + 1) * d]]
    megatron = torch.cat(rows)
    hf = {f"model.layers.0.self_attn.{p}_proj.weight": t for p, t in zip("qkv", (q, k, v))}
    name = "decoder.layers.0.self_attention.linear_qkv.weight"
    shards = from_hf(name, hf, layout, tp_size=2)
    assert torch.equal(torch.cat(shards), megatron)
    assert torch.equal(shards[1], megatron[len(megatron) // 2 :])  # a TP rank holds whole groups
    assert all(torch.equal(t, hf[n]) for n, t in to_hf(name, shards, layout))


def test_fc1_shards_hold_gate_then_up():
    gate, up = torch.randn(8, 4), torch.randn(8, 4)
    layout = Layout(
        num_layers=1, num_heads=2, num_kv_heads=2, head_dim=2, vocab_size=10, tie_word_embeddings=False
    )
    hf = {"model.layers.0.mlp.gate_proj.weight": gate, "model.layers.0.mlp.up_proj.weight": up}
    shards = from_hf("decoder.layers.0.mlp.linear_fc1.weight", hf, layout, tp_size=2)
    assert torch.equal(shards[0], torch.cat([gate[:4], up[:4]]))
    assert torch.equal(shards[1], torch.cat([gate[4:], up[4:]]))
    assert dict(to_hf("decoder.layers.0.mlp.linear_fc1.weight", shards, layout)).keys() == hf.keys()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "qwen3_moe", "qwen3_tied"])
@pytest.mark.parametrize("tp", [1, 2])
def test_hand_built_shards_round_trip(model_dirs, arch, tp):
    path = model_dirs[arch]
    layout = Layout.from_hf_config(AutoConfig.from_pretrained(path))
    hf = checkpoint(path)
    back: dict[str, torch.Tensor] = {}
    for name in layout.megatron_names():
        shards = from_hf(name, hf, layout, tp, padded_vocab_size=PADDED_VOCAB)
        assert len(shards) == tp
        if "word_embeddings" in name or "output_layer" in name:
            assert torch.cat(shards).shape[0] == PADDED_VOCAB and not torch.cat(shards)[1536:].any()
        for hf_name, t in to_hf(name, shards, layout):
            assert hf_name not in back, f"{hf_name} produced twice"
            back[hf_name] = t
    assert back.keys() == hf.keys()
    assert all(torch.equal(back[n], hf[n]) for n in hf)


def test_transformer_engine_and_grouped_gemm_names():
    assert rule("decoder.layers.3.self_attention.linear_qkv.layer_norm_weight") == (
        "replicated",
        ["model.layers.3.input_layernorm.weight"],
    )
    assert rule("decoder.layers.3.mlp.linear_fc1.layer_norm_weight")[1] == [
        "model.layers.3.post_attention_layernorm.weight"
    ]
    assert rule("decoder.layers.1.mlp.experts.linear_fc1.weight5") == (
        "gated",
        ["model.layers.1.mlp.experts.5.gate_proj.weight", "model.layers.1.mlp.experts.5.up_proj.weight"],
    )
    assert rule("decoder.layers.1.mlp.experts.local_experts.12.linear_fc2.weight") == (
        "row",
        ["model.layers.1.mlp.experts.12.down_proj.weight"],
    )


def test_tied_output_layer_is_not_sent_and_unknown_names_fail():
    layout = Layout(
        num_layers=1, num_heads=2, num_kv_heads=2, head_dim=2, vocab_size=3, tie_word_embeddings=True
    )
    assert to_hf("output_layer.weight", [torch.zeros(4, 2)], layout) == []
    with pytest.raises(KeyError, match="no HF mapping"):
        to_hf("decoder.layers.0.mlp.shared_experts.linear_fc1.weight", [torch.zeros(2, 2)], layout)


# -- real megatron-core GPTModels ---------------------------------------------------------------------
def _cpu_shims() -> None:
    """megatron-core assumes CUDA in a few places that a CPU run reaches; each rank is a forked process."""
    import megatron.core.transformer.moe.moe_utils as moe_utils
    from megatron.core import tensor_parallel

    torch.cuda.current_device = lambda: "cpu"  # rotary embedding: inv_freq.to(current_device())
    torch.Tensor.cuda = lambda self, *a, **k: self  # tied embeddings on the last PP stage: weight.cuda()
    moe_utils.te_general_gemm = None  # the router's GEMM without Transformer Engine
    tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)  # no CUDA RNG


def _gpt_model(path: str, vpp: int | None = None):
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = AutoConfig.from_pretrained(path)
    layout = Layout.from_hf_config(cfg)
    moe = (
        dict(
            num_moe_experts=cfg.num_experts,
            moe_router_topk=cfg.num_experts_per_tok,
            moe_ffn_hidden_size=cfg.moe_intermediate_size,
            moe_router_load_balancing_type="none",
            moe_token_dispatcher_type="allgather",
            moe_router_score_function="softmax",
            moe_router_pre_softmax=False,
        )
        if layout.num_experts
        else {}
    )
    config = TransformerConfig(
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_key_value_heads,
        kv_channels=layout.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        bias_activation_fusion=False,
        add_bias_linear=False,
        add_qkv_bias=layout.qkv_bias,
        qk_layernorm=layout.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        perform_initialization=False,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        expert_model_parallel_size=ps.get_expert_model_parallel_world_size(),
        virtual_pipeline_model_parallel_size=vpp,
        **moe,
    )
    spec = get_gpt_layer_local_spec(
        num_experts=layout.num_experts or None, qk_layernorm=layout.qk_norm, normalization="RMSNorm"
    )
    chunks = []
    for vp in range(vpp) if vpp else [None]:  # virtual pipeline: this rank holds vpp chunks of layers
        chunks.append(
            GPTModel(
                config,
                spec,
                vocab_size=PADDED_VOCAB,
                max_sequence_length=cfg.max_position_embeddings,
                pre_process=ps.is_pipeline_first_stage(ignore_virtual=vpp is None, vp_stage=vp),
                post_process=ps.is_pipeline_last_stage(ignore_virtual=vpp is None, vp_stage=vp),
                share_embeddings_and_output_weights=layout.tie_word_embeddings,
                position_embedding_type="rope",
                rotary_base=int(cfg.rope_parameters["rope_theta"]),
                vp_stage=vp,
            )
        )
    model = chunks if vpp else chunks[0]
    with torch.no_grad():
        for chunk in chunks:
            for p in chunk.parameters():
                p.fill_(float("nan"))  # the inverse mapping must write every parameter
    return model, cfg


def _load_and_export(path: str, vpp: int | None = None) -> None:
    """Every rank: load HF weights into this rank's shards, export, compare with the checkpoint."""
    from megatron.core import parallel_state as ps

    from gyre.trainers.adapters.megatron import MegatronAdapter, load_hf_weights

    model, cfg = _gpt_model(path, vpp)
    hf = checkpoint(path)
    load_hf_weights(model, hf, cfg)
    chunks = model if isinstance(model, list) else [model]
    assert not any(p.isnan().any() for chunk in chunks for p in chunk.parameters())

    # each pipeline stage's sender yields its own layers; together they are the whole checkpoint
    adapter = MegatronAdapter(model, cfg, gather_pipeline=False)
    got = dict(adapter.named_tensors())
    assert bool(got) == adapter.is_sender
    assert all(torch.equal(t, hf[n]) for n, t in got.items())
    names: list = [None] * dist.get_world_size()
    dist.all_gather_object(names, sorted(got))
    assert sorted(n for ns in names for n in ns) == sorted(hf)  # each tensor once, by one stage

    # gather_pipeline: one rank yields everything; and a dtype cast on the way
    adapter = MegatronAdapter(model, cfg, dtype=torch.bfloat16, bucket_bytes=64 << 10)
    got = dict(adapter.named_tensors())
    assert adapter.is_sender == (dist.get_rank() == 0) and bool(got) == adapter.is_sender
    if adapter.is_sender:
        assert got.keys() == hf.keys()
        assert all(torch.equal(got[n], hf[n].bfloat16()) for n in hf)
    if ps.get_pipeline_model_parallel_world_size() == 1:
        _check_logits(model, path)


def _check_logits(model, path: str) -> None:
    """Megatron's forward with the loaded weights gives HF's logits (proves the layout, not just a
    self-consistent round trip)."""
    from megatron.core import parallel_state as ps
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 17, 300, 41, 900, 12, 8, 77, 1200, 3]])
    mask = torch.triu(torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool), 1)[None, None]
    model.eval()
    with torch.no_grad():
        local = model(ids, torch.arange(ids.shape[1])[None], attention_mask=mask)  # [1, T, V_padded / tp]
        shards = [torch.empty_like(local) for _ in range(ps.get_tensor_model_parallel_world_size())]
        dist.all_gather(shards, local.contiguous(), group=ps.get_tensor_model_parallel_group())
        ours = torch.cat(shards, dim=-1)[..., :1536]
        ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()(ids).logits
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)


def _megatron_ranks(rank: int, world_size: int, dirs: dict, runs: list[tuple]) -> None:
    """runs: (tp, pp, ep, vpp, arch) one after the other, on the same ranks."""
    from megatron.core import parallel_state as ps

    from .helpers import quiet_transformers

    quiet_transformers()
    _cpu_shims()
    for tp, pp, ep, vpp, arch in runs:
        ps.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            expert_model_parallel_size=ep,
            virtual_pipeline_model_parallel_size=vpp,
        )
        try:
            _load_and_export(dirs[arch], vpp)
        finally:
            ps.destroy_model_parallel()


@pytest.fixture(scope="module")
def megatron():
    pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install gyre[megatron])")
    import megatron.core.models.gpt  # noqa: F401  imported once here; the forked ranks inherit it


def test_gptmodel_tp2_pp2(megatron, model_dirs):
    # llama4: 4 layers over PP=2 x virtual PP=2, so rank 0 holds layers 0 and 2
    runs = [
        (2, 2, 1, None, "llama"),
        (2, 2, 1, None, "qwen2"),
        (2, 2, 1, None, "qwen3_tied"),
        (2, 2, 1, 2, "llama4"),
    ]
    spawn(_megatron_ranks, 4, model_dirs, runs)


def test_gptmodel_tp2_ep2_moe_and_logits(megatron, model_dirs):
    # TP=2 x EP=2 (expert TP = 2): experts gathered over expert-TP, then EP; then dense TP=2 x DP=2
    runs = [(2, 1, 2, None, "qwen3_moe"), (2, 1, 1, None, "qwen2"), (2, 1, 1, None, "qwen3_tied")]
    spawn(_megatron_ranks, 4, model_dirs, runs)
