"""Rotary position embedding, NeoX/HF style (rotate_half), with partial rotary support.

cos_sin_cache [max_positions, rotary_dim] float32: columns [:rotary_dim // 2] hold cos(pos * inv_freq),
columns [rotary_dim // 2:] hold sin. The first rotary_dim dims of each head are rotated as
x1, x2 = x[:half], x[half:rotary_dim]; out = (x1 * cos - x2 * sin, x2 * cos + x1 * sin); the rest pass.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


def rope_inv_freq(
    head_dim: int, base: float, rope_scaling: dict | None = None, partial_rotary_factor: float = 1.0
) -> torch.Tensor:
    """inv_freq [rotary_dim // 2] float32, as transformers' modeling_rope_utils computes it.

    rope_scaling: None, or a dict with "rope_type" (or legacy "type") in "default", "linear", "llama3".
    """
    dim = int(head_dim * partial_rotary_factor)
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim))
    rope_type = "default" if rope_scaling is None else rope_scaling.get("rope_type", rope_scaling.get("type"))
    if rope_type in (None, "default"):
        return inv_freq
    if rope_type == "linear":
        return inv_freq / rope_scaling["factor"]
    if rope_type == "llama3":
        factor = rope_scaling["factor"]
        low_freq_factor = rope_scaling["low_freq_factor"]
        high_freq_factor = rope_scaling["high_freq_factor"]
        old_context_len = rope_scaling["original_max_position_embeddings"]
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
        is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium_freq, smoothed, inv_freq_llama)
    raise ValueError(f"unsupported rope_type {rope_type!r} (supported: default, linear, llama3)")


def rope_cos_sin_cache(
    head_dim: int,
    max_positions: int,
    base: float,
    rope_scaling: dict | None = None,
    partial_rotary_factor: float = 1.0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """[max_positions, rotary_dim] float32: cos in the first half of the columns, sin in the second."""
    inv_freq = rope_inv_freq(head_dim, base, rope_scaling, partial_rotary_factor)
    freqs = torch.arange(max_positions, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(device)


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    positions_ptr,
    cache_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_c,
    num_q_heads,
    num_k_heads,
    HALF,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    if tl.program_id(1) == 0:  # axis 1 picks q or k
        x_ptr = q_ptr + t * stride_qt
        stride_h = stride_qh
        num_heads = num_q_heads
    else:
        x_ptr = k_ptr + t * stride_kt
        stride_h = stride_kh
        num_heads = num_k_heads
    pos = tl.load(positions_ptr + t)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask_d = offs_d < HALF
    cos = tl.load(cache_ptr + pos * stride_c + offs_d, mask=mask_d, other=0.0)[None, :]
    sin = tl.load(cache_ptr + pos * stride_c + HALF + offs_d, mask=mask_d, other=0.0)[None, :]
    for h0 in range(0, num_heads, BLOCK_H):
        heads = h0 + offs_h
        mask = (heads[:, None] < num_heads) & mask_d[None, :]
        p1 = x_ptr + heads[:, None] * stride_h + offs_d[None, :]  # [BLOCK_H, BLOCK_HALF] first halves
        x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(p1 + HALF, mask=mask, other=0.0).to(tl.float32)
        tl.store(p1, (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty), mask=mask)
        tl.store(p1 + HALF, (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty), mask=mask)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q [T, Hq, D] and k [T, Hk, D] IN PLACE (views, e.g. of a fused qkv output, are fine)
    at positions int64 [T]; returns (q, k). Math in float32, results stored in q/k's dtype."""
    num_tokens, num_q_heads, head_dim = q.shape
    assert k.dim() == 3 and k.shape[0] == num_tokens and k.shape[2] == head_dim, (q.shape, k.shape)
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and q.dtype == k.dtype
    assert positions.shape == (num_tokens,) and positions.dtype == torch.int64 and positions.is_contiguous()
    assert cos_sin_cache.dim() == 2 and cos_sin_cache.dtype == torch.float32 and cos_sin_cache.stride(1) == 1
    rotary_dim = cos_sin_cache.shape[1]
    assert rotary_dim % 2 == 0 and rotary_dim <= head_dim, (rotary_dim, head_dim)
    if num_tokens == 0:
        return q, k
    half = rotary_dim // 2
    block_half = triton.next_power_of_2(half)
    block_h = max(1, min(triton.next_power_of_2(max(q.shape[1], k.shape[1])), 4096 // block_half))
    _rotary_kernel[(num_tokens, 2)](
        q, k, positions, cos_sin_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
        num_q_heads, k.shape[1], half,
        BLOCK_H=block_h, BLOCK_HALF=block_half, num_warps=4,
    )  # fmt: skip
    return q, k


def apply_rotary_ref(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns new tensors (q, k are not modified)."""
    rotary_dim = cos_sin_cache.shape[1]
    half = rotary_dim // 2
    cs = cos_sin_cache[positions]  # [T, rotary_dim]
    cos = torch.cat([cs[:, :half], cs[:, :half]], -1)[:, None, :]
    sin = torch.cat([cs[:, half:], cs[:, half:]], -1)[:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        xr = x[..., :rotary_dim].float()
        rotated = torch.cat([-xr[..., half:], xr[..., :half]], -1)  # rotate_half
        return torch.cat([(xr * cos + rotated * sin).to(x.dtype), x[..., rotary_dim:]], -1)

    return rotate(q), rotate(k)
