"""GRPO / DAPO-style policy loss over padded token tensors.

For each generated token (loss_mask = 1):
    ratio   = exp(logp - old_logp)                      old_logp: the trainer's logprob before this update
    pg      = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)     (DAPO: eps_high >= eps_low)
    tis     = min(exp(old_logp - rollout_logp), tis_cap)  truncated importance weight correcting the
                                                          rollout (engine) / trainer logprob mismatch
    kl      = exp(ref - logp) - (ref - logp) - 1        (k3 estimator, only with a reference model)
    loss    = agg(tis * pg + kl_coef * kl)
Aggregation: "token-mean" (DAPO: every token of the batch counts equally) or "seq-mean-token-mean" (GRPO).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LossOutput:
    loss: torch.Tensor
    metrics: dict[str, float]


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    rollout_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    kl_coef: float = 0.0,
    tis_cap: float | None = 2.0,
    agg: str = "token-mean",
) -> LossOutput:
    """All tensors [B, T] (advantages may be [B] or [B, T]); mask is 1 on tokens to train on."""
    mask = mask.to(logp.dtype)
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(logp)
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * advantages
    pg = -torch.minimum(unclipped, clipped)
    if rollout_logp is not None and tis_cap is not None:
        tis = torch.exp(old_logp - rollout_logp).clamp(max=tis_cap).detach()
        pg = pg * tis
    per_token = pg
    kl = None
    if ref_logp is not None and kl_coef > 0:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        per_token = per_token + kl_coef * kl
    if agg == "token-mean":
        loss = masked_mean(per_token, mask)
    elif agg == "seq-mean-token-mean":
        per_seq = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)
        loss = per_seq.mean()
    else:
        raise ValueError(f"unknown loss aggregation {agg!r}")
    with torch.no_grad():
        metrics = {
            "clip_fraction": float(masked_mean(((ratio - 1).abs() > clip_low).to(mask.dtype), mask)),
            "ratio_mean": float(masked_mean(ratio, mask)),
            "pg_loss": float(masked_mean(pg, mask)),
        }
        if kl is not None:
            metrics["kl"] = float(masked_mean(kl, mask))
    return LossOutput(loss, metrics)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """logits [B, T, V] predicting targets [B, T] -> log softmax(logits / T) at the targets, [B, T].

    The same quantity the engine returns as output_logprobs (temperature 0 counts as 1)."""
    t = temperature if temperature > 0 else 1.0
    logits = logits.float() / t
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None]).squeeze(-1)
