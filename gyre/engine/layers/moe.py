"""Mixture-of-experts: top-k softmax router + experts stored fused as w13 [E, 2I, H] and w2 [E, H, I].

HF checkpoints name experts one by one (`experts.{e}.gate_proj.weight`); the weight loader writes each
into its slice. With expert parallelism each rank holds experts [ep_rank * E_local, (ep_rank+1) * E_local).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gyre.engine.layers.linear import default_weight_loader


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (topk_weights [T, k] float32, topk_ids [T, k] int64), as HF Qwen3-MoE."""
    probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def moe_forward_torch(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                      topk_ids: torch.Tensor, expert_offset: int = 0) -> torch.Tensor:
    """Reference: loop over the (local) experts that received tokens. x [T, H] -> [T, H]."""
    out = torch.zeros_like(x)
    inter = w2.shape[2]
    local = topk_ids - expert_offset
    for e in torch.unique(local).tolist():
        if e < 0 or e >= w13.shape[0]:
            continue  # routed to another rank's expert
        tok, slot = torch.nonzero(local == e, as_tuple=True)
        h = F.linear(x[tok], w13[e])
        h = F.silu(h[:, :inter]) * h[:, inter:]
        y = F.linear(h, w2[e]) * topk_weights[tok, slot, None].to(x.dtype)
        out.index_add_(0, tok, y)
    return out


class FusedMoE(nn.Module):
    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                 renormalize: bool, ep_rank: int = 0, ep_size: int = 1, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if num_experts % ep_size:
            raise ValueError(f"ep_size {ep_size} does not divide num_experts {num_experts}")
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.num_local = num_experts // ep_size
        self.expert_offset = ep_rank * self.num_local
        self.w13 = nn.Parameter(torch.empty(self.num_local, 2 * intermediate_size, hidden_size, dtype=dtype),
                                requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(self.num_local, hidden_size, intermediate_size, dtype=dtype),
                               requires_grad=False)
        self.w13.weight_loader = self._load_w13
        self.w2.weight_loader = self._load_w2
        self.w13.expected_shape = lambda shard_id=None: (intermediate_size, hidden_size)
        self.w2.expected_shape = lambda shard_id=None: (hidden_size, intermediate_size)

    def owns(self, expert_id: int) -> bool:
        return self.expert_offset <= expert_id < self.expert_offset + self.num_local

    def _load_w13(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: tuple[str, int]) -> None:
        which, e = shard_id
        if not self.owns(e):
            return
        inter = self.intermediate_size
        start = 0 if which == "gate" else inter
        default_weight_loader(param.data[e - self.expert_offset].narrow(0, start, inter), loaded)

    def _load_w2(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: tuple[str, int]) -> None:
        _, e = shard_id
        if self.owns(e):
            default_weight_loader(param.data[e - self.expert_offset], loaded)

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from gyre.kernels.moe import fused_moe

            return fused_moe(x, self.w13, self.w2, topk_weights, topk_ids)
        return moe_forward_torch(x, self.w13, self.w2, topk_weights, topk_ids, self.expert_offset)
