"""Named HF-checkpoint tensors out of a single-process model: an HF `PreTrainedModel` or a gyre model.

The names are those of the model's safetensors checkpoint, which is what `Engine.update_weights` takes
(and what the engine model's `hf_weight_specs()` lists). Two layouts differ from the checkpoint in memory:
- transformers 5 fuses MoE experts: `mlp.experts.gate_up_proj` [E, 2I, H] (gate rows first) and
  `mlp.experts.down_proj` [E, H, I]; the checkpoint has `mlp.experts.{e}.{gate,up,down}_proj.weight`.
- gyre models fuse `qkv_proj`, `gate_up_proj` and experts `w13` [E, 2I, H] / `w2` [E, H, I].
Tied embeddings appear once, as `model.embed_tokens.weight` (named_parameters deduplicates them).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
from torch import nn

NamedTensor = tuple[str, torch.Tensor]

# prefixes added by wrappers: torch.compile, DDP, FSDP1, activation checkpointing
_WRAPPER_PARTS = re.compile(r"(^|\.)(_orig_mod|_fsdp_wrapped_module|_checkpoint_wrapped_module)\.")
_HF_FUSED_EXPERTS = re.compile(r"^(.*\.experts)\.(gate_up_proj|down_proj)$")


def clean_name(name: str) -> str:
    """The module path without the prefixes that wrappers insert."""
    name = _WRAPPER_PARTS.sub(r"\1", name)
    return name.removeprefix("module.")


def hf_tensors(name: str, tensor: torch.Tensor) -> list[NamedTensor]:
    """One full (unsharded) parameter of an HF model -> its checkpoint tensors (views, no copies)."""
    m = _HF_FUSED_EXPERTS.match(name)
    if m is None or tensor.dim() != 3:
        return [(name, tensor)]
    prefix, which = m.groups()
    if which == "down_proj":  # [E, H, I]
        return [(f"{prefix}.{e}.down_proj.weight", tensor[e]) for e in range(tensor.shape[0])]
    inter = tensor.shape[1] // 2  # [E, 2I, H]: gate rows, then up rows
    out = []
    for e in range(tensor.shape[0]):
        out += [
            (f"{prefix}.{e}.gate_proj.weight", tensor[e, :inter]),
            (f"{prefix}.{e}.up_proj.weight", tensor[e, inter:]),
        ]
    return out


def _gyre_tensors(model: nn.Module) -> Iterator[NamedTensor]:
    """A gyre engine model (tp_size = ep_size = 1) -> checkpoint tensors, split by hf_weight_specs()."""
    specs = model.hf_weight_specs()
    for name, p in model.named_parameters():
        if name.endswith(("qkv_proj.weight", "qkv_proj.bias", "gate_up_proj.weight", "gate_up_proj.bias")):
            fused, parts = (
                ("qkv_proj", ("q_proj", "k_proj", "v_proj"))
                if "qkv_proj" in name
                else ("gate_up_proj", ("gate_proj", "up_proj"))
            )
            names = [name.replace(fused, part) for part in parts]
            sizes = [specs[n][0] for n in names]
            if sum(sizes) != p.shape[0]:
                raise ValueError(
                    f"{name}: local shape {tuple(p.shape)} is a tensor-parallel shard; "
                    "the HF adapter takes unsharded gyre models only"
                )
            yield from zip(names, p.split(sizes, dim=0))
        elif name.endswith(("experts.w13", "experts.w2")):
            prefix = name.rsplit(".", 1)[0]
            if p.shape[0] != model.num_experts:
                raise ValueError(
                    f"{name}: {p.shape[0]} of {model.num_experts} experts (expert parallel); "
                    "the HF adapter takes unsharded gyre models only"
                )
            if name.endswith("w2"):
                yield from ((f"{prefix}.{e}.down_proj.weight", p[e]) for e in range(p.shape[0]))
            else:
                inter = p.shape[1] // 2
                for e in range(p.shape[0]):
                    yield f"{prefix}.{e}.gate_proj.weight", p[e, :inter]
                    yield f"{prefix}.{e}.up_proj.weight", p[e, inter:]
        elif name in specs:
            if tuple(p.shape) != tuple(specs[name]):
                raise ValueError(f"{name}: local shape {tuple(p.shape)} != full {tuple(specs[name])}")
            yield name, p


class HFAdapter:
    """`named_tensors()` of a model held whole by this process.

    dtype: cast every tensor (e.g. to the engine's dtype); None keeps the model's. Tensors are detached
    views of the live parameters when no cast is needed: consume them before the next optimizer step.
    """

    is_sender = True

    def __init__(self, model: nn.Module, dtype: torch.dtype | None = None) -> None:
        self.model = model
        self.dtype = dtype

    def named_tensors(self) -> Iterator[NamedTensor]:
        model = self.model
        with torch.no_grad():
            if hasattr(model, "hf_weight_specs"):  # a gyre model
                pairs = _gyre_tensors(model)
            else:
                pairs = (
                    pair
                    for name, p in model.named_parameters()
                    for pair in hf_tensors(clean_name(name), p.detach())
                )
            for name, t in pairs:
                yield name, t.detach() if self.dtype is None else t.detach().to(self.dtype)
