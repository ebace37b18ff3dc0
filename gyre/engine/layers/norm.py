from __future__ import annotations

import torch
from torch import nn

from gyre.engine.layers.linear import default_weight_loader
from gyre.kernels import batch_invariant as bi
from gyre.kernels.norm import rms_norm, rms_norm_ref


class RMSNorm(nn.Module):
    """HF LlamaRMSNorm over the last dim, with a fused residual add: (norm(x + r), x + r)."""

    batch_invariant = False  # set by gyre.engine.deterministic.make_batch_invariant

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        fn = bi.rms_norm if self.batch_invariant else rms_norm if x.is_cuda else rms_norm_ref
        if residual is None:
            return fn(x2, self.weight, self.eps).view(shape)
        out, res = fn(x2, self.weight, self.eps, residual.reshape(-1, shape[-1]))
        return out.view(shape), res.view(shape)
