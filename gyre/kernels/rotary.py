"""Rotary position embedding, NeoX/HF style (rotate_half), with partial rotary support.

cos_sin_cache [max_positions, rotary_dim] float32: columns [:rotary_dim // 2] hold cos(pos * inv_freq),
columns [rotary_dim // 2:] hold sin. The first rotary_dim dims of each head are rotated as
x1, x2 = x[:half], x[half:rotary_dim]; out = (x1 * cos - x2 * sin, x2 * cos + x1 * sin); the rest pass.

rotary_store_kv fuses the rotation with the KV-cache store of attention (gyre.kernels.attention layout:
k_cache, v_cache [num_slots, Hkv, D]) into one launch.
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


@triton.jit
def _rotary_store_kv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    positions_ptr,
    cache_ptr,
    slot_ptr,
    k_cache_ptr,
    v_cache_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_c,
    stride_kc_s,
    stride_kc_h,
    stride_vc_s,
    stride_vc_h,
    num_q_heads,
    num_kv_heads,
    HALF,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + t)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask_d = offs_d < HALF
    cos = tl.load(cache_ptr + pos * stride_c + offs_d, mask=mask_d, other=0.0)[None, :]
    sin = tl.load(cache_ptr + pos * stride_c + HALF + offs_d, mask=mask_d, other=0.0)[None, :]
    if tl.program_id(1) == 0:  # axis 1: q (rotated in place) or k/v (rotated into the cache)
        for h0 in range(0, num_q_heads, BLOCK_H):
            heads = h0 + offs_h
            mask = (heads[:, None] < num_q_heads) & mask_d[None, :]
            p1 = q_ptr + t * stride_qt + heads[:, None] * stride_qh + offs_d[None, :]  # first halves
            x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(p1 + HALF, mask=mask, other=0.0).to(tl.float32)
            tl.store(p1, (x1 * cos - x2 * sin).to(q_ptr.dtype.element_ty), mask=mask)
            tl.store(p1 + HALF, (x2 * cos + x1 * sin).to(q_ptr.dtype.element_ty), mask=mask)
    else:
        slot = tl.load(slot_ptr + t)
        if slot >= 0:  # slot < 0 marks a padding token: nothing is stored
            offs_full = tl.arange(0, BLOCK_D)
            is_tail = (offs_full >= 2 * HALF) & (offs_full < HEAD_DIM)  # dims past rotary_dim pass through
            for h0 in range(0, num_kv_heads, BLOCK_H):
                heads = h0 + offs_h
                mask_h = heads[:, None] < num_kv_heads
                mask = mask_h & mask_d[None, :]
                k_row = k_ptr + t * stride_kt + heads[:, None] * stride_kh  # [BLOCK_H, 1]
                kc_row = k_cache_ptr + slot * stride_kc_s + heads[:, None] * stride_kc_h
                x1 = tl.load(k_row + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
                x2 = tl.load(k_row + HALF + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
                out_ty = k_cache_ptr.dtype.element_ty
                tl.store(kc_row + offs_d[None, :], (x1 * cos - x2 * sin).to(out_ty), mask=mask)
                tl.store(kc_row + HALF + offs_d[None, :], (x2 * cos + x1 * sin).to(out_ty), mask=mask)
                mask_tail = mask_h & is_tail[None, :]
                k_tail = tl.load(k_row + offs_full[None, :], mask=mask_tail)
                tl.store(kc_row + offs_full[None, :], k_tail.to(out_ty), mask=mask_tail)
                mask_v = mask_h & (offs_full[None, :] < HEAD_DIM)
                v_row = v_ptr + t * stride_vt + heads[:, None] * stride_vh
                vc_row = v_cache_ptr + slot * stride_vc_s + heads[:, None] * stride_vc_h
                v = tl.load(v_row + offs_full[None, :], mask=mask_v)
                tl.store(vc_row + offs_full[None, :], v.to(v_cache_ptr.dtype.element_ty), mask=mask_v)


def rotary_store_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """apply_rotary and store_kv in one launch: rotates q [T, Hq, D] IN PLACE, writes rotated k and v
    ([T, Hkv, D]) to k_cache / v_cache [num_slots, Hkv, D] at slot_mapping int64 [T] (a negative slot
    skips that token). k and v are not modified. Returns q."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    assert k.dim() == 3 and k.shape[0] == num_tokens and k.shape[2] == head_dim, (q.shape, k.shape)
    assert v.shape == k.shape and q.dtype == k.dtype == v.dtype, (k.shape, v.shape, q.dtype, k.dtype, v.dtype)
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
    assert k_cache.dim() == 3 and v_cache.shape == k_cache.shape and k_cache.shape[1:] == k.shape[1:]
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    assert positions.shape == (num_tokens,) and positions.dtype == torch.int64 and positions.is_contiguous()
    assert slot_mapping.shape == (num_tokens,) and slot_mapping.dtype == torch.int64
    assert slot_mapping.is_contiguous()
    assert cos_sin_cache.dim() == 2 and cos_sin_cache.dtype == torch.float32 and cos_sin_cache.stride(1) == 1
    rotary_dim = cos_sin_cache.shape[1]
    assert rotary_dim % 2 == 0 and rotary_dim <= head_dim, (rotary_dim, head_dim)
    if num_tokens == 0:
        return q
    half = rotary_dim // 2
    block_half = triton.next_power_of_2(half)
    block_d = triton.next_power_of_2(head_dim)
    block_h = max(1, min(triton.next_power_of_2(max(num_q_heads, num_kv_heads)), 4096 // block_d))
    _rotary_store_kv_kernel[(num_tokens, 2)](
        q, k, v, positions, cos_sin_cache, slot_mapping, k_cache, v_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_sin_cache.stride(0),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        num_q_heads, num_kv_heads, half,
        HEAD_DIM=head_dim, BLOCK_H=block_h, BLOCK_HALF=block_half, BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip
    return q


def rotary_store_kv_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """apply_rotary_ref, then the store: q is rotated in place (as the kernel does), k is not."""
    q_rot, k_rot = apply_rotary_ref(q, k, positions, cos_sin_cache)
    q.copy_(q_rot)
    keep = slot_mapping >= 0
    k_cache.index_copy_(0, slot_mapping[keep], k_rot[keep].to(k_cache.dtype))
    v_cache.index_copy_(0, slot_mapping[keep], v[keep].to(v_cache.dtype))
    return q
