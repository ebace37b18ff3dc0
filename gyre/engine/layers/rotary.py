"""Rotary position embeddings (HF/NeoX rotate-half style), incl. llama3 and linear scaling."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gyre.kernels import batch_invariant as bi
from gyre.kernels.rotary import apply_rotary, apply_rotary_ref, rope_cos_sin_cache


def rope_parameters(hf_config: Any) -> tuple[float, dict | None]:
    """(rope_theta, scaling dict or None) from an HF config of transformers 4.x or 5.x."""
    params = getattr(hf_config, "rope_parameters", None)
    if isinstance(params, dict) and params:
        theta = float(params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))
        scaling = params if params.get("rope_type", "default") != "default" else None
        return theta, scaling
    scaling = getattr(hf_config, "rope_scaling", None)
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return float(getattr(hf_config, "rope_theta", 10000.0)), scaling


class RotaryEmbedding(nn.Module):
    batch_invariant = False  # set by gyre.engine.deterministic.make_batch_invariant

    def __init__(self, head_dim: int, max_positions: int, base: float, scaling: dict | None) -> None:
        super().__init__()
        self.register_buffer("cos_sin_cache", rope_cos_sin_cache(head_dim, max_positions, base, scaling),
                             persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """positions [T]; q [T, Hq, D]; k [T, Hk, D] -> rotated (q, k); on CUDA in place."""
        if self.batch_invariant:  # the same kernels, differentiable
            return bi.rotary(q, k, positions, self.cos_sin_cache)
        if q.is_cuda:
            return apply_rotary(q, k, positions, self.cos_sin_cache)
        return apply_rotary_ref(q, k, positions, self.cos_sin_cache)
