"""Megatron-core GPTModel <-> HF checkpoint names, for Llama, Qwen2, Qwen3 and Qwen3-MoE.

Megatron's layout, per layer (both the local and the Transformer-Engine layer specs are read):
- `self_attention.linear_qkv.weight` [ng * (nh/ng + 2) * d, H]: grouped per KV head, each group holding
  its nh/ng query heads, then its key head, then its value head. Column-parallel: a TP rank holds whole
  groups, so its shards concatenate into the full tensor.
- `mlp.linear_fc1.weight` [2I, H]: column-parallel, and each TP rank holds [gate_r; up_r], so the full
  gate is the concatenation of every rank's first half (not the first half of the concatenation).
- `linear_proj`, `linear_fc2`: row-parallel (input dim split). Norms and the router: replicated.
- `embedding.word_embeddings.weight`, `output_layer.weight` [V_padded / tp, H]: vocabulary padded (to a
  multiple of 128 * tp by default) and split over TP; the padding rows are dropped here.
- experts: `mlp.experts.local_experts.{i}.linear_fc{1,2}.weight` (SequentialMLP) or
  `mlp.experts.linear_fc{1,2}.weight{i}` (TE grouped GEMM); local expert i of EP rank r is global expert
  r * E / ep + i; fc1 / fc2 split over the expert-TP group like the dense MLP.
- a layer's global index is `layer.layer_number - 1` (right under PP and virtual PP).

This module holds the pure mapping of one parameter, given by its *global* Megatron name (layer and
expert indices of the whole model): `to_hf(name, tp_shards)` and its inverse `from_hf(name, hf) ->
tp_shards`. `gyre.trainers.adapters.megatron` applies it to a live, sharded model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gyre.trainers.adapters.hf import NamedTensor

# kinds: how the TP shards of a parameter combine and how it maps onto HF tensors
REPLICATED, ROW, QKV, GATED, VOCAB = "replicated", "row", "qkv", "gated", "vocab"

_LAYER_RULES: list[tuple[re.Pattern, str, tuple[str, ...]]] = [
    (re.compile(p + "$"), kind, hf)
    for p, kind, hf in [
        (r"input_layernorm\.weight", REPLICATED, ("input_layernorm.weight",)),
        (r"self_attention\.linear_qkv\.layer_norm_weight", REPLICATED, ("input_layernorm.weight",)),
        (
            r"self_attention\.linear_qkv\.weight",
            QKV,
            ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
        ),
        (
            r"self_attention\.linear_qkv\.bias",
            QKV,
            ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
        ),
        (r"self_attention\.linear_proj\.weight", ROW, ("self_attn.o_proj.weight",)),
        (r"self_attention\.q_layernorm\.weight", REPLICATED, ("self_attn.q_norm.weight",)),
        (r"self_attention\.k_layernorm\.weight", REPLICATED, ("self_attn.k_norm.weight",)),
        (r"pre_mlp_layernorm\.weight", REPLICATED, ("post_attention_layernorm.weight",)),
        (r"mlp\.linear_fc1\.layer_norm_weight", REPLICATED, ("post_attention_layernorm.weight",)),
        (r"mlp\.linear_fc1\.weight", GATED, ("mlp.gate_proj.weight", "mlp.up_proj.weight")),
        (r"mlp\.linear_fc2\.weight", ROW, ("mlp.down_proj.weight",)),
        (r"mlp\.router\.weight", REPLICATED, ("mlp.gate.weight",)),
        (
            r"mlp\.experts\.local_experts\.(\d+)\.linear_fc1\.weight",
            GATED,
            ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight"),
        ),
        (
            r"mlp\.experts\.local_experts\.(\d+)\.linear_fc2\.weight",
            ROW,
            ("mlp.experts.{e}.down_proj.weight",),
        ),
        (
            r"mlp\.experts\.linear_fc1\.weight(\d+)",
            GATED,
            ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight"),
        ),
        (r"mlp\.experts\.linear_fc2\.weight(\d+)", ROW, ("mlp.experts.{e}.down_proj.weight",)),
    ]
]
LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_EXPERT_INDEX = re.compile(r"(local_experts\.|linear_fc[12]\.weight)(\d+)")


@dataclass(frozen=True)
class Layout:
    """What the mapping needs to know of the model, read from its HF config."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int  # HF's, unpadded
    tie_word_embeddings: bool
    num_experts: int = 0
    qkv_bias: bool = False
    qk_norm: bool = False
    moe_layers: tuple[int, ...] = ()

    @classmethod
    def from_hf_config(cls, cfg: Any) -> Layout:
        model_type = getattr(cfg, "model_type", "")
        if model_type not in ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe"):
            raise ValueError(
                f"the Megatron mapping covers llama, qwen2, qwen3 and qwen3_moe, not {model_type!r}"
            )
        num_experts = getattr(cfg, "num_experts", 0) or 0
        mlp_only = set(getattr(cfg, "mlp_only_layers", None) or [])
        step = getattr(cfg, "decoder_sparse_step", 1) or 1
        moe_layers = tuple(
            i
            for i in range(cfg.num_hidden_layers)
            if num_experts and i not in mlp_only and (i + 1) % step == 0
        )
        return cls(
            num_layers=cfg.num_hidden_layers,
            num_heads=cfg.num_attention_heads,
            num_kv_heads=cfg.num_key_value_heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
            vocab_size=cfg.vocab_size,
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            num_experts=num_experts,
            qkv_bias=model_type == "qwen2" or bool(getattr(cfg, "attention_bias", False)),
            qk_norm=model_type in ("qwen3", "qwen3_moe"),
            moe_layers=moe_layers,
        )

    def megatron_names(self) -> list[str]:
        """Global parameter names of the equivalent GPTModel built with the local layer spec."""
        names = ["embedding.word_embeddings.weight"]
        for i in range(self.num_layers):
            p = f"decoder.layers.{i}."
            names += [p + "input_layernorm.weight", p + "self_attention.linear_qkv.weight"]
            names += [p + "self_attention.linear_qkv.bias"] if self.qkv_bias else []
            names += (
                [p + "self_attention.q_layernorm.weight", p + "self_attention.k_layernorm.weight"]
                if self.qk_norm
                else []
            )
            names += [p + "self_attention.linear_proj.weight", p + "pre_mlp_layernorm.weight"]
            if i in self.moe_layers:
                names.append(p + "mlp.router.weight")
                for e in range(self.num_experts):
                    names += [p + f"mlp.experts.local_experts.{e}.linear_fc{k}.weight" for k in (1, 2)]
            else:
                names += [p + "mlp.linear_fc1.weight", p + "mlp.linear_fc2.weight"]
        names.append("decoder.final_layernorm.weight")
        return names + ([] if self.tie_word_embeddings else ["output_layer.weight"])


def rule(name: str) -> tuple[str, list[str]]:
    """(kind, HF names) of a global Megatron parameter name; KeyError for names outside the mapping."""
    if name == "embedding.word_embeddings.weight":
        return VOCAB, ["model.embed_tokens.weight"]
    if name == "output_layer.weight":
        return VOCAB, ["lm_head.weight"]
    if name == "decoder.final_layernorm.weight":
        return REPLICATED, ["model.norm.weight"]
    m = LAYER.match(name)
    if m:
        layer, rest = m.groups()
        for pattern, kind, hf in _LAYER_RULES:
            mm = pattern.match(rest)
            if mm:
                e = mm.group(1) if mm.groups() else None
                return kind, [f"model.layers.{layer}." + h.format(e=e) for h in hf]
    raise KeyError(f"no HF mapping for Megatron parameter {name!r}")


def is_expert(name: str) -> bool:
    return ".mlp.experts." in name


def expert_index(name: str) -> int:
    return int(_EXPERT_INDEX.search(name).group(2))


def with_expert_index(name: str, e: int) -> str:
    m = _EXPERT_INDEX.search(name)
    return name[: m.start(2)] + str(e) + name[m.end(2) :]


# -- one parameter: Megatron TP shards <-> HF tensors ------------------------------------------------
def to_hf(name: str, shards: Sequence[torch.Tensor], layout: Layout) -> list[NamedTensor]:
    """Megatron parameter `name` (global layer and expert indices), given as its TP shards in rank order
    (one tensor for a replicated one) -> HF (name, full tensor) pairs; [] for a tied output layer."""
    kind, hf_names = rule(name)
    if name == "output_layer.weight" and layout.tie_word_embeddings:
        return []  # the last stage's copy of the embedding
    if kind == REPLICATED:
        return [(hf_names[0], shards[0])]
    if kind == ROW:
        return [(hf_names[0], torch.cat(list(shards), dim=1))]
    if kind == VOCAB:
        return [(hf_names[0], torch.cat(list(shards), dim=0)[: layout.vocab_size])]
    if kind == GATED:  # rank r holds [gate_r; up_r]
        gates, ups = zip(*(s.chunk(2, dim=0) for s in shards))
        return [(hf_names[0], torch.cat(gates, dim=0)), (hf_names[1], torch.cat(ups, dim=0))]
    full = torch.cat(list(shards), dim=0)  # QKV: [ng * (q_per_group + 2) * d, ...]
    ng, d = layout.num_kv_heads, layout.head_dim
    q_per_group = layout.num_heads // ng
    rest = full.shape[1:]
    grouped = full.reshape(ng, (q_per_group + 2) * d, *rest)
    q, k, v = grouped.split([q_per_group * d, d, d], dim=1)
    return [(n, t.reshape(-1, *rest)) for n, t in zip(hf_names, (q, k, v))]


def from_hf(
    name: str,
    hf: Mapping[str, torch.Tensor],
    layout: Layout,
    tp_size: int = 1,
    padded_vocab_size: int | None = None,
) -> list[torch.Tensor]:
    """The inverse: Megatron parameter `name`'s TP shards (rank order) built from HF tensors.
    padded_vocab_size defaults to Megatron's: the vocabulary rounded up to a multiple of 128 * tp."""
    kind, hf_names = rule(name)
    if name == "output_layer.weight" and layout.tie_word_embeddings:
        hf_names = ["model.embed_tokens.weight"]
    tensors = [hf[n] for n in hf_names]
    if kind == REPLICATED:
        return [tensors[0]] * tp_size
    if kind == ROW:
        return list(tensors[0].chunk(tp_size, dim=1))
    if kind == VOCAB:
        t = tensors[0]
        multiple = 128 * tp_size
        padded = padded_vocab_size or -(-t.shape[0] // multiple) * multiple
        t = torch.cat([t, t.new_zeros(padded - t.shape[0], *t.shape[1:])])
        return list(t.chunk(tp_size, dim=0))
    if kind == GATED:
        gate, up = (t.chunk(tp_size, dim=0) for t in tensors)
        return [torch.cat([g, u], dim=0) for g, u in zip(gate, up)]
    ng, d = layout.num_kv_heads, layout.head_dim
    q, k, v = tensors
    rest = q.shape[1:]
    full = torch.cat([q.reshape(ng, -1, *rest), k.reshape(ng, d, *rest), v.reshape(ng, d, *rest)], dim=1)
    return list(full.reshape(-1, *rest).chunk(tp_size, dim=0))
