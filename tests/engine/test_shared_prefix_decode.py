"""Decode attention that reads a KV prefix shared by adjacent rows once per group (the Triton backend, run
here by the Triton interpreter): the n samples of a GRPO prompt decode exactly as with it off."""

from __future__ import annotations

from gyre import Engine, SamplingParams

from .helpers import random_prompts


def _run(path, prompts, sp, **kw):
    with Engine(path, page_size=16, max_num_tokens=4096, **kw) as eng:
        outs = eng.generate(prompts, sp)
        stats = eng.stats()
        eng.call(eng.check_integrity)
    return outs, stats


def test_grpo_samples_read_their_prompt_once(llama_dir):
    # 2 prompts x 4 samples: decode rows 0-3 and 4-7 share their prompts' first 288 and 272 tokens
    prompts = random_prompts([300, 280], seed=31)
    sp = SamplingParams(max_new_tokens=5, temperature=1.0, n=4, seed=5, ignore_eos=True, top_logprobs=2)
    shared, s_on = _run(llama_dir, prompts, sp, attention_backend="triton")
    plain, s_off = _run(llama_dir, prompts, sp, attention_backend="triton", shared_prefix_decode=False)
    ref, _ = _run(llama_dir, prompts, sp, attention_backend="torch")
    assert s_on["shared_prefix_decode_steps"] >= 2 and s_off["shared_prefix_decode_steps"] == 0
    for a, b, c in zip(shared, plain, ref):
        assert a.output_ids == b.output_ids == c.output_ids
        assert max(abs(x - y) for x, y in zip(a.output_logprobs, b.output_logprobs)) < 1e-5
        assert max(abs(x - y) for x, y in zip(a.output_logprobs, c.output_logprobs)) < 1e-4
