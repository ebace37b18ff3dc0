"""Speculative decoding in the engine (n-gram drafter and a drafter plugin): exactness, the target's
distribution, rollback consistency, grammar, weight updates, errors. Model drafters: test_spec_drafters.py."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch

from gyre import Engine, SamplingParams
from gyre.engine.spec.base import Drafter
from tests.engine.helpers import hf_model

REPEAT = [[5, 6, 7, 8, 9] * 6 + [20 + i] for i in range(4)]  # n-grams hit: drafts get verified
PROMPTS = REPEAT + [list(range(30, 70)), [11, 12, 13, 11, 12, 13, 11, 12]]
GREEDY = SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(llama_dir):
    with Engine(llama_dir, device="cpu") as e:
        greedy = e.generate(PROMPTS, GREEDY)
        sampled = e.generate(PROMPTS, SamplingParams(max_new_tokens=24, temperature=1.0, top_p=0.9, seed=5,
                                                     ignore_eos=True))
    return greedy, sampled


class ScriptedDrafter(Drafter):
    """A drafter plugin: proposes from a function of the sequence (here: tests' choice of drafts)."""

    name = "scripted"

    def __init__(self, fn) -> None:
        self.fn = fn

    def propose(self, reqs, num_tokens):
        return [self.fn(r.all_ids, k) for r, k in zip(reqs, num_tokens)]


@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("batch", [1, len(PROMPTS)])
def test_ngram_greedy_and_seeded_sampling_identical(llama_dir, reference, cache, batch):
    greedy, sampled = reference
    with Engine(llama_dir, device="cpu", spec_method="ngram", spec_num_tokens=3,
                enable_prefix_cache=cache) as e:
        for i in range(0, len(PROMPTS), batch):
            outs = e.generate(PROMPTS[i:i + batch], GREEDY)
            assert [o.output_ids for o in outs] == [o.output_ids for o in greedy[i:i + batch]]
            for o, r in zip(outs, greedy[i:i + batch]):
                assert max(abs(a - b) for a, b in zip(o.output_logprobs, r.output_logprobs)) < 1e-4
        outs = e.generate(PROMPTS, SamplingParams(max_new_tokens=24, temperature=1.0, top_p=0.9, seed=5,
                                                  ignore_eos=True))
        assert [o.output_ids for o in outs] == [o.output_ids for o in sampled]
        stats = e.stats()
        assert stats["spec_num_draft_tokens"] > stats["spec_num_accepted_tokens"] > 0  # both branches ran
        assert stats["spec_mean_accept_len"] > 1.0
        e.call(e.check_integrity)


def test_greedy_with_wrong_drafts_and_stops(llama_dir, reference):
    greedy, _ = reference
    ref = greedy[0].output_ids
    stop = ref[10]
    with Engine(llama_dir, device="cpu", spec_method="ngram", spec_num_tokens=4) as e:
        # every draft wrong (the token after the target's): all rejected, output unchanged
        e.spec.drafter = ScriptedDrafter(lambda ids, k: [(ids[-1] + 1) % 1500] * k)
        assert e.generate(PROMPTS[0], GREEDY)[0].output_ids == ref
        assert e.stats()["spec_num_accepted_tokens"] == 0 < e.stats()["spec_num_draft_tokens"]
        # perfect drafts (the reference continuation): a stop token in the middle of accepted drafts ends
        # the request there, and max_new_tokens is exact
        n0 = len(PROMPTS[0])
        e.spec.drafter = ScriptedDrafter(lambda ids, k: ref[len(ids) - n0:len(ids) - n0 + k])
        out = e.generate(PROMPTS[0], SamplingParams(max_new_tokens=24, temperature=0.0, stop_token_ids=[stop]))[0]
        assert out.output_ids == ref[:ref.index(stop) + 1] and out.finish_reason == "stop"
        out = e.generate(PROMPTS[0], SamplingParams(max_new_tokens=7, temperature=0.0, ignore_eos=True))[0]
        assert out.output_ids == ref[:7] and out.finish_reason == "length"
        assert e.stats()["spec_num_accepted_tokens"] >= 4  # 7 tokens: 1 from the prefill, 1 + 4 + 1
        e.call(e.check_integrity)


def test_sampling_distribution_matches_target(llama_dir):
    """Chi-square of the joint distribution of the first two sampled tokens (top-k 4: 16 outcomes) with
    drafts that are right about half the time, against the exact target distribution from HF."""
    prompt = [7, 8, 9, 10, 11]
    k, n = 4, 2500
    hf = hf_model(llama_dir)
    with torch.no_grad():
        logits1 = hf(torch.tensor([prompt])).logits[0, -1]
    top1 = torch.topk(logits1, k)
    p1 = torch.softmax(top1.values, -1)
    joint = {}
    second = {}
    for t1, q1 in zip(top1.indices.tolist(), p1.tolist()):
        with torch.no_grad():
            logits2 = hf(torch.tensor([prompt + [t1]])).logits[0, -1]
        top2 = torch.topk(logits2, k)
        second[t1] = top2.indices.tolist()
        for t2, q2 in zip(top2.indices.tolist(), torch.softmax(top2.values, -1).tolist()):
            joint[(t1, t2)] = q1 * q2
    rng = random.Random(0)

    def draft(ids, m):  # a plausible draft for the 2nd token: one of the target's top-4, at random
        if len(ids) == len(prompt) + 1:
            return [rng.choice(second.get(ids[-1], [0]))]
        return []

    with Engine(llama_dir, device="cpu", spec_method="ngram", spec_num_tokens=1, enable_prefix_cache=True) as e:
        e.spec.drafter = ScriptedDrafter(draft)
        outs = e.generate(prompt, SamplingParams(max_new_tokens=3, temperature=1.0, top_k=k, n=n, seed=123,
                                                 ignore_eos=True))
        stats = e.stats()
    assert 0 < stats["spec_num_accepted_tokens"] < stats["spec_num_draft_tokens"]
    counts = Counter(tuple(o.output_ids[:2]) for o in outs)
    assert set(counts) <= set(joint)
    chi2 = sum((counts.get(key, 0) - n * p) ** 2 / (n * p) for key, p in joint.items())
    assert chi2 < 37.7, (chi2, counts)  # df = 15, p = 0.001


def test_grammar_with_drafts(llama_dir):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}},
              "required": ["a", "b"]}
    sp = SamplingParams(max_new_tokens=48, temperature=0.0, json_schema=schema)
    with Engine(llama_dir, device="cpu") as e:
        ref = e.generate(["{\"a\": 1, \"b\": \"x\"} {\"a\":"], sp)[0]
    with Engine(llama_dir, device="cpu", spec_method="ngram", spec_num_tokens=4) as e:
        out = e.generate(["{\"a\": 1, \"b\": \"x\"} {\"a\":"], sp)[0]
        # drafts the grammar forbids are cut before the target sees them
        e.spec.drafter = ScriptedDrafter(lambda ids, k: [0] * k)
        again = e.generate(["{\"a\": 1, \"b\": \"x\"} {\"a\":"], sp)[0]
    assert out.output_ids == ref.output_ids == again.output_ids
    assert out.finish_reason == ref.finish_reason


def test_sessions_and_siblings(llama_dir, reference):
    greedy, _ = reference
    with Engine(llama_dir, device="cpu", spec_method="ngram") as e:
        s = e.open_session()
        first = s.generate(PROMPTS[0], GREEDY)
        assert first.output_ids == greedy[0].output_ids
        s.append([5, 6, 7, 8, 9])
        turn2 = s.generate([5, 6], GREEDY)
        traj = s.trajectory()
        assert traj.token_ids[-len(turn2.output_ids):] == turn2.output_ids
        s.close()
        outs = e.generate(PROMPTS[1], SamplingParams(max_new_tokens=16, temperature=0.0, n=3, ignore_eos=True))
        assert all(o.output_ids == greedy[1].output_ids[:16] for o in outs)
        e.call(e.check_integrity)
    with Engine(llama_dir, device="cpu") as e:
        s = e.open_session()
        s.generate(PROMPTS[0], GREEDY)
        s.append([5, 6, 7, 8, 9])
        assert s.generate([5, 6], GREEDY).output_ids == turn2.output_ids


def test_weight_update_keeps_ngram_and_versions(llama_dir):
    with Engine(llama_dir, device="cpu", spec_method="ngram") as e:
        named = [(n, p.detach().clone()) for n, p in hf_model(llama_dir).named_parameters()]
        e.update_weights(named, version=3)
        out = e.generate(PROMPTS[0], GREEDY)[0]
        assert set(out.output_weight_versions) == {3}
        assert e.stats()["spec_active"]  # n-grams have no weights to go stale
        with pytest.raises(ValueError, match="no weights"):
            e.load_draft([])


def test_spec_config_errors(llama_dir, tmp_path):
    with pytest.raises(ValueError, match="spec_draft_path"):
        Engine(llama_dir, device="cpu", spec_method="eagle")
    with pytest.raises(ValueError, match="spec_method"):
        Engine(llama_dir, device="cpu", spec_method="medusa")
    with pytest.raises(ValueError, match="spec_num_tokens"):
        Engine(llama_dir, device="cpu", spec_method="ngram", spec_num_tokens=0)
    with pytest.raises(ValueError, match="spec_on_weight_update"):
        Engine(llama_dir, device="cpu", spec_method="ngram", spec_on_weight_update="maybe")
    with Engine(llama_dir, device="cpu") as e:
        with pytest.raises(ValueError, match="spec_method"):
            e.load_draft(str(tmp_path))


def test_ngram_lookup():
    from gyre.engine.spec.ngram import NgramDrafter

    d = NgramDrafter(max_ngram=3)
    assert d.lookup([1, 2, 3, 4, 9, 1, 2, 3, 4, 5, 6, 1, 2, 3], 3) == [4, 5, 6]  # latest longest match
    assert d.lookup([5, 6, 7], 3) == []
    assert d.lookup([7, 7], 2) == [7]
    assert d.lookup([1, 2, 1], 5) == [2, 1]
    with pytest.raises(ValueError):
        NgramDrafter(max_ngram=1, min_ngram=2)
    assert not math.isnan(d.num_hits)


@pytest.fixture(scope="module")
def eagle_dir(llama_dir, tmp_path_factory):
    from transformers import AutoConfig

    from gyre.engine.spec.eagle import EagleHead, eagle_config, save_eagle

    torch.manual_seed(0)
    head = EagleHead(eagle_config(AutoConfig.from_pretrained(llama_dir)), torch.float32)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.05)
    path = tmp_path_factory.mktemp("eagle") / "head"
    save_eagle(head, path)
    return str(path)


@pytest.mark.parametrize("method", ["draft", "eagle"])
def test_model_drafters_greedy_identical(llama_dir, eagle_dir, reference, method):
    greedy, sampled = reference
    path = llama_dir if method == "draft" else eagle_dir  # the draft LM: the target itself (all accepted)
    with Engine(llama_dir, device="cpu", spec_method=method, spec_draft_path=path, spec_num_tokens=3) as e:
        for batch in (1, len(PROMPTS)):
            for i in range(0, len(PROMPTS), batch):
                outs = e.generate(PROMPTS[i:i + batch], GREEDY)
                assert [o.output_ids for o in outs] == [o.output_ids for o in greedy[i:i + batch]]
        stats = e.stats()
        assert stats["spec_num_verifies"] > 0 and stats["draft_forwards"] > 0
        if method == "draft":  # a draft equal to the target is always right under greedy decoding
            assert stats["spec_num_accepted_tokens"] == stats["spec_num_draft_tokens"]
        outs = e.generate(PROMPTS, SamplingParams(max_new_tokens=24, temperature=1.0, top_p=0.9, seed=5,
                                                  ignore_eos=True))
        assert [o.output_ids for o in outs] == [o.output_ids for o in sampled]
        e.call(e.check_integrity)


def test_eagle_weight_update_disables_until_load(llama_dir, eagle_dir):
    with Engine(llama_dir, device="cpu", spec_method="eagle", spec_draft_path=eagle_dir) as e:
        named = [(n, p.detach().clone()) for n, p in hf_model(llama_dir).named_parameters()]
        e.update_weights(named, version=1)
        stats = e.stats()
        assert not stats["spec_active"] and "load_draft" in stats["spec_disabled_reason"]
        before = stats["spec_num_verifies"]
        e.generate(PROMPTS[0], GREEDY)
        assert e.stats()["spec_num_verifies"] == before  # never silently stale
        with pytest.raises(ValueError):
            e.load_draft([("fc.weight", torch.zeros(3, 3))])  # bad: nothing changes, still disabled
        assert not e.stats()["spec_active"]
        e.load_draft(eagle_dir)
        assert e.stats()["spec_active"] and e.stats()["spec_draft_version"] == 1
        e.generate(PROMPTS[0], GREEDY)
        assert e.stats()["spec_num_verifies"] > before
    with Engine(llama_dir, device="cpu", spec_method="eagle", spec_draft_path=eagle_dir,
                spec_on_weight_update="keep") as e:
        e.update_weights(named, version=1)
        assert e.stats()["spec_active"]
