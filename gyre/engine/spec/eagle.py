"""EAGLE-style draft head: one decoder layer over the target's hidden states and token embeddings.

At position p the head reads the target's final hidden state h_p (the lm_head's input) and the
embedding of the next token x_{p+1}: f = norm(layer(fc([embed(x_{p+1}), h_p]))) is its guess of
h_{p+1}, and the target's lm_head(f) its guess of x_{p+2}. Drafting feeds f back as the next h. The
embedding and lm_head are the target's (not stored here), so they follow weight updates.

On disk: a directory with config.json (the target's dims, architectures ["GyreEagleHead"]) and
model.safetensors with fc.weight, layer.* (HF Llama decoder-layer names) and norm.weight.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn
from transformers import LlamaConfig

from gyre.engine.layers.norm import RMSNorm
from gyre.engine.models.llama import DecoderLayer

ARCH = "GyreEagleHead"
_COPIED = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
           "rms_norm_eps", "max_position_embeddings", "vocab_size", "rope_theta", "rope_scaling",
           "rope_parameters")


def eagle_config(target_config: Any) -> LlamaConfig:
    """The head's config: the target's dims, one layer, Llama layout (whatever the target's arch)."""
    fields = {k: getattr(target_config, k) for k in _COPIED if getattr(target_config, k, None) is not None}
    fields.setdefault("head_dim", target_config.hidden_size // target_config.num_attention_heads)
    cfg = LlamaConfig(**fields, num_hidden_layers=1, tie_word_embeddings=False)
    cfg.architectures = [ARCH]
    return cfg


class EagleHead(nn.Module):
    def __init__(self, cfg: Any, dtype: torch.dtype) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.config = cfg
        self.fc = nn.Linear(2 * h, h, bias=False, dtype=dtype)
        self.layer = DecoderLayer(cfg, 0, dtype, qkv_bias=False, qk_norm=False)  # KV layer 0 of its own pool
        self.norm = RMSNorm(h, cfg.rms_norm_eps, dtype)

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor, ctx) -> torch.Tensor:
        """embeds [T, H] (of x_{p+1}), hidden [T, H] (h_p or the head's previous feature), positions [T] (p)
        -> features [T, H]. ctx: a ForwardContext over the head's own one-layer KV pool."""
        x = self.fc(torch.cat([embeds, hidden.to(embeds.dtype)], dim=-1))
        x, residual = self.layer(positions, x, None, ctx)
        x, _ = self.norm(x, residual)
        return x


def save_eagle(head: EagleHead, path: str | os.PathLike) -> None:
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    head.config.save_pretrained(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}
    save_file(_to_hf_names(head, tensors), os.path.join(path, "model.safetensors"))


def load_eagle(path: str | os.PathLike, dtype: torch.dtype, device: torch.device | str) -> EagleHead:
    """A head saved by save_eagle; clear errors for a directory that is not one."""
    from safetensors.torch import load_file

    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{str(path)!r} is not an EAGLE head directory (no config.json)")
    with open(cfg_path) as f:
        archs = json.load(f).get("architectures") or []
    if ARCH not in archs:
        raise ValueError(f"{str(path)!r} holds {archs}, not a {ARCH} (train one with `gyre train-draft`)")
    cfg = LlamaConfig.from_pretrained(path)
    with torch.device(device):
        head = EagleHead(cfg, dtype)
    head.eval()
    load_into(head, load_file(os.path.join(path, "model.safetensors")))
    return head


def load_into(head: EagleHead, tensors: dict[str, torch.Tensor]) -> None:
    """Copy HF-named tensors into the head in place; every name, shape and dtype checked first (on any
    error nothing is changed)."""
    params = _hf_params(head)
    unknown = sorted(set(tensors) - set(params))
    missing = sorted(set(params) - set(tensors))
    if unknown or missing:
        raise ValueError(f"EAGLE head weights: unknown {unknown[:5]}, missing {missing[:5]}")
    for name, t in tensors.items():
        target, _ = params[name]
        if tuple(t.shape) != target:
            raise ValueError(f"EAGLE head weight {name!r}: shape {tuple(t.shape)}, expected {target}")
        if not t.is_floating_point():
            raise ValueError(f"EAGLE head weight {name!r}: dtype {t.dtype} is not floating point")
    with torch.no_grad():
        for name, t in tensors.items():
            params[name][1](t)


def _hf_params(head: EagleHead) -> dict[str, tuple[tuple[int, ...], Any]]:
    """HF name -> (full shape, loader(tensor)) for every weight of the head."""
    out: dict[str, tuple[tuple[int, ...], Any]] = {}
    for name, p in head.named_parameters():
        if name.startswith("layer."):
            continue
        out[name] = (tuple(p.shape), lambda t, p=p: p.data.copy_(t.to(p.dtype)))
    layer = head.layer
    for hf_name, shape, loader in _layer_specs(layer):
        out["layer." + hf_name] = (shape, loader)
    return out


def _layer_specs(layer: DecoderLayer):
    """(HF name, shape, loader) of a DecoderLayer's weights: q/k/v and gate/up are fused in gyre."""
    for prefix, fused in (("self_attn", layer.self_attn.qkv_proj), ("mlp", layer.mlp.gate_up_proj)):
        for part, (start, size) in _fused_ranges(fused).items():
            rows = fused.weight.data.narrow(0, start, size)
            yield f"{prefix}.{part}_proj.weight", tuple(rows.shape), lambda t, rows=rows: rows.copy_(t)
    for name, w in (("self_attn.o_proj", layer.self_attn.o_proj.weight), ("mlp.down_proj", layer.mlp.down_proj.weight),
                    ("input_layernorm", layer.input_layernorm.weight),
                    ("post_attention_layernorm", layer.post_attention_layernorm.weight)):
        yield f"{name}.weight", tuple(w.shape), lambda t, w=w: w.data.copy_(t)


def _fused_ranges(fused) -> dict[str, tuple[int, int]]:
    out, offset = {}, 0
    for part, size in fused.shard_sizes.items():
        out[part] = (offset, size)
        offset += size
    return out


def _to_hf_names(head: EagleHead, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {k: v for k, v in tensors.items() if not k.startswith("layer.")}
    layer = head.layer
    for prefix, fused in (("self_attn", layer.self_attn.qkv_proj), ("mlp", layer.mlp.gate_up_proj)):
        w = fused.weight.detach().cpu()
        for part, (start, size) in _fused_ranges(fused).items():
            out[f"layer.{prefix}.{part}_proj.weight"] = w.narrow(0, start, size).contiguous()
    for name, w in (("self_attn.o_proj", layer.self_attn.o_proj.weight), ("mlp.down_proj", layer.mlp.down_proj.weight),
                    ("input_layernorm", layer.input_layernorm.weight),
                    ("post_attention_layernorm", layer.post_attention_layernorm.weight)):
        out[f"layer.{name}.weight"] = w.detach().cpu().contiguous()
    return out
