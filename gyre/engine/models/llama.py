"""Dense decoder LMs with HF parameter names: Llama 3.x, Qwen2/2.5 (qkv bias), Qwen3 (q/k norm).

Each rank of a tensor-parallel group holds num_heads / tp heads; q, k, v are one fused column-parallel
projection (`qkv_proj`), gate and up one (`gate_up_proj`); o_proj and down_proj are row-parallel.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gyre.engine.layers.attention import Attention
from gyre.engine.layers.linear import Linear, MergedColumnLinear, default_weight_loader
from gyre.engine.layers.norm import RMSNorm
from gyre.engine.layers.rotary import RotaryEmbedding, rope_parameters
from gyre.engine.models.base import CausalLMBase
from gyre.engine.parallel import get_parallel_state
from gyre.kernels import batch_invariant as bi
from gyre.kernels.activation import silu_and_mul


class SelfAttention(nn.Module):
    def __init__(self, cfg: Any, layer_id: int, dtype: torch.dtype, qkv_bias: bool, qk_norm: bool) -> None:
        super().__init__()
        tp = get_parallel_state().tp_size
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        total_heads, total_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        if total_heads % tp or total_kv % tp:
            raise ValueError(f"tp_size {tp} must divide num_attention_heads {total_heads} and "
                             f"num_key_value_heads {total_kv}")
        self.num_heads, self.num_kv_heads = total_heads // tp, total_kv // tp
        d = self.head_dim
        self.qkv_proj = MergedColumnLinear(
            cfg.hidden_size, {"q": total_heads * d, "k": total_kv * d, "v": total_kv * d}, bias=qkv_bias, dtype=dtype)
        self.o_proj = Linear(total_heads * d, cfg.hidden_size, bias=False, tp_mode="row", dtype=dtype)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps, dtype) if qk_norm else None
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps, dtype) if qk_norm else None
        theta, scaling = rope_parameters(cfg)
        self.rotary = RotaryEmbedding(d, cfg.max_position_embeddings, theta, scaling)
        self.attn = Attention(self.num_heads, self.num_kv_heads, d, layer_id)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, ctx) -> torch.Tensor:
        t, d = x.shape[0], self.head_dim
        qkv = self.qkv_proj(x)  # [T, (Hq + 2 Hkv) D]
        q, k, v = qkv.split([self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d], dim=-1)
        q, k, v = q.view(t, self.num_heads, d), k.view(t, self.num_kv_heads, d), v.view(t, self.num_kv_heads, d)
        if self.q_norm is not None:  # Qwen3: before rotary
            q, k = self.q_norm(q), self.k_norm(k)
        if getattr(ctx.backend, "fuses_rotary", False):  # rotary fused with the KV store (Triton backend)
            return self.o_proj(self.attn(q, k, v, ctx, rope=(positions, self.rotary.cos_sin_cache)))
        q, k = self.rotary(positions, q, k)
        return self.o_proj(self.attn(q, k, v, ctx))


class MLP(nn.Module):
    batch_invariant = False  # set by gyre.engine.deterministic.make_batch_invariant

    def __init__(self, hidden_size: int, intermediate_size: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.intermediate = intermediate_size // get_parallel_state().tp_size
        self.gate_up_proj = MergedColumnLinear(
            hidden_size, {"gate": intermediate_size, "up": intermediate_size}, dtype=dtype)
        self.down_proj = Linear(intermediate_size, hidden_size, tp_mode="row", dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gate_up_proj(x)  # [T, 2I]
        if self.batch_invariant:
            return self.down_proj(bi.silu_and_mul(h))
        if h.is_cuda:
            return self.down_proj(silu_and_mul(h))
        gate, up = h.split(self.intermediate, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Any, layer_id: int, dtype: torch.dtype, qkv_bias: bool, qk_norm: bool,
                 mlp: nn.Module | None = None) -> None:
        super().__init__()
        self.self_attn = SelfAttention(cfg, layer_id, dtype, qkv_bias, qk_norm)
        self.mlp = mlp if mlp is not None else MLP(cfg.hidden_size, cfg.intermediate_size, dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(self, positions, x, residual, ctx):
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, ctx)
        x, residual = self.post_attention_layernorm(x, residual)
        x = self.mlp(x, ctx) if getattr(self.mlp, "takes_ctx", False) else self.mlp(x)
        return x, residual


class Backbone(nn.Module):
    def __init__(self, cfg: Any, layers: list[nn.Module], dtype: torch.dtype) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.embed_tokens.weight.requires_grad_(False)
        self.embed_tokens.weight.weight_loader = default_weight_loader
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(self, input_ids, positions, ctx):
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, ctx)
        x, _ = self.norm(x, residual)
        return x


class LlamaForCausalLM(CausalLMBase):
    qkv_bias = False
    qk_norm = False

    def __init__(self, cfg: Any, dtype: torch.dtype) -> None:
        super().__init__(cfg)
        layers = [DecoderLayer(cfg, i, dtype, self.qkv_bias or getattr(cfg, "attention_bias", False), self.qk_norm)
                  for i in range(cfg.num_hidden_layers)]
        self.model = Backbone(cfg, layers, dtype)
        self.init_lm_head(cfg, dtype)


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
