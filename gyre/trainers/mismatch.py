"""Train-inference mismatch: the trainer's logprobs of rollout tokens against the engine's.

The engine reports log_softmax(logits / T) of each sampled token (T = 1 for greedy). Recomputing them
with the trainer's model and comparing is the check that the two run the same policy: a wrong weight
mapping, a dtype or kernel difference, or a stale weight version shows up here and nowhere else.

    stats = rollout_mismatch(model, completions, temperature=sampling.temperature)
    log(stats.as_dict())  # mismatch/mean_abs_diff, mismatch/max_abs_diff, mismatch/kl_k3, ...

kl_k3 is the k3 estimator (r - 1) - log r with r = p_trainer / p_engine, averaged over tokens sampled
by the engine: an unbiased, always non-negative estimate of KL(engine || trainer).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

LogitsFn = Callable[
    [torch.Tensor, torch.Tensor], torch.Tensor
]  # (input_ids, attention_mask) [B, T] -> [B, T, V]


@dataclass
class MismatchStats:
    mean_abs_diff: float
    max_abs_diff: float
    kl_k3: float
    mean_diff: float  # trainer - engine; a sign that stays away from 0 is a bias, not noise
    num_tokens: int

    def as_dict(self, prefix: str = "mismatch/") -> dict[str, float]:
        return {prefix + k: v for k, v in asdict(self).items()}


def mismatch_stats(
    trainer_logprobs: torch.Tensor, engine_logprobs: torch.Tensor, mask: torch.Tensor | None = None
) -> MismatchStats:
    """Per-token logprobs of the same tokens (any equal shapes); mask selects the tokens to count."""
    if trainer_logprobs.shape != engine_logprobs.shape:
        raise ValueError(
            f"shapes differ: trainer {tuple(trainer_logprobs.shape)}, engine {tuple(engine_logprobs.shape)}"
        )
    lp_t, lp_e = trainer_logprobs.double(), engine_logprobs.double().to(trainer_logprobs.device)
    if mask is not None:
        mask = mask.to(lp_t.device, torch.bool)
        lp_t, lp_e = lp_t[mask], lp_e[mask]
    if lp_t.numel() == 0:
        return MismatchStats(0.0, 0.0, 0.0, 0.0, 0)
    log_ratio = (lp_t - lp_e).flatten()  # log p_trainer - log p_engine
    k3 = torch.expm1(log_ratio) - log_ratio
    return MismatchStats(
        mean_abs_diff=log_ratio.abs().mean().item(),
        max_abs_diff=log_ratio.abs().max().item(),
        kl_k3=k3.mean().item(),
        mean_diff=log_ratio.mean().item(),
        num_tokens=log_ratio.numel(),
    )


def rollout_tokens(sample: Any) -> tuple[list[int], list[float | None]]:
    """(token_ids, engine logprob per token, None where the engine did not sample the token) of a
    Completion (prompt + output) or a session Trajectory."""
    if hasattr(sample, "output_logprobs"):
        ids = list(sample.prompt_ids) + list(sample.output_ids)
        return ids, [None] * len(sample.prompt_ids) + list(sample.output_logprobs)
    if hasattr(sample, "token_ids") and hasattr(sample, "logprobs"):
        return list(sample.token_ids), list(sample.logprobs)
    raise TypeError(f"expected a Completion or a Trajectory, got {type(sample).__name__}")


@torch.no_grad()
def trainer_logprobs(
    model: nn.Module | LogitsFn,
    token_ids: Sequence[Sequence[int]],
    temperature: float = 1.0,
    batch_size: int = 8,
    pad_id: int = 0,
) -> list[torch.Tensor]:
    """log_softmax(logits / T)[next token] at every position of each sequence: [len - 1] float32, entry
    i for token i + 1. `model` is an HF causal LM (called as model(input_ids=, attention_mask=).logits),
    a gyre training model (gyre.trainers.training_forward: sequences packed whole, no padding, so against
    an `Engine(deterministic=True)` with the same weights the difference is exactly 0) or a function
    (input_ids, attention_mask) -> logits. Sequences are right-padded in batches; an FSDP model needs
    every rank to call this with the same number of sequences."""
    t = temperature if temperature > 0 else 1.0
    device = _device_of(model)
    out: list[torch.Tensor] = []
    for start in range(0, len(token_ids), batch_size):
        seqs = token_ids[start : start + batch_size]
        if is_training_model(model):
            from gyre.trainers.training_forward import sequence_logprobs

            out += [lp.float().cpu() for lp in sequence_logprobs(model, seqs, temperature)]
            continue
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        attn = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.as_tensor(list(s))
            attn[i, : len(s)] = 1
        ids, attn = ids.to(device), attn.to(device)
        if isinstance(model, nn.Module):
            logits = model(input_ids=ids, attention_mask=attn).logits
        else:
            logits = model(ids, attn)
        logp = torch.log_softmax(logits[:, :-1].float() / t, dim=-1)  # [B, T-1, V]
        chosen = logp.gather(2, ids[:, 1:, None]).squeeze(2)  # [B, T-1]
        out += [chosen[i, : len(s) - 1].cpu() for i, s in enumerate(seqs)]
    return out


def rollout_mismatch(
    model: nn.Module | LogitsFn, samples: Sequence[Any], temperature: float = 1.0, batch_size: int = 8
) -> MismatchStats:
    """Recompute the trainer's logprobs of every engine-sampled token of `samples` (Completions or
    Trajectories) and compare them with the engine's."""
    seqs, engine = zip(*(rollout_tokens(s) for s in samples)) if samples else ((), ())
    trainer = trainer_logprobs(model, seqs, temperature, batch_size)
    lp_t, lp_e = [], []
    for recomputed, reported in zip(trainer, engine):
        for pos, lp in enumerate(reported):
            if lp is not None:
                if pos == 0:
                    raise ValueError("a sampled token at position 0 has no context to recompute it from")
                lp_t.append(recomputed[pos - 1])
                lp_e.append(lp)
    if not lp_t:
        return mismatch_stats(torch.zeros(0), torch.zeros(0))
    return mismatch_stats(torch.stack(lp_t), torch.tensor(lp_e, dtype=torch.float64))


def is_training_model(model: Any) -> bool:
    """A gyre model (gyre.trainers.training_forward), not an HF one: it computes logits from hidden states."""
    return isinstance(model, nn.Module) and hasattr(model, "compute_logits")


def _device_of(model: nn.Module | LogitsFn) -> torch.device:
    if isinstance(model, nn.Module):
        p = next(model.parameters(), None)
        if p is not None:
            return p.device
    return torch.device("cpu")
