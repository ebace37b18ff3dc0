"""The fused EAGLE step (gyre.engine.spec.fused): draft, verify, accept and catch-up on the device.

Its outputs, logprobs and acceptance must equal the host-driven spec path's (spec_fused=False) and plain
decoding's. A random head accepts almost nothing, so the head here is trained on the target's own greedy
continuations: drafts are often right and often wrong, which exercises every accepted count."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from gyre import Engine, SamplingParams

PROMPTS = [[5, 6, 7, 8, 9] * 4 + [20 + i] for i in range(3)] + [list(range(30, 52)), [11, 12, 13] * 5]
GREEDY = SamplingParams(max_new_tokens=20, temperature=0.0, ignore_eos=True)
SAMPLED = [SamplingParams(max_new_tokens=20, temperature=0.8, top_p=0.9, seed=i, ignore_eos=True)
           for i in range(len(PROMPTS))]


@pytest.fixture(scope="module")
def trained_head(llama_dir, tmp_path_factory):
    from gyre.engine.spec.train import train_eagle

    with Engine(llama_dir, device="cpu") as e:
        outs = e.generate(PROMPTS, SamplingParams(max_new_tokens=48, temperature=0.0, ignore_eos=True))
    data = [p + o.output_ids for p, o in zip(PROMPTS, outs)]
    path = tmp_path_factory.mktemp("fused") / "head"
    info = train_eagle(llama_dir, data, path, steps=120, batch_size=5, seq_len=80, lr=3e-3, device="cpu")
    assert info["accuracy"] > 0.3, info
    return str(path)


@pytest.fixture(scope="module")
def reference(llama_dir):
    with Engine(llama_dir, device="cpu") as e:
        return e.generate(PROMPTS, GREEDY), e.generate(PROMPTS, SAMPLED)


def _run(llama_dir, head, fused: bool, **kw):
    with Engine(llama_dir, device="cpu", spec_method="eagle", spec_draft_path=head, spec_num_tokens=3,
                spec_fused=fused, **kw) as e:
        greedy_one = [e.generate(p, GREEDY)[0] for p in PROMPTS]
        greedy = e.generate(PROMPTS, GREEDY)
        sampled = e.generate(PROMPTS, SAMPLED)
        e.call(e.check_integrity)
        return greedy_one, greedy, sampled, e.stats()


@pytest.mark.parametrize("cache", [True, False])
def test_fused_equals_host_driven_and_plain_decoding(llama_dir, trained_head, reference, cache):
    ref_greedy, ref_sampled = reference
    host = _run(llama_dir, trained_head, False, enable_prefix_cache=cache)
    fused = _run(llama_dir, trained_head, True, enable_prefix_cache=cache)
    for outs in (host, fused):
        greedy_one, greedy, sampled, _ = outs
        assert [o.output_ids for o in greedy_one] == [o.output_ids for o in ref_greedy]
        assert [o.output_ids for o in greedy] == [o.output_ids for o in ref_greedy]
        assert [o.output_ids for o in sampled] == [o.output_ids for o in ref_sampled]
        for got, want in zip(sampled, ref_sampled):  # the target's logprobs, whatever was drafted
            assert got.output_logprobs == pytest.approx(want.output_logprobs, abs=1e-4)
    stats_host, stats_fused = host[3], fused[3]
    assert stats_host["spec_fused_steps"] == 0 and stats_fused["spec_fused_steps"] > 0
    assert stats_fused["spec_fused_continued"] > 0  # steps queued behind the one in flight
    for key in ("spec_num_verifies", "spec_num_draft_tokens", "spec_num_accepted_tokens"):
        assert stats_fused[key] == stats_host[key], key  # the same drafts, accepted the same way
    rate = stats_fused["spec_acceptance_rate"]
    assert 0.2 < rate < 0.95, rate  # drafts both accepted and rejected


def test_fused_draft_counts_near_the_end_and_stops(llama_dir, trained_head, reference):
    """Fewer drafts than k near max_new_tokens; a stop token inside the accepted drafts ends the request
    there, with the tokens before it."""
    ref_greedy, _ = reference
    with Engine(llama_dir, device="cpu", spec_method="eagle", spec_draft_path=trained_head, spec_num_tokens=4) as e:
        for n in (1, 2, 3, 5, 6):
            outs = e.generate(PROMPTS, SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True))
            assert [o.output_ids for o in outs] == [o.output_ids[:n] for o in ref_greedy]
        stop = ref_greedy[0].output_ids[7]
        out = e.generate(PROMPTS[0], SamplingParams(max_new_tokens=20, temperature=0.0, stop_token_ids=[stop]))[0]
        first = ref_greedy[0].output_ids.index(stop)
        assert out.output_ids == ref_greedy[0].output_ids[:first + 1] and out.finish_reason == "stop"
        assert e.stats()["spec_fused_steps"] > 0
        e.call(e.check_integrity)


def test_fused_with_siblings_sessions_and_mixed_batches(llama_dir, trained_head, reference):
    """n > 1 and requests arriving while others decode (mixed steps take the host-driven path; the next
    all-decode step is fused again)."""
    ref_greedy, _ = reference
    with Engine(llama_dir, device="cpu", spec_method="eagle", spec_draft_path=trained_head, spec_num_tokens=3) as e:
        outs = e.generate(PROMPTS[0], SamplingParams(max_new_tokens=20, temperature=0.0, ignore_eos=True, n=3))
        assert all(o.output_ids == ref_greedy[0].output_ids for o in outs)
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            futures = []
            for p in PROMPTS:  # each arrives while the earlier ones decode
                futures.append(pool.submit(e.generate, p, GREEDY))
                time.sleep(0.02)
            assert [f.result()[0].output_ids for f in futures] == [o.output_ids for o in ref_greedy]
        e.call(e.check_integrity)


def test_fused_without_overlap_and_abort_in_flight(llama_dir, trained_head):
    """overlap_schedule=False resolves every fused step before the next; an abort while steps are queued
    ends the requests with their partial output (a prefix of plain decoding's), and the pool stays whole."""
    long = SamplingParams(max_new_tokens=150, temperature=0.0, ignore_eos=True)
    with Engine(llama_dir, device="cpu") as e:
        want = [o.output_ids for o in e.generate(PROMPTS[:2], long)]
    kw = dict(device="cpu", spec_method="eagle", spec_draft_path=trained_head, spec_num_tokens=3)
    with Engine(llama_dir, overlap_schedule=False, **kw) as e:
        assert [o.output_ids for o in e.generate(PROMPTS[:2], long)] == want
        stats = e.stats()
        assert stats["spec_fused_steps"] > 0 and stats["spec_fused_continued"] == 0
    with Engine(llama_dir, **kw) as e:
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(e.generate, PROMPTS[:2], long)
            time.sleep(0.3)
            e.abort()
            outs = future.result()
        for out, ref in zip(outs, want):
            assert out.output_ids == ref[:len(out.output_ids)]
            assert out.finish_reason in ("abort", "length")
        assert e.generate(PROMPTS[:2], long)[0].output_ids == want[0]  # and the engine goes on
        e.call(e.check_integrity)


def test_fused_respects_a_disabled_draft(llama_dir, trained_head, reference):
    ref_greedy, _ = reference
    from tests.engine.helpers import hf_model

    with Engine(llama_dir, device="cpu", spec_method="eagle", spec_draft_path=trained_head) as e:
        named = [(n, p.detach().clone()) for n, p in hf_model(llama_dir).named_parameters()]
        e.update_weights(named, version=1)
        before = e.stats()["spec_fused_steps"]
        assert e.generate(PROMPTS[0], GREEDY)[0].output_ids == ref_greedy[0].output_ids
        assert e.stats()["spec_fused_steps"] == before  # never drafts with a stale head
        e.load_draft(trained_head)
        assert e.generate(PROMPTS[1], GREEDY)[0].output_ids == ref_greedy[1].output_ids
        assert e.stats()["spec_fused_steps"] > before


def test_fused_tiny_pool_and_slots(llama_dir, trained_head, reference):
    """A pool too small for every draft (budgets cut to 0..k) and more requests than state slots' worth of
    running requests at once: outputs stay exact."""
    ref_greedy, _ = reference
    with Engine(llama_dir, device="cpu", spec_method="eagle", spec_draft_path=trained_head, spec_num_tokens=4,
                max_num_tokens=96, page_size=4, max_running_requests=2) as e:
        outs = e.generate(PROMPTS, GREEDY)
        assert [o.output_ids for o in outs] == [o.output_ids for o in ref_greedy]
        e.call(e.check_integrity)


@pytest.mark.gpu
def test_fused_on_cuda_matches_host_driven(llama_dir, trained_head):
    """float32 on CUDA: the fused step in CUDA graphs, the same step eager, and the host-driven path give the
    same tokens, the same acceptance, and plain decoding's tokens."""
    import torch

    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    runs = {}
    try:
        for name, extra in {"plain": {}, "host": dict(spec_fused=False), "graphs": {},
                            "eager": dict(cuda_graph=False)}.items():
            spec = {} if name == "plain" else dict(spec_method="eagle", spec_draft_path=trained_head,
                                                   spec_num_tokens=3)
            with Engine(llama_dir, device="cuda", dtype="float32", page_size=4, max_num_tokens=8192, **spec,
                        **extra) as e:
                greedy = [o.output_ids for o in e.generate(PROMPTS, GREEDY)]
                one = [e.generate(p, GREEDY)[0].output_ids for p in PROMPTS[:2]]
                sampled = [o.output_ids for o in e.generate(PROMPTS, SAMPLED)]
                e.call(e.check_integrity)
                runs[name] = (greedy, one, sampled, e.stats())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
    for name in ("host", "graphs", "eager"):
        assert runs[name][:3] == runs["plain"][:3], name
    assert runs["host"][3]["spec_fused_steps"] == 0
    for name in ("graphs", "eager"):
        assert runs[name][3]["spec_fused_steps"] > 0
        for key in ("spec_num_draft_tokens", "spec_num_accepted_tokens"):
            assert runs[name][3][key] == runs["host"][3][key], (name, key)


def test_a_failing_fused_step_falls_back_to_the_host_driven_path(llama_dir, trained_head, reference, monkeypatch):
    from gyre.engine.spec.fused import FusedEagle

    ref_greedy, _ = reference

    def broken(self, *a, **kw):
        raise RuntimeError("capture failed")

    monkeypatch.setattr(FusedEagle, "_step", broken)
    with Engine(llama_dir, device="cpu", spec_method="eagle", spec_draft_path=trained_head, spec_num_tokens=3) as e:
        assert [o.output_ids for o in e.generate(PROMPTS, GREEDY)] == [o.output_ids for o in ref_greedy]
        stats = e.stats()
        assert stats["spec_drafter_errors"] == 1 and stats["spec_num_accepted_tokens"] > 0  # host-driven drafts
        e.call(e.check_integrity)
