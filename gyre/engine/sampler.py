"""Sampling: temperature, top-k, top-p, min-p, per-request seeds, logprobs, top logprobs.

Noise comes from gyre.kernels.random (hash of seed, step, token index), so a request's tokens depend
only on its own logits, seed and position: not on the batch, retraction or backend. Greedy rows take
argmax. Logprobs are log_softmax(logits / T) at the sampled token (T = 1 for greedy), before any
top-k / top-p / min-p truncation (not renormalised); grammar masks are applied before everything.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gyre.engine.request import Request
from gyre.kernels.random import gumbel_noise


@dataclass
class SampleOutput:
    tokens: list[int]
    logprobs: list[float]
    top_logprobs: list[dict[int, float] | None]


def sample_torch(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                 min_p: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """logits [B, V] float32 and per-row parameters [B] -> tokens [B] int64 (reference semantics)."""
    greedy = temperature <= 0
    z = logits / torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]
    vocab = z.shape[1]
    keep = torch.ones_like(z, dtype=torch.bool)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    if bool((k < vocab).any()):
        kth = torch.topk(z, int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None].to(torch.int64))
        keep &= z >= kth
    probs = torch.softmax(z, dim=-1)
    if bool((min_p > 0).any()):
        keep &= probs >= min_p[:, None] * probs.max(dim=-1, keepdim=True).values
    if bool((top_p < 1).any()):
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass strictly above each token
        keep_sorted = before < top_p[:, None]
        keep &= torch.zeros_like(keep).scatter(1, order, keep_sorted)
    noisy = torch.where(keep, z + gumbel_noise(seeds, steps, vocab).to(z.device), float("-inf"))
    return torch.where(greedy, logits.argmax(dim=-1), noisy.argmax(dim=-1))


class Sampler:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, logits: torch.Tensor, reqs: list[Request], masks: torch.Tensor | None = None) -> SampleOutput:
        """logits [B, V] float32, one row per request; masks [B, V] bool (True = allowed) or None."""
        if masks is not None:
            logits = logits.masked_fill(~masks, float("-inf"))
        sp = [r.sampling for r in reqs]
        dev = logits.device
        temperature = torch.tensor([s.temperature for s in sp], dtype=torch.float32, device=dev)
        tokens = sample_torch(
            logits,
            temperature,
            torch.tensor([s.top_k for s in sp], dtype=torch.int32, device=dev),
            torch.tensor([s.top_p for s in sp], dtype=torch.float32, device=dev),
            torch.tensor([s.min_p for s in sp], dtype=torch.float32, device=dev),
            torch.tensor([r.seed for r in reqs], dtype=torch.int64, device=dev),
            torch.tensor([len(r.output_ids) for r in reqs], dtype=torch.int64, device=dev),
        )
        t_eff = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
        logp = torch.log_softmax(logits / t_eff[:, None], dim=-1)
        chosen = logp.gather(1, tokens[:, None]).squeeze(1)
        max_top = max(s.top_logprobs for s in sp)
        tops: list[dict[int, float] | None] = [None] * len(reqs)
        if max_top > 0:
            vals, ids = torch.topk(logp, max_top, dim=-1)
            vals, ids = vals.tolist(), ids.tolist()
            for i, s in enumerate(sp):
                if s.top_logprobs:
                    tops[i] = dict(zip(ids[i][: s.top_logprobs], vals[i][: s.top_logprobs]))
        return SampleOutput(tokens.tolist(), chosen.tolist(), tops)
