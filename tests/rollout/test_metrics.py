"""Rollout metrics: the plain dict every batch carries, and the wandb logger (offline)."""

from __future__ import annotations

import importlib.util

import pytest

from gyre import Engine, SamplingParams
from gyre.rollout import LocalPool, RolloutConfig, RolloutManager, SingleTurnEnv, WandbLogger, math_reward


class ListLogger:
    def __init__(self):
        self.logged = []

    def log(self, metrics, step):
        self.logged.append((step, dict(metrics)))


def _run(qwen3_dir, logger, **engine_kwargs):
    tasks = [{"prompt": "Alice has 5 apples and eats 2. How many are left? " * 2, "answer": "#### 3"}] * 4
    cfg = RolloutConfig(batch_size=2, n_samples_per_prompt=2, sampling=SamplingParams(max_new_tokens=6))
    with (
        Engine(qwen3_dir, page_size=4, **engine_kwargs) as engine,
        RolloutManager(LocalPool(engine), lambda: SingleTurnEnv(math_reward), tasks, cfg, logger=logger) as m,
    ):
        b1 = m.get_batch(timeout=60)
        m.update_weights([], version=1)  # an empty update still bumps the version (and is timed)
        b2 = m.get_batch(timeout=60)
    return b1, b2


def test_batch_metrics_dict(qwen3_dir):
    logger = ListLogger()
    b1, b2 = _run(qwen3_dir, logger)
    assert [step for step, _ in logger.logged] == [1, 2]
    m = b2.metrics
    for key in (
        "reward/mean",
        "reward/std",
        "response_length/mean",
        "response_length/max",
        "num_samples",
        "num_generated_tokens",
        "staleness/max",
        "throughput/tokens_per_s",
        "cache_hit_rate",
        "weight_sync_s",
        "policy_version",
        "dropped_degenerate",
        "dropped_stale",
        "episode_retries",
    ):
        assert isinstance(m[key], float), key
    assert m["num_samples"] == 4 and m["policy_version"] == 1 and m["weight_sync_s"] > 0
    assert m["throughput/tokens_per_s"] > 0 and m["num_generated_tokens"] == sum(
        s.num_generated for s in b2.samples
    )
    assert b1.metrics["cache_hit_rate"] > 0  # four samples share one long prompt


def test_spec_metrics(qwen3_dir):
    b1, _ = _run(qwen3_dir, ListLogger(), spec_method="ngram")
    assert b1.metrics["spec/mean_accept_len"] >= 1.0 and 0.0 <= b1.metrics["spec/acceptance_rate"] <= 1.0


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="needs wandb")
def test_wandb_logger_offline(qwen3_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(project="gyre-test", dir=str(tmp_path))
    assert logger.run.settings.mode == "offline"
    _run(qwen3_dir, logger)  # the manager finishes the run when it closes
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
