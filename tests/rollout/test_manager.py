"""RolloutManager: dynamic sampling, exactly-once delivery, async rollouts across weight updates."""

from __future__ import annotations

import functools
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers import AutoModelForCausalLM

from gyre import Engine, SamplingParams
from gyre.rollout import LocalPool, RolloutConfig, RolloutManager, SingleTurnEnv

from .helpers import freeze_mid_generation, perturbed_weights


def _tasks(n: int, kinds=("mixed",)):
    return [
        {
            "prompt": f"Question {i}: what is {i} plus {i}?",
            "answer": str(2 * i),
            "id": i,
            "kind": kinds[i % len(kinds)],
        }
        for i in range(n)
    ]


def _reward(text: str, task: dict) -> float:
    if task["kind"] == "easy":
        return 1.0
    if task["kind"] == "hard":
        return 0.0
    return float(sum(map(ord, text)) % 2)  # varies between samples of one prompt


@pytest.fixture
def engine(qwen3_dir):
    with Engine(qwen3_dir, page_size=4) as eng:
        yield eng


def _env():
    return SingleTurnEnv(_reward)


def test_dynamic_sampling_fills_batches_with_informative_groups(engine):
    cfg = RolloutConfig(
        batch_size=3,
        n_samples_per_prompt=4,
        sampling=SamplingParams(max_new_tokens=8),
        dynamic_sampling=True,
        oversample=2.0,
    )
    tasks = _tasks(60, kinds=("easy", "mixed", "hard"))
    delivered = []
    with RolloutManager(LocalPool(engine), _env, tasks, cfg) as manager:
        for _ in range(2):
            batch = manager.get_batch(timeout=60)
            assert len(batch.groups) == 3 and len(batch) == 12
            for g in batch.groups:
                assert not g.is_degenerate and len(set(g.rewards)) == 2 and g.task["kind"] == "mixed"
                assert [s.uid for s in g.samples] == [f"{g.group_id}/{k}/policy" for k in range(4)]
            delivered += batch.groups
        counters = dict(manager.counters)
    assert counters["dropped_degenerate"] >= 4  # at least the easy and hard prompts before 6 mixed ones
    assert batch.metrics["dropped_degenerate"] == counters["dropped_degenerate"]
    # exactly once: no group, and no prompt, delivered twice (over-sampled groups cancelled at the end of
    # a batch are requeued, not lost or repeated)
    assert len({g.group_id for g in delivered}) == 6 and len({g.task["id"] for g in delivered}) == 6


def test_sync_batches_deliver_every_prompt_once(engine):
    cfg = RolloutConfig(
        batch_size=4, n_samples_per_prompt=2, sampling=SamplingParams(max_new_tokens=6), oversample=1.5
    )
    with RolloutManager(LocalPool(engine), _env, _tasks(10), cfg) as manager:
        batches = []
        while (b := manager.get_batch(timeout=60)) is not None:
            batches.append(b)
    assert [len(b.groups) for b in batches] == [4, 4, 2]  # the last batch takes what is left
    ids = sorted(g.task["id"] for b in batches for g in b.groups)
    assert ids == list(range(10))
    uids = [s.uid for b in batches for s in b.samples]
    assert len(uids) == len(set(uids)) == 20


def test_aborted_turns_rerun_the_episode(engine):
    """A turn the engine ends with "abort" (a failed step, a shutdown, here: an operator's abort) makes
    its episode run again from scratch; every sample still arrives exactly once, whole."""
    cfg = RolloutConfig(
        batch_size=2, n_samples_per_prompt=3, sampling=SamplingParams(max_new_tokens=30, ignore_eos=True)
    )
    with RolloutManager(LocalPool(engine), _env, _tasks(2), cfg) as manager, ThreadPoolExecutor(1) as ex:
        future = ex.submit(manager.get_batch, 60)
        freeze_mid_generation(engine)
        engine.abort()  # every running request ends with its partial output
        engine.resume()
        batch = future.result()
        retries = manager.counters["episode_retries"]
    assert retries >= 1
    assert sorted(s.uid for s in batch.samples) == sorted(
        f"g{g}/{k}/policy" for g in range(2) for k in range(3)
    )
    assert all(len(s.response_ids) == 30 and s.num_generated == 30 for s in batch.samples)


@functools.lru_cache(maxsize=4)
def _hf(model_dir: str, version: int):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if version:
        model.load_state_dict(dict(perturbed_weights(model_dir, version)))
    return model


def _check_logprobs(model_dir: str, sample) -> None:
    """Each generated token's logprob is that of the weights its version names, given everything before it."""
    for v in sorted({v for v in sample.weight_versions if v is not None}):
        with torch.no_grad():
            logits = _hf(model_dir, v)(torch.tensor([sample.token_ids])).logits[0]
        logp = torch.log_softmax(logits.float(), -1)
        p = len(sample.prompt_ids)
        for i, (tok, lp, ver) in enumerate(zip(sample.response_ids, sample.logprobs, sample.weight_versions)):
            if ver == v:
                assert abs(logp[p + i - 1, tok].item() - lp) < 2e-3, (i, v)


def _async_config(**kw) -> RolloutConfig:
    kw = {
        "batch_size": 2,
        "n_samples_per_prompt": 2,
        "mode": "async",
        "max_inflight_groups": 2,
        "sampling": SamplingParams(max_new_tokens=40, ignore_eos=True),
        **kw,
    }
    return RolloutConfig(**kw)


def _check_versions(batch, max_staleness: int) -> None:
    for s in batch.samples:
        gen = [v for v in s.weight_versions if v is not None]
        assert gen == sorted(gen)  # a version never goes back within a sample
        assert batch.policy_version - gen[0] <= max_staleness and gen[-1] <= batch.policy_version


def test_async_rollouts_across_weight_updates_recompute(engine, qwen3_dir):
    """Generation for step t+1 runs while the trainer trains step t; an update lands mid-generation and
    the partial rollouts continue (KV recomputed by the new weights) with per-token versions."""
    with RolloutManager(
        LocalPool(engine), _env, _tasks(40), _async_config(update_mode="recompute")
    ) as manager:
        batches = []
        for step in range(3):
            batches.append(manager.get_batch(timeout=60))
            assert batches[-1].policy_version == step
            freeze_mid_generation(engine)  # "training" while step t+1 is half generated
            assert manager.num_inflight_groups > 0
            manager.update_weights(perturbed_weights(qwen3_dir, step + 1), version=step + 1)
        batches.append(manager.get_batch(timeout=60))
    mixed = [s for b in batches for s in b.samples if s.min_version != s.max_version]
    assert len(mixed) >= 2  # the in-flight groups of each update
    for b in batches:
        _check_versions(b, max_staleness=1)
    assert max(b.metrics["staleness/max"] for b in batches) == 1
    for s in mixed[:4]:
        _check_logprobs(qwen3_dir, s)
    _check_logprobs(qwen3_dir, batches[0].samples[0])


def test_staleness_bound_is_respected(engine, qwen3_dir):
    # max_staleness=0: nothing runs ahead of the trainer, every token is from the current policy
    with RolloutManager(LocalPool(engine), _env, _tasks(40), _async_config(max_staleness=0)) as manager:
        for step in range(3):
            batch = manager.get_batch(timeout=60)
            assert {v for s in batch.samples for v in s.weight_versions if v is not None} == {step}
            time.sleep(0.05)
            assert manager.num_inflight_groups == 0  # waits for the update
            manager.update_weights(perturbed_weights(qwen3_dir, step + 1), version=step + 1)
    # max_staleness=1: generation runs ahead; groups that grew 2 versions stale are dropped, not delivered
    with RolloutManager(LocalPool(engine), _env, _tasks(40), _async_config(max_staleness=1)) as manager:
        b0 = manager.get_batch(timeout=60)
        freeze_mid_generation(engine)
        manager.update_weights(perturbed_weights(qwen3_dir, 4), version=4)
        manager.update_weights(perturbed_weights(qwen3_dir, 5), version=5)
        b1 = manager.get_batch(timeout=60)
        dropped = manager.counters["dropped_stale"]
    _check_versions(b0, 1)
    _check_versions(b1, 1)
    assert dropped >= 1 and b1.metrics["dropped_stale"] == dropped
    assert not {g.group_id for g in b0.groups} & {g.group_id for g in b1.groups}


def test_restart_mode_never_mixes_versions(engine, qwen3_dir):
    with RolloutManager(LocalPool(engine), _env, _tasks(40), _async_config(update_mode="restart")) as manager:
        manager.get_batch(timeout=60)
        freeze_mid_generation(engine)
        manager.update_weights(perturbed_weights(qwen3_dir, 1), version=1)
        batch = manager.get_batch(timeout=60)
        restarts = manager.counters["episode_restarts"]
    assert restarts >= 1
    assert all(s.min_version == s.max_version == 1 for s in batch.samples)
    assert all(len(s.response_ids) == 40 for s in batch.samples)


def test_external_weight_push_and_failed_updates(engine, qwen3_dir):
    cfg = RolloutConfig(batch_size=1, n_samples_per_prompt=2, sampling=SamplingParams(max_new_tokens=4))
    with RolloutManager(LocalPool(engine), _env, _tasks(10), cfg) as manager:
        # weights pushed by another channel (gyre.weight_sync) inside the manager's update protocol
        with manager.weight_update(version=7):
            engine.update_weights(perturbed_weights(qwen3_dir, 1), version=7)
        batch = manager.get_batch(timeout=60)
        assert manager.policy_version == 7 and {v for s in batch.samples for v in s.weight_versions} == {7}
        # a rejected update changes nothing: same version, engines running
        with pytest.raises(ValueError, match="unknown tensor name"):
            manager.update_weights([("no.such.weight", torch.zeros(1))], version=8)
        with pytest.raises(RuntimeError, match="push failed"), manager.weight_update(version=9):
            raise RuntimeError("push failed")
        assert manager.policy_version == 7 and manager.pool.weight_version == 7
        batch = manager.get_batch(timeout=60)
        assert {v for s in batch.samples for v in s.weight_versions} == {7}


def test_errors_surface_in_get_batch(engine):
    def tasks():
        yield from _tasks(1)
        raise OSError("dataset shard missing")

    cfg = RolloutConfig(batch_size=2, n_samples_per_prompt=2, sampling=SamplingParams(max_new_tokens=4))
    with RolloutManager(LocalPool(engine), _env, tasks(), cfg) as manager:
        with pytest.raises(OSError, match="shard missing"):
            manager.get_batch(timeout=60)
    with RolloutManager(LocalPool(engine), lambda: SingleTurnEnv(lambda t, task: 1 / 0), _tasks(2), cfg) as m:
        with pytest.raises(ZeroDivisionError):
            m.get_batch(timeout=60)
