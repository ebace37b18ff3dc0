"""Parallel engines on 2 gloo ranks (rank 0 in this process, one forked worker): EP=2, TP=2 and both,
against the single-process engine and HF transformers (tokens, logprobs, routed experts); weight
updates reaching the right shards; a dead worker; configurations that cannot work."""

from __future__ import annotations

import functools
import os
import signal
import time

import pytest
import torch
from safetensors.torch import load_file

from gyre import Engine, SamplingParams
from gyre.testing import tiny_model

from .helpers import hf_greedy, hf_logprobs, hf_model, random_prompts

GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True, return_routed_experts=True)
KW = dict(device="cpu", page_size=4, max_num_tokens=2048, max_batch_tokens=32)  # chunked prefill + decodes
PROMPTS = random_prompts([3, 17, 40, 9])


@pytest.fixture(scope="module")
def moe_dir(model_dirs) -> str:
    return model_dirs["qwen3_moe"]


@pytest.fixture(scope="module")
def reference(moe_dir):
    with Engine(moe_dir, **KW) as eng:
        return eng.generate(PROMPTS, GREEDY)


@pytest.fixture(scope="module")
def new_weights(tmp_path_factory) -> str:
    return str(tiny_model("qwen3_moe", tmp_path_factory.mktemp("moe_new") / "m", seed=1))


@functools.lru_cache(maxsize=64)
def _hf_router(path: str, ids: tuple[int, ...]) -> list[list[list[int]]]:
    """HF's router choices for each position of ids: [position][moe_layer][k] (hooks on the gates)."""
    model = hf_model(path)
    gates = [layer.mlp.gate for layer in model.model.layers]
    seen: list[torch.Tensor] = []
    hooks = [g.register_forward_hook(lambda m, i, out: seen.append(out[2])) for g in gates]
    try:
        with torch.no_grad():
            model(torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(seen, dim=1).tolist()


def hf_router_choices(path: str, ids: list[int]) -> list[list[list[int]]]:
    return _hf_router(path, tuple(ids))


@functools.lru_cache(maxsize=64)
def _hf_greedy(path: str, prompt: tuple[int, ...], max_new: int) -> tuple[list[int], torch.Tensor]:
    out = hf_greedy(path, list(prompt), max_new)
    return out, hf_logprobs(path, list(prompt), out)


def check_against_hf(path: str, outs, prompts=PROMPTS, max_new: int = 8) -> None:
    for p, o in zip(prompts, outs):
        ids, logprobs = _hf_greedy(path, tuple(p), max_new)
        assert o.output_ids == ids
        assert torch.allclose(torch.tensor(o.output_logprobs), logprobs, atol=1e-4)
        if o.routed_experts is not None:
            assert len(o.routed_experts) == len(p) + len(o.output_ids) - 1
            assert o.routed_experts == hf_router_choices(path, p + o.output_ids[:-1])


def check_same(outs, reference) -> None:
    for o, r in zip(outs, reference):
        assert o.output_ids == r.output_ids
        assert torch.allclose(torch.tensor(o.output_logprobs), torch.tensor(r.output_logprobs), atol=1e-5)
        assert o.routed_experts == r.routed_experts


def test_single_process_routing_matches_hf(moe_dir, reference):
    check_against_hf(moe_dir, reference)
    with Engine(moe_dir, **KW) as eng:  # a cached prefix: its routing comes from the routing store
        eng.generate(PROMPTS[2:3], SamplingParams(max_new_tokens=2, temperature=0.0))
        again = eng.generate(PROMPTS[2:3], GREEDY)[0]
    assert again.num_cached_tokens > 0
    check_same([again], reference[2:3])


@pytest.mark.parametrize(
    "parallel",
    [
        {"ep_size": 2},
        {"tp_size": 2},
        {"tp_size": 2, "ep_size": 2},
        {"ep_size": 2, "ep_dispatch": "alltoall"},
    ],
    ids=["ep2", "tp2", "tp2-ep2", "ep2-alltoall"],
)
def test_matches_single_process_and_hf(moe_dir, reference, parallel):
    with Engine(moe_dir, **KW, **parallel) as eng:
        outs = eng.generate(PROMPTS, GREEDY)
        again = eng.generate(PROMPTS[1:2], GREEDY)[0]  # prefix cache hit
        stats = eng.stats()
    check_same(outs, reference)
    check_against_hf(moe_dir, outs)
    assert again.num_cached_tokens > 0
    check_same([again], reference[1:2])
    # every computed token is counted once per MoE layer and choice (k = 2)
    computed = sum(len(o.prompt_ids) - o.num_cached_tokens + len(o.output_ids) - 1 for o in [*outs, again])
    assert [sum(layer) for layer in stats["expert_load"]] == [2 * computed] * 2


def test_weight_updates_reach_every_shard(moe_dir, reference, new_weights):
    tensors = load_file(os.path.join(new_weights, "model.safetensors"))
    with Engine(moe_dir, tp_size=2, ep_size=2, **KW) as eng:  # dense layers TP, experts split over ranks
        assert eng.update_weights(tensors.items()) == 1
        new = eng.generate(PROMPTS, GREEDY)
        assert eng.update_weights_from_disk(moe_dir) == 2
        old = eng.generate(PROMPTS, GREEDY)
    check_against_hf(new_weights, new)
    check_same(old, reference)


def test_release_and_resume_memory(moe_dir, reference):
    with Engine(moe_dir, ep_size=2, **KW) as eng:
        eng.release_memory()
        eng.resume_memory()
        check_same(eng.generate(PROMPTS, GREEDY), reference)


def test_dead_worker_fails_requests_without_hanging(moe_dir):
    eng = Engine(moe_dir, tp_size=2, **KW)
    try:
        assert eng.generate(PROMPTS[:1], GREEDY)[0].finish_reason == "length"
        os.kill(eng.runner.workers.procs[0].pid, signal.SIGKILL)
        start = time.monotonic()
        for _ in range(2):  # the step that finds it dead, and any later one
            out = eng.generate(PROMPTS[:2], GREEDY)
            assert all(o.finish_reason == "abort" and "worker rank 1" in o.abort_reason for o in out), out
        assert time.monotonic() - start < 10
    finally:
        start = time.monotonic()
        eng.shutdown()
        assert time.monotonic() - start < 10


@pytest.mark.parametrize(
    "arch, fields, match",
    [
        ("qwen3_moe", {"ep_size": 3}, "ep_size 3 must divide num_experts 8"),
        ("qwen3_moe", {"tp_size": 3}, "tp_size 3 must divide num_attention_heads 4"),
        ("qwen3_moe", {"tp_size": 2, "ep_size": 3}, "the smaller must divide the larger"),
        ("llama", {"ep_size": 2}, "needs a mixture-of-experts model"),
        (
            "qwen3_moe",
            {"ep_size": 2, "ep_num_redundant_experts": 1},
            r"must divide num_experts 8 \+ ep_num_redundant",
        ),
        ("qwen3_moe", {"ep_num_redundant_experts": 2}, "need ep_size > 1"),
        ("qwen3_moe", {"tp_size": 2, "ep_dispatch": "alltoall"}, "alltoall"),
        ("qwen3_moe", {"tp_size": 2, "device": "cuda"}, "CUDA devices"),
        ("qwen3_moe", {"ep_size": 2, "deterministic": True}, "deterministic"),
    ],
)
def test_bad_configurations_fail_at_start(model_dirs, arch, fields, match):
    if fields.get("device") == "cuda" and torch.cuda.device_count() >= 2:
        pytest.skip("this machine has the CUDA devices")
    with pytest.raises(ValueError, match=match):
        Engine(model_dirs[arch], **{"device": "cpu", **fields})
