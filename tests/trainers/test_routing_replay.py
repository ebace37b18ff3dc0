"""Rollout routing replay: the experts an engine routed to (Completion.routed_experts) forced in a
training forward of gyre's own model, of HF transformers' Qwen3-MoE and of a megatron-core GPTModel,
even when the trainer's router would choose differently (here: perturbed router weights)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from gyre import Engine, SamplingParams
from gyre.trainers.routing_replay import replay_gyre, replay_hf, replay_megatron, routing_tensor

from .helpers import spawn

PROMPTS = [[5, 17, 300, 41, 900, 12, 8], [77, 1200, 3, 64]]


@pytest.fixture(scope="module")
def rollout(model_dirs):
    sp = SamplingParams(
        max_new_tokens=6, temperature=1.0, seed=3, ignore_eos=True, return_routed_experts=True
    )
    with Engine(model_dirs["qwen3_moe"], page_size=4, max_num_tokens=1024) as eng:
        outs = eng.generate(PROMPTS, sp)
    seqs = [o.prompt_ids + o.output_ids for o in outs]
    return seqs, [o.routed_experts for o in outs]


def _perturb(params) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.5)


def _capture(modules, index: int) -> tuple[list, list]:
    seen: list[torch.Tensor] = []
    hooks = [
        m.register_forward_pre_hook(lambda m, args: seen.append(args[index].detach().clone()))
        for m in modules
    ]
    return seen, hooks


def test_routing_tensor_layouts():
    routed = [[[[1, 2]], [[3, 4]]], [[[5, 6]]]]  # 2 sequences (3 and 2 tokens), 1 MoE layer, k = 2
    packed = routing_tensor(routed)
    assert packed[:, 0].tolist() == [[1, 2], [3, 4], [-1, -1], [5, 6], [-1, -1]]
    bs = routing_tensor(routed, seq_len=3)
    assert bs[:, 0].tolist() == [[1, 2], [3, 4], [-1, -1], [5, 6], [-1, -1], [-1, -1]]
    sb = routing_tensor(routed, seq_len=3, order="sb")
    assert sb[:, 0].tolist() == [[1, 2], [5, 6], [3, 4], [-1, -1], [-1, -1], [-1, -1]]


def test_gyre_training_forward_replays_engine_routing(model_dirs, rollout):
    from gyre.engine.layers.moe import moe_layers
    from gyre.trainers.training_forward import build_training_model, sequence_logprobs

    seqs, routed = rollout
    model = build_training_model(model_dirs["qwen3_moe"])
    routing = routing_tensor(routed, [len(s) for s in seqs])  # packed, as sequence_logprobs packs them
    plain = sequence_logprobs(model, seqs)
    with replay_gyre(model, routing):
        replayed = sequence_logprobs(model, seqs)
    assert all(torch.equal(a, b) for a, b in zip(plain, replayed))  # same weights: the same routing
    _perturb(m.gate.weight for m in model.modules() if hasattr(m, "gate"))
    layers = moe_layers(model)
    seen, hooks = _capture(layers, 2)
    with replay_gyre(model, routing):
        logp = sequence_logprobs(model, seqs)
    for h in hooks:
        h.remove()
    has_record = (routing[:, 0] >= 0).all(dim=1)
    for i, ids in enumerate(seen):
        assert torch.equal(ids[has_record], routing[has_record, i])
    sum(x.sum() for x in logp).backward()
    assert all(m.gate.weight.grad.abs().sum() > 0 for m in model.modules() if hasattr(m, "gate"))
    seen, hooks = _capture(layers, 2)
    sequence_logprobs(model, seqs)  # the perturbed router on its own chooses differently
    for h in hooks:
        h.remove()
    assert any(not torch.equal(ids[has_record], routing[has_record, i]) for i, ids in enumerate(seen))


def test_hf_forward_replays_engine_routing(model_dirs, rollout):
    seqs, routed = rollout
    model = AutoModelForCausalLM.from_pretrained(model_dirs["qwen3_moe"], dtype=torch.float32).eval()
    seq_len = max(len(s) for s in seqs)
    ids = torch.tensor([s + [0] * (seq_len - len(s)) for s in seqs])
    routing = routing_tensor(routed, [len(s) for s in seqs], seq_len=seq_len)  # [batch, seq] rows
    with torch.no_grad():
        plain = model(ids).logits
        with replay_hf(model, routing):
            assert torch.equal(model(ids).logits, plain)
        _perturb(layer.mlp.gate.weight for layer in model.model.layers)
        experts = [layer.mlp.experts for layer in model.model.layers]
        seen, hooks = _capture(experts, 1)
        with replay_hf(model, routing):
            model(ids)
        for h in hooks:
            h.remove()
    has_record = (routing[:, 0] >= 0).all(dim=1)
    for i, chosen in enumerate(seen):
        assert torch.equal(chosen[has_record], routing[has_record, i])


def _megatron_replay(rank: int, world_size: int, path: str, seq: list[int], routing: torch.Tensor) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe.router import TopKRouter

    from gyre.trainers.adapters.megatron import load_hf_weights

    from .helpers import quiet_transformers
    from .test_megatron import _cpu_shims, _gpt_model, checkpoint

    quiet_transformers()
    _cpu_shims()
    ps.initialize_model_parallel()
    try:
        model, cfg = _gpt_model(path)
        load_hf_weights(model, checkpoint(path), cfg)
        model.eval()
        ids = torch.tensor([seq])
        mask = torch.triu(torch.ones(len(seq), len(seq), dtype=torch.bool), 1)[None, None]
        routers = [m for m in model.modules() if isinstance(m, TopKRouter)]
        maps: list[torch.Tensor] = []
        hooks = [r.register_forward_hook(lambda m, i, out: maps.append(out[1])) for r in routers]
        with torch.no_grad():
            _perturb(r.weight for r in routers)
            with replay_megatron(model, routing):
                model(ids, torch.arange(len(seq))[None], attention_mask=mask)
        for h in hooks:
            h.remove()
        for i, routing_map in enumerate(maps):  # [S * B, E] bool
            for t in range(len(seq) - 1):
                assert routing_map[t].nonzero().squeeze(1).tolist() == sorted(routing[t, i].tolist())
        assert all(r.router_replay is None for r in routers)  # restored
    finally:
        ps.destroy_model_parallel()


def test_megatron_router_replays_engine_routing(model_dirs, rollout):
    pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install gyre[megatron])")
    import megatron.core.models.gpt  # noqa: F401  imported here; the forked rank inherits it

    seqs, routed = rollout
    routing = routing_tensor(routed[:1], [len(seqs[0])], seq_len=len(seqs[0]), order="sb")  # batch of 1
    spawn(_megatron_replay, 1, model_dirs["qwen3_moe"], seqs[0], routing)
