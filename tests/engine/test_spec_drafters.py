"""The model drafters (gyre.engine.spec.draft_runner) driven directly: a fake target step loop over real
Requests with pages from the target's pool, the target's real weights and hidden states."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from gyre import Engine, SamplingParams
from gyre.engine.config import EngineConfig
from gyre.engine.kv_pool import KVPool
from gyre.engine.layers.attention import AttentionMetadata, make_backend
from gyre.engine.model_runner import ForwardContext, ModelRunner
from gyre.engine.request import Request, Status
from gyre.engine.spec.base import TargetOutput
from gyre.engine.spec.draft_runner import (
    DraftModelDrafter,
    EagleDrafter,
    draft_kv_bytes_per_page,
    make_drafter,
)
from gyre.engine.spec.eagle import EagleHead, eagle_config, save_eagle
from gyre.testing import tiny_model

from .helpers import random_prompts

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=1, ignore_eos=True)  # of the fake requests


@pytest.fixture(scope="module")
def runner(llama_dir):
    """The target, without an engine: the tests lend its pages to their requests (an engine's idle
    integrity check would count them as leaked)."""
    return ModelRunner(EngineConfig(model_path=llama_dir, device="cpu", page_size=4, max_num_tokens=4096))


def _config(runner, method, path, **kw):
    return dataclasses.replace(runner.config, spec_method=method, spec_draft_path=str(path), **kw)


def _request(runner, rid, prompt, capacity):
    req = Request(rid, list(prompt), GREEDY, seed=0, arrival=0)
    req.page_table = runner.pool.alloc(runner.pool.pages_needed(capacity))
    req.status = Status.RUNNING
    return req


def _free(runner, reqs):
    for r in reqs:
        runner.pool.free(r.page_table)
        r.status = Status.FINISHED


def _context(backend, pages: list[int], start: int, n: int) -> ForwardContext:
    """The context of a forward over positions [start, start + n) of one sequence on `pages`."""
    ps, dev = backend.pool.page_size, backend.pool.device
    i32 = dict(dtype=torch.int32, device=dev)
    slots = [pages[p // ps] * ps + p % ps for p in range(start, start + n)]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, device=dev),
        page_table=torch.tensor([pages], **i32), seq_lens=torch.tensor([start + n], **i32),
        cu_seqlens_q=torch.tensor([0, n], **i32), max_q_len=n, seq_lens_cpu=[start + n], q_lens_cpu=[n],
        is_decode=n == 1)
    backend.prepare(meta)
    return ForwardContext(backend, meta)


@torch.inference_mode()
def _target_hidden(runner, tokens: list[int]) -> torch.Tensor:
    """The target's final hidden states [T, H] of a whole sequence (over scratch pages)."""
    n = len(tokens)
    pages = runner.pool.alloc(runner.pool.pages_needed(n))
    try:
        ctx = _context(runner.backend, pages, 0, n)
        dev = runner.device
        return runner.model(torch.tensor(tokens, device=dev), torch.arange(n, device=dev), ctx)
    finally:
        runner.pool.free(pages)


@torch.inference_mode()
def _eagle_reference(runner, head, tokens: list[int], k: int) -> tuple[KVPool, list[int], list[int]]:
    """An EAGLE head from scratch in a pool of its own: (pool, pages) with its KV of positions [0, n - 1),
    and its k greedy drafts after `tokens`."""
    n, ps = len(tokens), runner.pool.page_size
    pool = KVPool(-(-(n + k) // ps) + 1, ps, 1, 2, 16, torch.float32, torch.device("cpu"))
    backend, pages = make_backend("torch", pool), list(range(1, pool.num_pages))
    embed, logits = runner.model.model.embed_tokens, runner.model.compute_logits
    ctx = _context(backend, pages, 0, n - 1)
    hidden = _target_hidden(runner, tokens[:-1])  # h_0 .. h_{n-2}
    f = head(embed(torch.tensor(tokens[1:])), hidden, torch.arange(n - 1), ctx)[-1:]
    drafts = [int(logits(f).argmax())]
    for pos in range(n - 1, n - 2 + k):  # feed d_j at position n - 2 + j
        f = head(embed(torch.tensor(drafts[-1:])), f, torch.tensor([pos]), _context(backend, pages, pos, 1))
        drafts.append(int(logits(f).argmax()))
    return pool, pages, drafts


def _random_head(runner, path, seed=0):
    head = EagleHead(eagle_config(runner.hf_config), torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in head.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.05 * noise if name.endswith("norm.weight") else 0.1 * noise)
    save_eagle(head, path)
    return str(path)


def test_draft_model_equal_to_target_proposes_the_greedy_continuation(runner, llama_dir):
    prompts = random_prompts([13, 6, 22], seed=5)
    drafter = make_drafter(_config(runner, "draft", llama_dir), runner)
    assert isinstance(drafter, DraftModelDrafter) and not drafter.needs_hidden
    reqs = [_request(runner, f"r{i}", p, len(p) + 60) for i, p in enumerate(prompts)]
    rng = random.Random(0)

    def greedy(n):
        sp = SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)
        return [o.output_ids for o in engine.generate([r.all_ids for r in reqs], sp)]

    engine = Engine(llama_dir, device="cpu", page_size=4, max_num_tokens=4096, spec_method=None)
    try:
        for lo, hi in ((0, 5), (5, 100)):  # prefill in chunks; the last one samples the first token
            starts = [min(lo, len(r.prompt_ids)) for r in reqs]
            ends = [min(hi, len(r.prompt_ids)) for r in reqs]
            if hi == 100:
                for r, g in zip(reqs, greedy(1)):
                    r.output_ids += g
            drafter.observe(TargetOutput(reqs, starts, [e - s for s, e in zip(starts, ends)], [0] * 3, None))
        for _ in range(8):
            ks = [4, rng.randint(0, 5), 2]
            proposals = drafter.propose(reqs, ks)
            starts, valid = [], []
            for r, ref, k, d in zip(reqs, greedy(6), ks, proposals):
                assert d == ref[:k]
                a = rng.randint(0, len(d))  # accept a prefix, then the target's (sampled) token
                starts.append(len(r.all_ids) - 1)
                valid.append(a + 1)
                r.output_ids += d[:a] + [ref[a] if rng.random() < 0.5 else rng.randrange(3, 1500)]
            drafter.observe(TargetOutput(reqs, starts, valid, [0] * 3, None))
        # the draft steps wrote the KV of the last token and the accepted drafts: no catch-up forward
        proposals = drafter.propose(reqs, [3, 3, 3])
        forwards = drafter.stats()["draft_forwards"]
        for r, ref, d in zip(reqs, greedy(3), proposals):
            assert d == ref
            r.output_ids += d[:1] + [7]
        drafter.observe(TargetOutput(reqs, [len(r.all_ids) - 3 for r in reqs], [2] * 3, [0] * 3, None))
        assert drafter.stats()["draft_forwards"] == forwards and drafter.stats()["draft_tokens"] > 0
        assert drafter.propose(reqs, [2, 2, 2]) == greedy(2)
    finally:
        engine.shutdown()
        _free(runner, reqs)


def _eagle_run(runner, drafter, prompts, seed):
    """Prefill in chunks, then decode steps that accept some drafts; returns the requests (pages held)."""
    reqs = [_request(runner, f"e{seed}-{i}", p, len(p) + 40) for i, p in enumerate(prompts)]
    rng = random.Random(seed)
    for lo, hi in ((0, 7), (7, 100)):
        starts = [min(lo, len(r.prompt_ids)) for r in reqs]
        ends = [min(hi, len(r.prompt_ids)) for r in reqs]
        if hi == 100:
            for r in reqs:
                r.output_ids.append(rng.randrange(3, 1500))
        counts = [e - s for s, e in zip(starts, ends)]
        if hi != 100:
            assert drafter.propose(reqs, [3] * len(reqs)) == [[]] * len(reqs)  # mid-prefill: no state yet
        _observe(runner, drafter, reqs, starts, counts)
    for _ in range(6):
        ks = [rng.randint(0, 4) for _ in reqs]
        proposals = drafter.propose(reqs, ks)
        assert [len(d) for d in proposals] == ks
        assert all(0 <= t < runner.vocab_size for d in proposals for t in d)
        starts, valid = [], []
        for r, d in zip(reqs, proposals):
            a = rng.randint(0, len(d))
            starts.append(len(r.all_ids) - 1)
            valid.append(a + 1)
            r.output_ids += d[:a] + [rng.randrange(3, 1500)]
        _observe(runner, drafter, reqs, starts, valid)
    return reqs


def _observe(runner, drafter, reqs, starts, counts):
    hidden, rows = [], []
    for r, s, n in zip(reqs, starts, counts):
        rows.append(sum(len(h) for h in hidden))
        hidden.append(_target_hidden(runner, r.all_ids[:s + n])[s:])
    drafter.observe(TargetOutput(reqs, starts, counts, rows, torch.cat(hidden)))


def test_eagle_catch_up_matches_a_recompute(runner, tmp_path):
    drafter = EagleDrafter(runner, _config(runner, "eagle", _random_head(runner, tmp_path / "head")))
    assert drafter.needs_hidden
    reqs = _eagle_run(runner, drafter, random_prompts([9, 14, 8], seed=7), seed=1)
    try:
        ks, ps = [4, 1, 3], runner.pool.page_size
        proposals = drafter.propose(reqs, ks)
        for r, k, d in zip(reqs, ks, proposals):
            n = len(r.all_ids)
            assert drafter.states[r.request_id].pos == n - 2
            pool, pages, ref = _eagle_reference(runner, drafter.head, r.all_ids, k)
            assert d == ref
            ours = torch.tensor([r.page_table[p // ps] * ps + p % ps for p in range(n - 1)])
            theirs = torch.tensor([pages[p // ps] * ps + p % ps for p in range(n - 1)])
            for a, b in zip(drafter.kv.pool.k_cache + drafter.kv.pool.v_cache, pool.k_cache + pool.v_cache):
                assert torch.allclose(a[ours], b[theirs], atol=1e-5)
        stats = drafter.stats()
        assert stats["draft_forwards"] > 0 and stats["draft_tokens"] > 0
    finally:
        _free(runner, reqs)


def test_eagle_load_checks_everything_first(runner, tmp_path):
    drafter = EagleDrafter(runner, _config(runner, "eagle", _random_head(runner, tmp_path / "a")))
    before = {k: v.clone() for k, v in drafter.head.state_dict().items()}
    good = _random_head(runner, tmp_path / "b", seed=1)
    from safetensors.torch import load_file

    tensors = load_file(f"{good}/model.safetensors")
    wrong_shape = dict(tensors, **{"fc.weight": torch.zeros(3, 3)})
    unknown = dict(tensors, **{"layer.bogus.weight": torch.zeros(3)})
    for bad in (wrong_shape, unknown, {"fc.weight": tensors["fc.weight"]}):
        with pytest.raises(ValueError):
            drafter.load(bad.items())
        for k, v in drafter.head.state_dict().items():
            assert torch.equal(v, before[k])
    with pytest.raises(ValueError, match="GyreEagleHead"):
        drafter.load(runner.config.model_path)
    drafter.load(good)
    assert torch.equal(drafter.head.fc.weight, tensors["fc.weight"])
    drafter.load(((k, v * 2) for k, v in tensors.items()))
    assert torch.equal(drafter.head.fc.weight, tensors["fc.weight"] * 2)


def test_draft_model_load_checks_everything_first(runner, llama_dir, tmp_path):
    drafter = DraftModelDrafter(runner, _config(runner, "draft", llama_dir))
    before = {k: v.clone() for k, v in drafter.model.state_dict().items()}
    q = "model.layers.0.self_attn.q_proj.weight"
    norm = torch.full((64,), 2.0)
    for bad in ([("model.norm.weight", norm), (q, torch.zeros(3, 64))],
                [("model.norm.weight", norm), ("model.layers.9.mlp.bogus.weight", torch.zeros(2))],
                [("model.norm.weight", norm.long())]):
        with pytest.raises(ValueError, match="nothing loaded"):
            drafter.load(bad)
        for k, v in drafter.model.state_dict().items():
            assert torch.equal(v, before[k])
    drafter.load([("model.norm.weight", norm)])  # a subset of named tensors
    assert torch.equal(drafter.model.model.norm.weight, norm)
    other = tiny_model("llama", tmp_path / "other", seed=3)
    drafter.load(str(other))
    assert not torch.equal(drafter.model.model.norm.weight, norm)
    assert not torch.equal(drafter.model.model.embed_tokens.weight, before["model.embed_tokens.weight"])


def test_drafters_never_raise_on_odd_input(runner, llama_dir, tmp_path):
    head = _random_head(runner, tmp_path / "head")
    prompt = random_prompts([10], seed=9)[0]
    for drafter, room in ((EagleDrafter(runner, _config(runner, "eagle", head)), 3),
                          (DraftModelDrafter(runner, _config(runner, "draft", llama_dir)), 2)):
        req = _request(runner, "odd", prompt, 12)  # pages for positions < 12 only
        empty = _request(runner, "empty", prompt, 0)
        try:
            req.output_ids.append(5)
            _observe(runner, drafter, [req], [0], [10])
            assert [len(d) for d in drafter.propose([req, empty], [8, 4])] == [room, 0]  # what fits the pages
            # positions past the known tokens and the pages; a request without pages
            drafter.observe(TargetOutput([req, empty], [10, 0], [5, 3], [0, 5], torch.zeros(8, 64)))
            clone = Request("odd", req.prompt_ids, GREEDY, seed=0, arrival=0)  # same id, another request
            clone.output_ids, clone.page_table, clone.status = [5], req.page_table, Status.RUNNING
            assert len(drafter.propose([clone], [2])[0]) == (0 if drafter.name == "eagle" else 2)
        finally:
            _free(runner, [req, empty])


def test_bad_draft_paths_are_clear(runner, llama_dir, tmp_path):
    for method, cls in (("eagle", EagleDrafter), ("draft", DraftModelDrafter)):
        with pytest.raises(ValueError, match="spec_draft_path"):
            cls(runner, dataclasses.replace(runner.config, spec_method=method, spec_draft_path=None))
        missing = str(tmp_path / "nowhere")
        with pytest.raises(FileNotFoundError, match="nowhere"):
            cls(runner, _config(runner, method, missing))
    with pytest.raises(ValueError, match="GyreEagleHead"):
        EagleDrafter(runner, _config(runner, "eagle", llama_dir))
    small = tiny_model("llama", tmp_path / "small", hidden_size=32, head_dim=8, intermediate_size=64)
    head = EagleHead(eagle_config(runner.hf_config.__class__.from_pretrained(small)), torch.float32)
    save_eagle(head, tmp_path / "small_head")
    with pytest.raises(ValueError, match="hidden_size 32 does not match the target's 64"):
        EagleDrafter(runner, _config(runner, "eagle", tmp_path / "small_head"))
    (tmp_path / "empty_head").mkdir()
    config_json = (tmp_path / "small_head" / "config.json").read_text()
    (tmp_path / "empty_head" / "config.json").write_text(config_json)
    with pytest.raises((ValueError, FileNotFoundError), match="empty_head"):
        EagleDrafter(runner, _config(runner, "eagle", tmp_path / "empty_head"))
    other_vocab = tiny_model("llama", tmp_path / "vocab", vocab_size=1600)
    with pytest.raises(ValueError, match="vocab_size 1600 differs from the target's"):
        DraftModelDrafter(runner, _config(runner, "draft", other_vocab))
    assert make_drafter(dataclasses.replace(runner.config, spec_method="ngram"), runner) is None


def test_draft_kv_bytes_per_page(runner, llama_dir, tmp_path):
    cfg, hf = runner.config, runner.hf_config
    per_layer = 2 * 4 * 2 * 16 * 4  # K and V, page 4, 2 KV heads of 16, float32
    assert draft_kv_bytes_per_page(_config(runner, "draft", llama_dir), hf, torch.float32) == 2 * per_layer
    head = _random_head(runner, tmp_path / "h")
    assert draft_kv_bytes_per_page(_config(runner, "eagle", head), hf, torch.float32) == per_layer
    assert draft_kv_bytes_per_page(cfg, hf, torch.float32) == 0


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["eagle", "draft"])
def test_graph_draft_steps_match_eager(model_dirs, tmp_path, method):
    path = model_dirs["llama"]
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        gpu = ModelRunner(EngineConfig(model_path=path, device="cuda", dtype="float32", page_size=4,
                                       max_num_tokens=4096, cuda_graph=False))
        draft_path = _random_head(gpu, tmp_path / "head") if method == "eagle" else path
        graphed = make_drafter(_config(gpu, method, draft_path, cuda_graph=True, cuda_graph_max_bs=8), gpu)
        eager = make_drafter(_config(gpu, method, draft_path), gpu)
        assert graphed.graphs is not None and eager.graphs is None
        prompts = random_prompts([9, 30, 5, 17, 12], seed=2)
        runs = []
        for drafter in (graphed, eager):
            reqs = [_request(gpu, f"{id(drafter)}-{i}", p, len(p) + 12) for i, p in enumerate(prompts)]
            for r in reqs:
                r.output_ids.append(7)
            _observe(gpu, drafter, reqs, [0] * 5, [len(r.prompt_ids) for r in reqs])
            first = drafter.propose(reqs, [4, 2, 4, 0, 3])
            starts = [len(r.all_ids) - 1 for r in reqs]
            for r, d in zip(reqs, first):
                r.output_ids += d[:2] + [11]
            _observe(gpu, drafter, reqs, starts, [min(len(d), 2) + 1 for d in first])
            runs.append((first, drafter.propose(reqs, [1, 4, 3, 4, 2])))
            _free(gpu, reqs)
        assert runs[0] == runs[1]
        assert [[len(d) for d in ds] for ds in runs[0]] == [[4, 2, 4, 0, 3], [1, 4, 3, 4, 2]]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
