"""What every gyre model shares: the LM head, logits, and HF-name -> parameter resolution.

`resolve(hf_name) -> (param, shard_id)` is the single mapping from checkpoint names to our (fused,
sharded) parameters. Loading from disk, hot-swapping weights and validating an update all go through
it and the parameter's `weight_loader`, which copies in place.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from gyre.engine.layers.linear import Linear, expected_shape
from gyre.engine.parallel import tp_all_gather_last_dim
from gyre.kernels import batch_invariant as bi

_STACKED = [  # (HF name part, our name part, shard id)
    (".q_proj.", ".qkv_proj.", "q"),
    (".k_proj.", ".qkv_proj.", "k"),
    (".v_proj.", ".qkv_proj.", "v"),
    (".gate_proj.", ".gate_up_proj.", "gate"),
    (".up_proj.", ".gate_up_proj.", "up"),
]
_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")


class CausalLMBase(nn.Module):
    batch_invariant = False  # set by gyre.engine.deterministic.make_batch_invariant

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.config = cfg
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))

    def init_lm_head(self, cfg: Any, dtype: torch.dtype) -> None:
        if self.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False, tp_mode="column", dtype=dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx) -> torch.Tensor:
        """input_ids, positions [T] -> final hidden states [T, H]."""
        return self.model(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] -> float32 logits [N, V]."""
        if self.lm_head is None:
            if self.batch_invariant:
                return bi.linear(hidden, self.model.embed_tokens.weight).float()
            return torch.nn.functional.linear(hidden, self.model.embed_tokens.weight).float()
        return tp_all_gather_last_dim(self.lm_head(hidden)).float()

    # -- HF names ---------------------------------------------------------------------------------
    def _params(self) -> dict[str, nn.Parameter]:
        params = getattr(self, "_param_cache", None)
        if params is None:
            params = dict(self.named_parameters())
            self._param_cache = params
        return params

    def resolve(self, hf_name: str) -> tuple[nn.Parameter, Any] | None:
        """(parameter, shard_id) that an HF checkpoint tensor loads into; None for names to skip."""
        params = self._params()
        if _IGNORED.search(hf_name):
            return None
        if hf_name == "lm_head.weight" and self.tie_word_embeddings:
            return params["model.embed_tokens.weight"], None
        m = _EXPERT.match(hf_name)
        if m:
            prefix, e, which = m.group(1), int(m.group(2)), m.group(3)
            name = f"{prefix}.w2" if which == "down" else f"{prefix}.w13"
            if name not in params or e >= self.num_experts:
                raise KeyError(hf_name)
            return params[name], (which, e)
        for hf_part, our_part, shard in _STACKED:
            if hf_part in hf_name:
                name = hf_name.replace(hf_part, our_part)
                if name in params:
                    return params[name], shard
        if hf_name in params:
            return params[hf_name], None
        raise KeyError(hf_name)

    @property
    def num_experts(self) -> int:
        return getattr(self.config, "num_experts", None) or getattr(self.config, "num_local_experts", 0) or 0

    def hf_weight_specs(self) -> dict[str, tuple[int, ...]]:
        """Every HF tensor name this model expects, with its full (unsharded) shape."""
        specs: dict[str, tuple[int, ...]] = {}
        for name, param in self._params().items():
            if name.endswith("qkv_proj.weight") or name.endswith("qkv_proj.bias"):
                for hf, shard in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")):
                    specs[name.replace("qkv_proj", hf)] = expected_shape(param, shard)
            elif "gate_up_proj" in name:
                for hf, shard in (("gate_proj", "gate"), ("up_proj", "up")):
                    specs[name.replace("gate_up_proj", hf)] = expected_shape(param, shard)
            elif name.endswith("experts.w13") or name.endswith("experts.w2"):
                prefix = name.rsplit(".", 1)[0]
                which = ("gate", "up") if name.endswith("w13") else ("down",)
                for e in range(self.num_experts):
                    for w in which:
                        specs[f"{prefix}.{e}.{w}_proj.weight"] = expected_shape(param, (w, e))
            else:
                specs[name] = expected_shape(param)
        if self.tie_word_embeddings:
            specs.pop("lm_head.weight", None)
        return specs

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named tensors into our parameters in place; returns the names loaded."""
        loaded = set()
        for hf_name, tensor in weights:
            target = self.resolve(hf_name)
            if target is None:
                continue
            param, shard = target
            param.weight_loader(param, tensor.to(param.dtype), shard)
            loaded.add(hf_name)
        return loaded
