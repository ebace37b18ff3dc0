"""Counter-based random numbers for sampling.

Every sampled token draws its noise from hash(seed, step, token index) alone, so a request's samples do
not depend on what else is in the batch, on retraction and recompute, or on the backend (the Triton
sampling kernel reproduces `uniform_noise` bit for bit with the same uint32 arithmetic).
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche hash (lowbias32). x: int64 tensor holding values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    x = x ^ (x >> 16)
    return x


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Uniform (0, 1) noise, float32 [B, V], from per-row seeds [B] (int64) and steps [B] (int64).

    u = ((h >> 8) + 0.5) / 2^24 with h = mix32(mix32(mix32(seed_lo ^ mix32(seed_hi)) ^ step) ^ index):
    24 bits, never exactly 0 or 1.
    """
    seeds = seeds.to(torch.int64)
    steps = steps.to(torch.int64) & _M32
    seed_lo = seeds & _M32
    seed_hi = (seeds >> 32) & _M32
    row = mix32(mix32(seed_lo ^ mix32(seed_hi)) ^ steps)  # [B]
    idx = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    h = mix32(row[:, None] ^ idx[None, :])  # [B, V]
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / 16777216.0)


def gumbel_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Gumbel(0, 1) noise [B, V]: argmax(logits / T + g) samples softmax(logits / T)."""
    u = uniform_noise(seeds, steps, vocab_size)
    return -torch.log(-torch.log(u))
