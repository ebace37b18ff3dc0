"""Sessions: multi-turn KV reuse, exact trajectories, eviction + recompute, chat rendering, errors."""

from __future__ import annotations

import pytest
import torch

from gyre import Engine, SamplingParams

from .helpers import random_prompts

GREEDY = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)


def _turns(session, chunks):
    outs = []
    for chunk in chunks:
        outs.append(session.generate(chunk, GREEDY))
    return outs


def test_turns_equal_full_context_generation(llama_dir):
    chunks = random_prompts([20, 7, 13, 5], seed=30)
    with Engine(llama_dir, page_size=4) as eng:
        s = eng.open_session()
        outs = _turns(s, chunks)
        traj = s.trajectory()
        # exact trajectory: appended + generated tokens, nothing else
        expect, mask = [], []
        for chunk, out in zip(chunks, outs):
            expect += chunk + out.output_ids
            mask += [0] * len(chunk) + [1] * len(out.output_ids)
        assert traj.token_ids == expect and traj.loss_mask == mask
        assert [lp is None for lp in traj.logprobs] == [m == 0 for m in mask]
        assert all(v == 0 for v, m in zip(traj.weight_versions, mask) if m)
        # each turn equals one full-context generation of the same tokens
        history: list[int] = []
        for chunk, out in zip(chunks, outs):
            history += chunk
            full = eng.generate([history], GREEDY)[0]
            assert full.output_ids == out.output_ids
            assert torch.allclose(torch.tensor(full.output_logprobs), torch.tensor(out.output_logprobs), atol=1e-4)
            history += out.output_ids
        assert outs[-1].num_cached_tokens >= len(history) - len(chunks[-1]) - len(outs[-1].output_ids) - 4
        s.close()
        eng.flush_cache()
        eng.call(eng.check_integrity)
        assert eng.stats()["kv_free_pages"] == eng.stats()["kv_total_pages"]


def test_eviction_under_memory_pressure_recomputes_identically(llama_dir):
    chunks = random_prompts([24, 8, 8], seed=31)
    noise = random_prompts([60, 70], seed=32)
    with Engine(llama_dir, page_size=4) as big:
        ref = _turns(big.open_session(), chunks)
    with Engine(llama_dir, page_size=4, max_num_tokens=160) as eng:
        s = eng.open_session()
        outs = [s.generate(chunks[0], GREEDY)]
        # other traffic needs the memory the idle session holds
        eng.generate(noise, SamplingParams(max_new_tokens=20, ignore_eos=True))
        outs += [s.generate(c, GREEDY) for c in chunks[1:]]
        eng.call(eng.check_integrity)
    assert [o.output_ids for o in outs] == [o.output_ids for o in ref]
    assert ref[1].num_cached_tokens >= 28 and outs[1].num_cached_tokens < ref[1].num_cached_tokens  # evicted


def test_append_rewind_and_closed_session(llama_dir):
    a, b = random_prompts([10, 5], seed=33)
    with Engine(llama_dir, page_size=4) as eng:
        s = eng.open_session()
        first = s.generate(a, GREEDY)
        s.append(b)
        s.append([9, 9], trainable=True)
        traj = s.trajectory()
        assert traj.token_ids == a + first.output_ids + b + [9, 9]
        assert traj.loss_mask[-2:] == [1, 1] and traj.loss_mask[-4:-2] == [0, 0]
        cont = s.generate(None, GREEDY)  # continue from what is there
        assert cont.prompt_ids == traj.token_ids
        s.rewind(3)
        assert s.trajectory().token_ids == a + first.output_ids
        with pytest.raises(ValueError, match="rewind"):
            s.rewind(5)
        with pytest.raises(ValueError, match="outside the vocabulary"):
            s.append([10**9])
        s.close()
        with pytest.raises(ValueError, match="closed"):
            s.generate([1, 2], GREEDY)
        with pytest.raises(ValueError, match="closed"):
            s.trajectory()
        with pytest.raises(KeyError, match="unknown or closed"):
            eng.get_session(s.session_id)


def test_idle_session_expires(llama_dir):
    import time

    with Engine(llama_dir, page_size=4, session_timeout_s=0.3) as eng:
        s = eng.open_session()
        s.generate([5, 6, 7], GREEDY)
        time.sleep(1.5)
        eng.generate([[1, 2]], GREEDY)  # the loop sweeps sessions
        time.sleep(1.2)
        assert s.closed and "expired" in s.close_reason


def test_chat_messages_are_append_only(qwen3_dir):
    with Engine(qwen3_dir, page_size=4) as eng:
        tok = eng.tokenizer
        s = eng.open_session()
        sp = SamplingParams(max_new_tokens=5, temperature=0.0)
        msgs = [{"role": "system", "content": "You add numbers."}, {"role": "user", "content": "2 + 3 ="}]
        out1 = s.generate(msgs, sp)
        t1 = s.token_ids
        expected_prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert t1[: len(out1.prompt_ids)] == tok.encode(expected_prompt, add_special_tokens=False)
        out2 = s.generate([{"role": "user", "content": "and 4 + 4 ="}], sp)
        t2 = s.token_ids
        assert t2[: len(t1)] == t1  # earlier tokens never change
        assert out2.prompt_ids == t2[: len(out2.prompt_ids)]
        delta = tok.decode(t2[len(t1): len(out2.prompt_ids)], skip_special_tokens=False)
        assert "and 4 + 4 =" in delta and delta.rstrip().endswith("<|im_start|>assistant")
        # a tool turn: all of its results appended together, as environment tokens
        n_before = len(s.token_ids)
        s.append([{"role": "tool", "content": "8"}])
        assert s.trajectory().loss_mask[n_before:] == [0] * (len(s.token_ids) - n_before)
