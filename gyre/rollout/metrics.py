"""Rollout metrics: a plain dict per batch, and a wandb logger (offline unless configured).

Keys: reward/{mean,std,<agent>}, response_length/{mean,max}, prompt_length/mean, num_samples,
num_generated_tokens, truncated_frac, staleness/{mean,max} (policy version at delivery minus the
oldest version of a sample's tokens), throughput/tokens_per_s (generated tokens of the batch over the
time since the previous batch), cache_hit_rate (cumulative, over the pool's engines), weight_sync_s
(the last update), policy_version, and the manager's counters (dropped_degenerate, dropped_stale,
episode_retries, episode_restarts: cumulative).
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Mapping
from typing import Any

from gyre.rollout.data import Batch


def batch_metrics(
    batch: Batch,
    elapsed_s: float = 0.0,
    pool_stats: Mapping[str, float] | None = None,
    weight_sync_s: float = 0.0,
    counters: Mapping[str, int] | None = None,
) -> dict[str, float]:
    samples = batch.samples
    if not samples:
        return {}
    rewards = [s.reward for s in samples]
    lengths = [len(s.response_ids) for s in samples]
    generated = sum(s.num_generated for s in samples)
    stale = [batch.policy_version - v for s in samples if (v := s.min_version) is not None]
    m: dict[str, float] = {
        "reward/mean": statistics.fmean(rewards),
        "reward/std": statistics.pstdev(rewards),
        "response_length/mean": statistics.fmean(lengths),
        "response_length/max": float(max(lengths)),
        "prompt_length/mean": statistics.fmean(len(s.prompt_ids) for s in samples),
        "num_samples": float(len(samples)),
        "num_groups": float(len(batch.groups)),
        "num_generated_tokens": float(generated),
        "truncated_frac": statistics.fmean(float(s.metadata.get("truncated", False)) for s in samples),
        "staleness/mean": statistics.fmean(stale) if stale else 0.0,
        "staleness/max": float(max(stale, default=0)),
        "throughput/tokens_per_s": generated / elapsed_s if elapsed_s > 0 else 0.0,
        "weight_sync_s": weight_sync_s,
        "policy_version": float(batch.policy_version),
    }
    agents = sorted({s.agent for s in samples})
    if len(agents) > 1:
        for a in agents:
            m[f"reward/{a}"] = statistics.fmean(s.reward for s in samples if s.agent == a)
    if pool_stats:
        m["cache_hit_rate"] = float(pool_stats.get("cache_hit_rate", 0.0))
        for k in ("spec_acceptance_rate", "spec_mean_accept_len"):  # speculative decoding, cumulative
            if k in pool_stats:
                m[f"spec/{k[5:]}"] = float(pool_stats[k])
    for k, v in (counters or {}).items():
        m[k] = float(v)
    return m


class WandbLogger:
    """Logs metric dicts to wandb. Offline (files under `dir`, sync later with `wandb sync`) unless
    mode or WANDB_MODE says otherwise; wandb is imported only here."""

    def __init__(
        self,
        project: str = "gyre",
        mode: str | None = None,
        dir: str | None = None,
        config: dict[str, Any] | None = None,
        **init_kwargs: Any,
    ) -> None:
        import wandb

        self.run = wandb.init(
            project=project,
            mode=mode or os.environ.get("WANDB_MODE", "offline"),
            dir=dir,
            config=config,
            **init_kwargs,
        )

    def log(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.run.log(dict(metrics), step=step)

    def finish(self) -> None:
        self.run.finish()
