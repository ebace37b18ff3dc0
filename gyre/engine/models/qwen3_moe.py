"""Qwen3-MoE: Qwen3 attention (q/k norm) with a top-k routed expert MLP on sparse layers."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gyre.engine.layers.linear import Linear
from gyre.engine.layers.moe import FusedMoE, route
from gyre.engine.models.base import CausalLMBase
from gyre.engine.models.llama import MLP, Backbone, DecoderLayer
from gyre.engine.parallel import get_parallel_state
from gyre.kernels import batch_invariant as bi


def num_experts_of(cfg: Any) -> int:
    return getattr(cfg, "num_experts", None) or cfg.num_local_experts


class SparseMoeBlock(nn.Module):
    takes_ctx = True
    batch_invariant = False  # set by gyre.engine.deterministic.make_batch_invariant

    def __init__(self, cfg: Any, layer_id: int, dtype: torch.dtype) -> None:
        super().__init__()
        st = get_parallel_state()
        self.layer_id = layer_id
        self.top_k = cfg.num_experts_per_tok
        self.renormalize = bool(getattr(cfg, "norm_topk_prob", False))
        self.gate = Linear(cfg.hidden_size, num_experts_of(cfg), bias=False, dtype=dtype)  # router
        self.experts = FusedMoE(num_experts_of(cfg), self.top_k, cfg.hidden_size, cfg.moe_intermediate_size,
                                self.renormalize, st.ep_rank, st.ep_size, dtype)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        router_logits = self.gate(x)  # [T, E]
        topk_weights, topk_ids = (bi.route if self.batch_invariant else route)(router_logits, self.top_k,
                                                                              self.renormalize)
        if ctx.routed_experts is not None:
            ctx.routed_experts.append(topk_ids)
        self.experts.observe(topk_ids, ctx)  # load statistics (EPLB) and the routing store
        return self.experts(x, topk_weights, topk_ids)


class Qwen3MoeForCausalLM(CausalLMBase):
    def __init__(self, cfg: Any, dtype: torch.dtype) -> None:
        super().__init__(cfg)
        mlp_only = set(getattr(cfg, "mlp_only_layers", []) or [])
        step = getattr(cfg, "decoder_sparse_step", 1) or 1
        layers = []
        for i in range(cfg.num_hidden_layers):
            sparse = i not in mlp_only and num_experts_of(cfg) > 0 and (i + 1) % step == 0
            mlp = SparseMoeBlock(cfg, i, dtype) if sparse else MLP(cfg.hidden_size, cfg.intermediate_size, dtype)
            layers.append(DecoderLayer(cfg, i, dtype, getattr(cfg, "attention_bias", False), True, mlp))
        self.model = Backbone(cfg, layers, dtype)
        self.init_lm_head(cfg, dtype)
