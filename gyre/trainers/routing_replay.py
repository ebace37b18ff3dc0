"""Rollout routing replay (R3): the training forward routes every token to the experts the engine chose.

Without it, the trainer's router disagrees with the engine's on a fraction of tokens (different kernels,
batch shapes, and after each optimizer step different weights), so the trained policy is not the one
that sampled; MoE RL runs drift or collapse.

Engine side: `SamplingParams(return_routed_experts=True)` fills `Completion.routed_experts`: one entry per
position 0 .. len(prompt_ids) + len(output_ids) - 2 of prompt + output (every token the engine computed;
the last output token was sampled, never fed back), each `[moe_layer][k]`: logical expert ids in the
router's top-k order (MoE layers in model order). Positions served from the prefix cache are included
(their routing is kept with their KV); tp/ep > 1 give the same ids.

Trainer side: the context managers below force those choices. The router still computes its logits and
probabilities (its gradient flows through the weights of the replayed experts); only which experts is
replaced: weights = softmax(logits) at the given experts, renormalised when the model renormalises.
A row of -1 (a position without a record, e.g. each sequence's last token) is routed by the router.

    routing = routing_tensor([o.routed_experts for o in outs], [len(o.prompt_ids) + len(o.output_ids) ...])
    with replay_gyre(model, routing):        # gyre models (gyre.trainers.training_forward), packed tokens
        logp = sequence_logprobs(model, seqs)
    with replay_hf(hf_model, routing_tensor(..., seq_len=S)):   # HF Qwen3-MoE, a [B, S] batch
        out = hf_model(input_ids)
    with replay_megatron(gpt_model, routing_tensor(..., seq_len=S, order="sb")):  # megatron-core TopKRouter
        out = gpt_model(input_ids, position_ids, attention_mask)

Token order: the routing tensor's rows must be the tokens in the order the router sees them: packed
sequences back to back (gyre), [batch, seq] row-major (HF), [seq, batch] (Megatron; with sequence
parallelism each TP rank sees only its shard of the sequence: pass that shard's rows).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def routing_tensor(
    routed: Sequence[Sequence[Sequence[Sequence[int]]]],
    lengths: Sequence[int] | None = None,
    seq_len: int | None = None,
    order: str = "bs",
) -> torch.Tensor:
    """Per-sequence `Completion.routed_experts` -> [num_tokens, num_moe_layers, k] int64, -1 where there
    is no record. lengths: each sequence's token count (default: records + 1). seq_len=None packs the
    sequences back to back; else each is right-padded to seq_len and the rows are ordered [batch, seq]
    (order="bs") or [seq, batch] (order="sb")."""
    if order not in ("bs", "sb"):
        raise ValueError(f"order must be 'bs' or 'sb', got {order!r}")
    first = next((r for r in routed if len(r)), None)
    if first is None:
        raise ValueError("no routing records (was return_routed_experts set?)")
    layers, k = len(first[0]), len(first[0][0])
    lengths = [len(r) + 1 for r in routed] if lengths is None else list(lengths)
    if any(len(r) > n for r, n in zip(routed, lengths)):
        raise ValueError("a sequence has more routing records than tokens")
    if seq_len is not None and max(lengths) > seq_len:
        raise ValueError(f"a sequence of {max(lengths)} tokens does not fit seq_len {seq_len}")
    parts = []
    for r, n in zip(routed, lengths):
        t = torch.full((seq_len if seq_len is not None else n, layers, k), -1, dtype=torch.int64)
        if len(r):
            t[: len(r)] = torch.tensor(r, dtype=torch.int64)
        parts.append(t)
    if seq_len is None:
        return torch.cat(parts)
    out = torch.stack(parts)  # [B, S, L, k]
    return (out if order == "bs" else out.transpose(0, 1)).reshape(-1, layers, k)


def _choose(given: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """given [T, k] (-1 rows: no record) and the router's own choice [T, k] -> the ids to use."""
    if given.shape != own.shape:
        raise ValueError(
            f"routing replay: {tuple(given.shape)} ids for a router choosing {tuple(own.shape)} "
            "(are the tokens in the router's order?)"
        )
    given = given.to(own.device)
    return torch.where((given >= 0).all(dim=1, keepdim=True), given, own)


def _layer_slices(routing: torch.Tensor, num_layers: int) -> list[torch.Tensor]:
    if routing.dim() != 3 or routing.shape[1] != num_layers:
        raise ValueError(
            f"routing replay: routing has shape {tuple(routing.shape)}; expected [tokens, "
            f"{num_layers} MoE layers, k]"
        )
    return [routing[:, i] for i in range(num_layers)]


@contextlib.contextmanager
def _patched(modules: list[nn.Module], forwards: list[Any]) -> Iterator[None]:
    """Instance-level forward overrides, removed on exit."""
    try:
        for m, f in zip(modules, forwards):
            m.forward = f
        yield
    finally:
        for m in modules:
            m.__dict__.pop("forward", None)


# -- gyre models --------------------------------------------------------------------------------------
def replay_gyre(model: nn.Module, routing: torch.Tensor) -> contextlib.AbstractContextManager:
    """Route a gyre model's forward (tokens packed as given to it) by `routing` [T, L, k]."""
    from gyre.engine.models.qwen3_moe import SparseMoeBlock
    from gyre.kernels import batch_invariant as bi

    blocks = [m for m in model.modules() if isinstance(m, SparseMoeBlock)]

    def make(block: SparseMoeBlock, ids: torch.Tensor):
        def forward(x: torch.Tensor, ctx) -> torch.Tensor:
            logits = block.gate(x)  # [T, E]
            probs = F.softmax(logits, dim=-1, dtype=torch.float32)
            chosen = _choose(ids, torch.topk(probs, block.top_k, dim=-1).indices)
            weights = probs.gather(1, chosen)
            if block.renormalize:
                total = (
                    bi.tree_sum(weights)[:, None] if block.batch_invariant else weights.sum(-1, keepdim=True)
                )
                weights = weights / total
            return block.experts(x, weights, chosen)

        return forward

    return _patched(blocks, [make(b, ids) for b, ids in zip(blocks, _layer_slices(routing, len(blocks)))])


# -- HF transformers ----------------------------------------------------------------------------------
def replay_hf(model: nn.Module, routing: torch.Tensor) -> contextlib.AbstractContextManager:
    """Route an HF transformers Qwen3-MoE (transformers >= 5: `mlp.gate` is a TopKRouter returning
    (logits, scores, indices)) by `routing` [B * S, L, k], tokens in [batch, seq] order."""
    gates = [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]
    if not gates:
        raise ValueError(
            f"routing replay: no TopKRouter in {type(model).__name__} (transformers >= 5 "
            "Qwen3-MoE-style routers are supported)"
        )

    def make(gate: nn.Module, ids: torch.Tensor):
        def forward(hidden_states: torch.Tensor):
            hidden_states = hidden_states.reshape(-1, gate.hidden_dim)
            logits = F.linear(hidden_states, gate.weight)  # [T, E]
            probs = F.softmax(logits, dim=-1, dtype=torch.float)
            chosen = _choose(ids, torch.topk(probs, gate.top_k, dim=-1).indices)
            scores = probs.gather(1, chosen)
            if gate.norm_topk_prob:
                scores = scores / scores.sum(dim=-1, keepdim=True)
            return logits, scores.to(logits.dtype), chosen

        return forward

    return _patched(gates, [make(g, ids) for g, ids in zip(gates, _layer_slices(routing, len(gates)))])


# -- megatron-core ----------------------------------------------------------------------------------------
class _MegatronReplay:
    """Stands in for megatron-core's RouterReplay on one router: `topk_routing_with_score_function`
    asks it for the top-k of the scores; it answers with the given experts."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def get_replay_topk(
        self,
        scores: torch.Tensor,
        topk: int,
        num_groups: int | None = None,
        group_topk: int | None = None,
        default_compute_topk: Any = None,
    ):
        _, own = default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)
        chosen = _choose(self.ids, own)
        return scores.gather(1, chosen), chosen


@contextlib.contextmanager
def replay_megatron(
    model: nn.Module | Sequence[nn.Module], routing: torch.Tensor, moe_index: dict[int, int] | None = None
) -> Iterator[None]:
    """Route megatron-core TopKRouters by `routing` [S * B, L, k], tokens in [seq, batch] order.

    Row i of the layer axis belongs to the router of global layer number moe_index^-1(i); by default
    every layer is a MoE layer (layer_number n -> row n - 1), which also holds under pipeline
    parallelism (each stage replays its own layers)."""
    from megatron.core.transformer.moe.router import TopKRouter

    chunks = model if isinstance(model, (list, tuple)) else [model]
    routers = [m for chunk in chunks for m in chunk.modules() if isinstance(m, TopKRouter)]
    saved = [r.router_replay for r in routers]
    try:
        for r in routers:
            row = moe_index[r.layer_number] if moe_index is not None else r.layer_number - 1
            if not 0 <= row < routing.shape[1]:
                raise ValueError(f"routing replay: no routing row for the router of layer {r.layer_number}")
            r.router_replay = _MegatronReplay(routing[:, row])
        yield
    finally:
        for r, s in zip(routers, saved):
            r.router_replay = s
