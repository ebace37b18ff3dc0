"""Sampling: temperature, top-k, top-p, min-p, per-request seeds, logprobs, top logprobs.

Noise comes from gyre.kernels.random (hash of seed, step, token index), so a request's tokens depend
only on its own logits, seed and position: not on the batch, retraction or backend. Greedy rows take
argmax. Logprobs are log_softmax(logits / T) at the sampled token (T = 1 for greedy), before any
top-k / top-p / min-p truncation (not renormalised); grammar masks are applied before everything.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gyre.engine.grammar import apply_token_mask
from gyre.engine.request import Request
from gyre.kernels.sampling import logprobs_of_ref, sample_and_logprobs, sample_ref


@dataclass
class SampleOutput:
    tokens: list[int]
    logprobs: list[float]
    top_logprobs: list[dict[int, float] | None]


@dataclass
class DeviceSample:
    """A step's samples, still on the device (the next step may read tokens before the host does)."""
    tokens: torch.Tensor  # [B] int64
    logprobs: torch.Tensor  # [B] float32
    top_values: torch.Tensor | None  # [B, k] float32
    top_ids: torch.Tensor | None  # [B, k] int64
    top_counts: list[int]  # top_logprobs asked by each row


class Sampler:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def sample(self, logits: torch.Tensor, reqs: list[Request], masks: torch.Tensor | None = None,
               offsets: list[int] | None = None) -> DeviceSample:
        """logits [B, V] float32, one row per request (a verifying request has several rows: row j samples
        its token num_generated + offsets[j], with that token's noise, as plain decoding would); masks
        [B, V] bool (True = allowed), a grammar bitmask [B, ceil(V / 32)] int32, or None. Launches
        everything asynchronously; nothing waits."""
        if masks is not None:
            logits = apply_token_mask(logits, masks)
        sp = [r.sampling for r in reqs]
        dev = logits.device
        floats = torch.tensor([[s.temperature, s.top_p, s.min_p] for s in sp], dtype=torch.float32)
        offsets = offsets or [0] * len(reqs)
        ints = torch.tensor([[s.top_k, r.seed, r.num_generated + o] for s, r, o in zip(sp, reqs, offsets)],
                            dtype=torch.int64)
        if dev.type == "cuda":
            floats, ints = floats.pin_memory().to(dev, non_blocking=True), ints.pin_memory().to(dev, non_blocking=True)
        temperature, top_p, min_p = floats.unbind(1)
        top_k, seeds, steps = ints[:, 0].to(torch.int32), ints[:, 1], ints[:, 2]
        args = (temperature.contiguous(), top_k.contiguous(), top_p.contiguous(), min_p.contiguous(),
                seeds.contiguous(), steps.contiguous())
        tokens, chosen = sample_rows(logits, *args, filtered=is_filtered(sp, logits.shape[1]))
        counts = [s.top_logprobs for s in sp]
        top_values = top_ids = None
        if max(counts) > 0:
            t_eff = torch.where(args[0] > 0, args[0], torch.ones_like(args[0]))
            logp = torch.log_softmax(logits / t_eff[:, None], dim=-1)
            top_values, top_ids = torch.topk(logp, max(counts), dim=-1)
        return DeviceSample(tokens, chosen, top_values, top_ids, counts)


def is_filtered(params, vocab: int) -> bool:
    """Whether any of these SamplingParams truncates the distribution (top-k, top-p or min-p)."""
    return any(0 < s.top_k < vocab or s.top_p < 1.0 or s.min_p > 0.0 for s in params)


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                min_p: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor,
                filtered: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and their logprobs of every row, from per-row device tensors (contiguous [B]; top_k int32,
    seeds and steps int64): the Triton kernels on CUDA, the torch references elsewhere. No host sync, so a
    CUDA graph may capture it (filtered, a host fact, picks the token kernel)."""
    args = (logits, temperature, top_k, top_p, min_p, seeds, steps)
    if logits.is_cuda:
        return sample_and_logprobs(*args, filtered=filtered)
    tokens = sample_ref(*args)
    return tokens, logprobs_of_ref(logits, tokens, temperature)


def to_host(d: DeviceSample) -> SampleOutput:
    tokens, logprobs = d.tokens.tolist(), d.logprobs.tolist()
    tops: list[dict[int, float] | None] = [None] * len(tokens)
    if d.top_ids is not None:
        ids, vals = d.top_ids.tolist(), d.top_values.tolist()
        for i, k in enumerate(d.top_counts):
            if k:  # tokens a grammar masked out (-inf) are left out
                tops[i] = {t: v for t, v in zip(ids[i][:k], vals[i][:k]) if v != float("-inf")}
    return SampleOutput(tokens, logprobs, tops)
