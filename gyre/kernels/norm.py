"""RMSNorm, optionally fused with the residual add that precedes it.

Matches HF LlamaRMSNorm: out = weight * (x.float() * rsqrt(mean(x^2) + eps)).to(dtype), with the
normalisation in float32 and out in x.dtype. With a residual, the sum x + residual is rounded to x.dtype
first (as an HF model adds hidden states in its own dtype) and both the sum and its norm are returned.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    new_residual_ptr,
    eps,
    stride_x,
    stride_r,
    stride_o,
    stride_nr,
    H,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < H
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(new_residual_ptr + row * stride_nr + offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / H + eps)
    normed = (xf * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x [T, H], weight [H] -> out [T, H] in x.dtype; with residual [T, H]: (out, x + residual).

    New tensors are returned; x and residual are not modified. out: optional preallocated output.
    """
    num_tokens, hidden = x.shape
    assert weight.shape == (hidden,) and weight.is_contiguous(), (weight.shape, hidden)
    assert x.stride(1) == 1 and weight.device == x.device
    if out is None:
        out = torch.empty_like(x)
    assert out.shape == x.shape and out.dtype == x.dtype and out.stride(1) == 1
    new_residual = None
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype and residual.stride(1) == 1
        new_residual = torch.empty_like(x)
    block = triton.next_power_of_2(hidden)
    if num_tokens > 0:
        _rms_norm_kernel[(num_tokens,)](
            x, residual if residual is not None else x, weight, out,
            new_residual if new_residual is not None else out,
            eps, x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0),
            new_residual.stride(0) if new_residual is not None else 0, hidden,
            HAS_RESIDUAL=residual is not None, BLOCK=block,
            num_warps=min(max(block // 512, 1), 16),
        )  # fmt: skip
    return out if new_residual is None else (out, new_residual)


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    if residual is not None:
        x = x + residual
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    out = (weight.float() * normed.float()).to(x.dtype)
    return out if residual is None else (out, x)
