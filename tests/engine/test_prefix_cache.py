"""Prefix cache in the engine: shared-prefix sampling, reuse accounting, weight versions."""

from __future__ import annotations

import pytest

from gyre import Engine, SamplingParams

from .helpers import random_prompts


def _run(path, prompts, sp, **kw):
    with Engine(path, page_size=4, max_num_tokens=8192, **kw) as eng:
        outs = eng.generate(prompts, sp)
        stats = eng.stats()
        eng.call(eng.check_integrity)
    return outs, stats


@pytest.mark.parametrize("sp", [
    SamplingParams(max_new_tokens=8, temperature=0.0, n=8, ignore_eos=True),
    SamplingParams(max_new_tokens=8, temperature=1.0, n=8, seed=11, ignore_eos=True),
])
def test_grpo_prompt_prefilled_once(llama_dir, sp):
    prompt = random_prompts([200], seed=20)[0]
    cached, s_on = _run(llama_dir, [prompt], sp)
    plain, s_off = _run(llama_dir, [prompt], sp, enable_prefix_cache=False)
    assert [o.output_ids for o in cached] == [o.output_ids for o in plain]
    for a, b in zip(cached, plain):
        assert max(abs(x - y) for x, y in zip(a.output_logprobs, b.output_logprobs)) < 1e-4
    assert s_off["num_prefill_tokens"] == 8 * 200
    # one full prefill + at most one page (minus the reused part) per sibling
    assert s_on["num_prefill_tokens"] <= 200 + 7 * 4
    assert s_on["num_prefill_tokens"] / s_off["num_prefill_tokens"] < 1 / 8 + 0.03
    assert sum(o.num_cached_tokens for o in cached) == 7 * 196
    assert s_on["cache_hit_rate"] > 0.8


def test_same_prompt_arriving_together_shares_prefill(llama_dir):
    prompt = random_prompts([64], seed=21)[0]
    sp = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)
    outs, stats = _run(llama_dir, [prompt] * 4 + random_prompts([30], seed=22), sp)
    assert len({tuple(o.output_ids) for o in outs[:4]}) == 1
    assert stats["num_prefill_tokens"] <= 64 + 3 * 4 + 30


def test_second_request_reuses_finished_prefix(qwen3_dir):
    system = random_prompts([48], seed=23)[0]
    sp = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
    with Engine(qwen3_dir, page_size=8) as eng:
        first = eng.generate([system + [7, 8, 9]], sp)[0]
        second = eng.generate([system + [10, 11]], sp)[0]
        assert first.num_cached_tokens == 0 and second.num_cached_tokens == 48
        stats = eng.stats()
        assert stats["prefill_tokens_saved"] == 48
    with Engine(qwen3_dir, page_size=8, enable_prefix_cache=False) as eng:
        assert eng.generate([system + [10, 11]], sp)[0].output_ids == second.output_ids


def test_no_cache_hit_across_weight_versions(llama_dir):
    prompt = random_prompts([40], seed=24)[0]
    sp = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)
    with Engine(llama_dir, page_size=4) as eng:
        eng.generate([prompt], sp)
        assert eng.generate([prompt], sp)[0].num_cached_tokens == 36
        # the same weights under a new version: nothing computed before may be reused
        params = dict(eng.runner.model.named_parameters())
        w = params["model.norm.weight"].detach().clone()
        eng.update_weights([("model.norm.weight", w)])
        again = eng.generate([prompt], sp)[0]
        assert again.num_cached_tokens == 0 and again.weight_version == 1
        assert eng.generate([prompt], sp)[0].num_cached_tokens == 36
        eng.call(eng.check_integrity)


def test_flush_cache_while_running_never_fails(llama_dir):
    import threading

    prompt = random_prompts([30], seed=25)[0]
    with Engine(llama_dir, page_size=4) as eng:
        t = threading.Thread(target=eng.generate, args=([prompt] * 3, SamplingParams(max_new_tokens=200,
                                                                                     ignore_eos=True)))
        t.start()
        for _ in range(5):
            eng.flush_cache()
        t.join()
        eng.flush_cache()
        eng.call(eng.check_integrity)
        assert eng.stats()["kv_free_pages"] == eng.stats()["kv_total_pages"]
