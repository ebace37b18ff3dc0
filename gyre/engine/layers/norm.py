from __future__ import annotations

import torch
from torch import nn

from gyre.engine.layers.linear import default_weight_loader


class RMSNorm(nn.Module):
    """HF LlamaRMSNorm: weight * (x.float() * rsqrt(mean(x^2) + eps)).to(dtype); fused residual add."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is not None:
            x = x + residual
            residual = x
        xf = x.float()
        out = self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return out if residual is None else (out, residual)
