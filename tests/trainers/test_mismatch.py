"""Logprob-mismatch metrics: the formulas, and HF recomputation of an engine's samples."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from gyre import Engine, SamplingParams
from gyre.trainers.mismatch import mismatch_stats, rollout_mismatch, trainer_logprobs


def test_stats_formulas():
    engine = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.0, -9.0]])
    trainer = torch.tensor([[-1.1, -2.0, -0.3], [-3.0, -1.5, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # the last one is not a sampled token
    s = mismatch_stats(trainer, engine, mask)
    d = [-0.1, 0.0, 0.2, 0.0, -0.5]
    assert s.num_tokens == 5
    assert math.isclose(s.mean_abs_diff, sum(map(abs, d)) / 5, rel_tol=1e-6)
    assert math.isclose(s.max_abs_diff, 0.5, rel_tol=1e-6)
    assert math.isclose(s.mean_diff, sum(d) / 5, rel_tol=1e-5)
    assert math.isclose(s.kl_k3, sum(math.exp(x) - 1 - x for x in d) / 5, rel_tol=1e-5)
    assert s.kl_k3 > 0 and mismatch_stats(engine, engine).kl_k3 == 0.0
    assert set(s.as_dict()) == {
        f"mismatch/{k}" for k in ("mean_abs_diff", "max_abs_diff", "kl_k3", "mean_diff", "num_tokens")
    }
    with pytest.raises(ValueError, match="shapes differ"):
        mismatch_stats(trainer, engine[:1])


def test_padded_batches_equal_one_by_one(model_dirs):
    model = AutoModelForCausalLM.from_pretrained(model_dirs["llama"], dtype=torch.float32).eval()
    seqs = [[5, 6, 7, 8, 9, 10, 11], [400, 3], [20, 21, 22, 23]]
    batched = trainer_logprobs(model, seqs, batch_size=3)
    for s, b in zip(seqs, batched):
        assert b.shape == (len(s) - 1,)
        torch.testing.assert_close(b, trainer_logprobs(model, [s])[0], atol=1e-5, rtol=0)


def test_engine_samples_and_session_trajectories(model_dirs):
    path = model_dirs["qwen3_moe"]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    sp = SamplingParams(max_new_tokens=10, temperature=0.7, ignore_eos=True, seed=3)
    with Engine(path, device="cpu", max_num_tokens=1024) as eng:
        outs = eng.generate([[5, 6, 7], [100, 200, 300, 400, 500]], sp)
        session = eng.open_session()
        session.generate([9, 10, 11], sp)
        session.append([12, 13], trainable=False)  # environment tokens: no engine logprob
        session.generate(None, sp)
        traj = session.trajectory()
        session.close()
    s = rollout_mismatch(model, outs, temperature=0.7)
    assert s.num_tokens == 20 and s.mean_abs_diff < 1e-4 and s.max_abs_diff < 1e-3
    t = rollout_mismatch(model, [traj], temperature=0.7)
    assert t.num_tokens == 20 and t.mean_abs_diff < 1e-4
    wrong_t = rollout_mismatch(model, outs, temperature=1.0)  # recomputed at another temperature
    assert wrong_t.mean_abs_diff > 100 * s.mean_abs_diff
