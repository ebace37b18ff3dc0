"""Mixture-of-experts: top-k softmax router + experts stored fused as w13 [E, 2I, H] and w2 [E, H, I].

HF checkpoints name experts one by one (`experts.{e}.gate_proj.weight`); the weight loader writes each
into its slice(s).

Parallel layout (gyre.engine.parallel): each rank holds `num_local` physical expert slots, those of its
ep_rank, and the slice moe_tp_rank of their intermediate dim. There are num_experts + redundant
physical slots: `phys_to_logical` says which logical expert each holds; an expert may have several
replicas (EPLB, gyre.engine.eplb). The router picks logical experts; token t's choice j goes to replica
(t + j) mod num_replicas of its expert. Replicas hold identical weights, so outputs do not depend on the
placement (up to the order of the final float sums).

Dispatch. Every rank holds the whole batch (attention is replicated or TP, whose activations are
replicated after its all-reduce), so tokens need not move to reach their experts:
- "allreduce" (default): each rank runs its local experts (its intermediate slice) for every
  (token, choice) pair routed to them, weighted, and one all-reduce of [T, H] sums the partials.
  Bytes per rank: 2 (W-1)/W T H, the same as the all-reduce after a TP MLP; no host sync.
- "alltoall": rank r takes token shard r, sends each (token, choice) pair's hidden state to the rank of
  its expert (all_to_all_single, counts exchanged first: one host sync per layer), the experts run,
  results come back (a second all-to-all), are weighted and summed in the shard's order, and an
  all-gather re-replicates [T, H]. Bytes per rank: 2 (W-1)/W^2 T k H + (W-1)/W T H: more than
  "allreduce" for k > 1 while activations are replicated. It is the path an engine with
  data-parallel attention (token-sharded activations) needs, kept and tested for that.

Routing store: rank 0 writes every step's logical expert ids into a [num_slots + 1, k] table per MoE
layer, indexed by KV slot (the extra last row takes CUDA-graph padding, slot -1). Routing of a prefix
served from the prefix cache is read from there: it was stored with its KV.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gyre.engine.layers.linear import default_weight_loader
from gyre.engine.parallel import all_gather_rows, all_reduce, all_to_all, get_parallel_state
from gyre.kernels import batch_invariant as bi


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (topk_weights [T, k] float32, topk_ids [T, k] int64), as HF Qwen3-MoE."""
    probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def moe_forward_torch(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_offset: int = 0,
) -> torch.Tensor:
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


def fused_moe_local(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_offset: int,
) -> torch.Tensor:
    """gyre.kernels.moe's grouped GEMMs over the pairs whose expert is local (ids in [offset, offset + E));
    the others go to a sentinel expert whose blocks the kernels skip (their rows stay zero)."""
    import triton

    from gyre.kernels import moe as kernels

    num_tokens, top_k = topk_ids.shape
    num_local, two_i, hidden = w13.shape
    inter = two_i // 2
    num_pairs = num_tokens * top_k
    if num_pairs == 0:
        return torch.zeros_like(x)
    local = topk_ids - expert_offset
    local = torch.where((local >= 0) & (local < num_local), local, num_local)
    cfg = kernels._config(num_pairs, num_local)
    sorted_ids, expert_ids, num_padded = kernels.moe_align_block_size(local, cfg["BLOCK_M"], num_local + 1)
    expert_ids = torch.where(expert_ids == num_local, -1, expert_ids)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    act = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)
    grid = (expert_ids.shape[0], triton.cdiv(inter, cfg["BLOCK_N"]))
    kernels._moe_gate_up_kernel[grid](
        x, w13, act, sorted_ids, expert_ids, num_padded, num_pairs, top_k, hidden, inter,
        x.stride(0), w13.stride(0), w13.stride(1), act.stride(0), PRECISION=precision, **cfg,
    )  # fmt: skip
    y = torch.zeros(num_pairs, hidden, dtype=x.dtype, device=x.device)
    grid = (expert_ids.shape[0], triton.cdiv(hidden, cfg["BLOCK_N"]))
    kernels._moe_down_kernel[grid](
        act, w2, y, topk_weights.reshape(-1).contiguous(), sorted_ids, expert_ids, num_padded, num_pairs,
        hidden, inter, act.stride(0), w2.stride(0), w2.stride(1), y.stride(0), PRECISION=precision, **cfg,
    )  # fmt: skip
    return y.view(num_tokens, top_k, hidden).sum(dim=1, dtype=torch.float32).to(x.dtype)


@dataclass
class Dispatch:
    """alltoall dispatch of one layer: rows received for this rank's experts, and how to send them back."""

    rows: torch.Tensor  # [N, H] hidden states of the (token, choice) pairs routed to this rank's experts
    local_ids: torch.Tensor  # [N] local expert of each row
    order: torch.Tensor  # [shard T * k] the shard's pairs sorted by destination rank
    send_counts: list[int]
    recv_counts: list[int]
    weights: torch.Tensor  # [shard T, k] routing weights of the shard
    shard_sizes: list[int]  # tokens of each rank's shard


class FusedMoE(nn.Module):
    batch_invariant = False  # set by gyre.engine.deterministic.make_batch_invariant

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        intermediate_size: int,
        renormalize: bool,
        ep_rank: int = 0,
        ep_size: int = 1,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        st = get_parallel_state()
        redundant = st.num_redundant_experts if ep_size > 1 else 0
        if (num_experts + redundant) % ep_size:
            raise ValueError(
                f"ep_size {ep_size} does not divide num_experts {num_experts} (+ {redundant} redundant)"
            )
        if intermediate_size % st.moe_tp_size:
            raise ValueError(
                f"{st.moe_tp_size} ranks per expert do not divide moe_intermediate_size {intermediate_size}"
            )
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.ep_rank, self.ep_size = ep_rank, ep_size
        self.tp_rank, self.tp_size = st.moe_tp_rank, st.moe_tp_size
        self.num_physical = num_experts + redundant
        self.num_local = self.num_physical // ep_size
        self.expert_offset = ep_rank * self.num_local  # first physical slot on this rank
        self.local_inter = intermediate_size // self.tp_size
        self.group = st.ep_group if st.world_size > 1 else None
        self.dispatch_mode, self.rank, self.world_size = st.ep_dispatch, st.rank, st.world_size
        self.w13 = nn.Parameter(
            torch.empty(self.num_local, 2 * self.local_inter, hidden_size, dtype=dtype), requires_grad=False
        )
        self.w2 = nn.Parameter(
            torch.empty(self.num_local, hidden_size, self.local_inter, dtype=dtype), requires_grad=False
        )
        self.w13.weight_loader = self._load_w13
        self.w2.weight_loader = self._load_w2
        self.w13.expected_shape = lambda shard_id=None: (intermediate_size, hidden_size)
        self.w2.expected_shape = lambda shard_id=None: (hidden_size, intermediate_size)
        # tokens routed to each logical expert (since start; every rank counts the same)
        self.register_buffer("expert_load", torch.zeros(num_experts, dtype=torch.int64), persistent=False)
        # logical -> its physical slots (first num_replicas[e] of row e), updated in place by set_placement
        self.register_buffer(
            "logical_to_phys", torch.zeros(num_experts, 1 + redundant, dtype=torch.int64), persistent=False
        )
        self.register_buffer("num_replicas", torch.ones(num_experts, dtype=torch.int64), persistent=False)
        self.phys_to_logical: list[int] = []
        self.set_placement([p % num_experts for p in range(self.num_physical)])
        self.routing_store: torch.Tensor | None = None  # [num_slots + 1, k] on rank 0 (attach_routing_store)

    # -- placement -------------------------------------------------------------------------------------
    def set_placement(self, phys_to_logical: list[int]) -> None:
        """Which logical expert each physical slot holds (the weights are moved by gyre.engine.eplb)."""
        assert len(phys_to_logical) == self.num_physical and set(phys_to_logical) == set(
            range(self.num_experts)
        )
        self.phys_to_logical = list(phys_to_logical)
        replicas: list[list[int]] = [[] for _ in range(self.num_experts)]
        for p, e in enumerate(phys_to_logical):
            replicas[e].append(p)
        table = torch.zeros(self.logical_to_phys.shape, dtype=torch.int64, device="cpu")
        for e, slots in enumerate(replicas):
            table[e, : len(slots)] = torch.tensor(slots, device="cpu")
        self.logical_to_phys.copy_(table)
        self.num_replicas.copy_(torch.tensor([len(s) for s in replicas], device="cpu"))
        self.is_identity = phys_to_logical == list(range(self.num_experts))
        local = phys_to_logical[self.expert_offset : self.expert_offset + self.num_local]
        self._local_slots = {e: [i for i, x in enumerate(local) if x == e] for e in set(local)}

    def ranks_holding(self, expert: int) -> list[int]:
        """Every rank that holds (a slice of) a replica of a logical expert."""
        eps = {p // self.num_local for p, e in enumerate(self.phys_to_logical) if e == expert}
        return sorted(ep * self.tp_size + j for ep in eps for j in range(self.tp_size))

    def owns(self, expert_id: int) -> bool:
        return expert_id in self._local_slots

    def to_physical(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """Logical expert ids [T, k] -> physical slots: choice j of token t takes replica (t + j) mod n."""
        if self.is_identity:
            return topk_ids
        t, k = topk_ids.shape
        spread = torch.arange(t, device=topk_ids.device)[:, None] + torch.arange(k, device=topk_ids.device)
        return self.logical_to_phys[topk_ids, spread % self.num_replicas[topk_ids]]

    # -- loading ---------------------------------------------------------------------------------------
    def _shard_inter(self, loaded: torch.Tensor, dim: int) -> torch.Tensor:
        if self.tp_size == 1:
            return loaded
        return loaded.narrow(dim, self.tp_rank * self.local_inter, self.local_inter)

    def _load_w13(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: tuple[str, int]) -> None:
        which, e = shard_id
        if loaded.shape != (self.intermediate_size, self.hidden_size):
            raise ValueError(
                f"shape mismatch: expert {which} {tuple(loaded.shape)}, expected "
                f"{(self.intermediate_size, self.hidden_size)}"
            )
        start = 0 if which == "gate" else self.local_inter
        for i in self._local_slots.get(e, ()):
            default_weight_loader(
                param.data[i].narrow(0, start, self.local_inter), self._shard_inter(loaded, 0)
            )

    def _load_w2(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: tuple[str, int]) -> None:
        _, e = shard_id
        if loaded.shape != (self.hidden_size, self.intermediate_size):
            raise ValueError(
                f"shape mismatch: expert down {tuple(loaded.shape)}, expected "
                f"{(self.hidden_size, self.intermediate_size)}"
            )
        for i in self._local_slots.get(e, ()):
            default_weight_loader(param.data[i], self._shard_inter(loaded, 1))

    # -- forward ---------------------------------------------------------------------------------------
    def observe(self, topk_ids: torch.Tensor, ctx) -> None:
        """Count the step's routing (load statistics) and store it by KV slot (rank 0)."""
        flat = topk_ids.reshape(-1)
        self.expert_load.scatter_add_(0, flat, torch.ones_like(flat))
        if self.routing_store is not None and ctx is not None:
            self.routing_store[ctx.attn.slot_mapping] = topk_ids.to(self.routing_store.dtype)

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        if self.batch_invariant:
            return bi.moe(x, self.w13, self.w2, topk_weights, topk_ids, self.expert_offset)
        ids = self.to_physical(topk_ids)
        if self.group is None:
            return self._local(x, topk_weights, ids)
        if self.dispatch_mode == "alltoall":
            return self._forward_all_to_all(x, topk_weights, ids)
        return all_reduce(self._local(x, topk_weights, ids), self.group)

    def _local(self, x: torch.Tensor, topk_weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Weighted outputs of this rank's experts (its intermediate slice) for the pairs routed to them."""
        if not x.is_cuda:
            return moe_forward_torch(x, self.w13, self.w2, topk_weights, ids, self.expert_offset)
        if self.ep_size == 1:
            from gyre.kernels.moe import fused_moe

            return fused_moe(x, self.w13, self.w2, topk_weights, ids)
        return fused_moe_local(x, self.w13, self.w2, topk_weights, ids, self.expert_offset)

    def _forward_all_to_all(
        self, x: torch.Tensor, topk_weights: torch.Tensor, ids: torch.Tensor
    ) -> torch.Tensor:
        d = self.dispatch(x, topk_weights, ids)
        return self.combine(self.expert_rows(d.rows, d.local_ids), d)

    def dispatch(self, x: torch.Tensor, topk_weights: torch.Tensor, ids: torch.Tensor) -> Dispatch:
        """alltoall: this rank's token shard's (token, choice) pairs -> the ranks of their experts."""
        world, r, k = self.world_size, self.rank, self.top_k
        bounds = [i * x.shape[0] // world for i in range(world + 1)]
        shard = slice(bounds[r], bounds[r + 1])
        flat = ids[shard].reshape(-1)  # pair p = t * k + j of the shard
        dest = flat // self.num_local
        order = torch.argsort(dest, stable=True)
        send = torch.zeros(world, dtype=torch.int64, device=x.device).scatter_add_(
            0, dest, torch.ones_like(dest)
        )
        recv = all_to_all(send, [1] * world, [1] * world, self.group)
        send_counts, recv_counts = send.tolist(), recv.tolist()  # NOTE: the host sync of this mode
        rows = all_to_all(x[shard][order // k], send_counts, recv_counts, self.group)
        local_ids = all_to_all(flat[order] % self.num_local, send_counts, recv_counts, self.group)
        return Dispatch(
            rows,
            local_ids,
            order,
            send_counts,
            recv_counts,
            topk_weights[shard],
            [b - a for a, b in zip(bounds, bounds[1:])],
        )

    def combine(self, y: torch.Tensor, d: Dispatch) -> torch.Tensor:
        """Expert outputs [N, H] of dispatched rows -> back to their shards, weighted, re-replicated [T, H]."""
        back = all_to_all(y, d.recv_counts, d.send_counts, self.group)  # in the shard's `order`
        pairs = torch.empty_like(back)
        pairs[d.order] = back
        out = (pairs.view(-1, self.top_k, y.shape[1]).float() * d.weights[..., None]).sum(dim=1).to(y.dtype)
        return all_gather_rows(out, d.shard_sizes, self.group)

    def expert_rows(self, rows: torch.Tensor, local_ids: torch.Tensor) -> torch.Tensor:
        """rows [N, H], local expert of each [N] -> that expert's output for each row (unweighted)."""
        ones = torch.ones(rows.shape[0], 1, dtype=torch.float32, device=rows.device)
        if not rows.is_cuda:
            return moe_forward_torch(rows, self.w13, self.w2, ones, local_ids[:, None])
        from gyre.kernels.moe import fused_moe

        return fused_moe(rows, self.w13, self.w2, ones, local_ids[:, None])


def moe_layers(model: nn.Module) -> list[FusedMoE]:
    return [m for m in model.modules() if isinstance(m, FusedMoE)]


def attach_routing_store(model: nn.Module, num_slots: int) -> torch.Tensor | None:
    """Give each MoE layer its [num_slots + 1, k] view of one routing table [L, num_slots + 1, k]."""
    layers = moe_layers(model)
    if not layers:
        return None
    first = layers[0]
    dtype = torch.int16 if first.num_experts < 2**15 else torch.int32
    store = torch.zeros(len(layers), num_slots + 1, first.top_k, dtype=dtype, device=first.w13.device)
    for i, layer in enumerate(layers):
        layer.routing_store = store[i]
    return store


def read_routing(store: torch.Tensor, page_table: list[int], page_size: int, start: int, end: int) -> list:
    """Routed experts of positions [start, end) of a sequence: [position][moe_layer][k]."""
    pos = torch.arange(start, end)
    slots = torch.tensor(page_table, dtype=torch.int64)[pos // page_size] * page_size + pos % page_size
    return store[:, slots.to(store.device)].permute(1, 0, 2).tolist()
