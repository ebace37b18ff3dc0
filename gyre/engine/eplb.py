"""Expert-parallel load balancing (EPLB): replicas of hot experts, placed so that ranks get equal load.

Every MoE layer counts the tokens routed to each logical expert (FusedMoE.expert_load). A rebalance
(`engine.rebalance_experts()`, or every `EngineConfig.eplb_interval` steps) takes the load since the
previous one and plans each layer (`plan_layer`):
1. replicas: the ep_num_redundant_experts extra slots go, one at a time, to the expert with the most
   load per replica (at most one replica per rank);
2. packing: replicas, heaviest first, go to the least loaded rank that has a free slot and no replica
   of that expert yet;
3. slots: an expert that stays on a rank keeps its slot, so that fewer weights move.
Then every rank moves weights (`apply_placement`): a new slot is copied from the rank's own old slot
when it held that expert, else received from a rank that held it, point to point, all ranks walking one
global list of transfers (so no two ranks wait on each other). Weights are written in place (CUDA
graphs stay valid) and the routing tables (FusedMoE.logical_to_phys) are updated in place. Replicas hold
identical weights: outputs do not change, up to the order of float sums across ranks.
"""

from __future__ import annotations

import heapq
from collections import Counter
from typing import Any

import torch
from torch import nn

from gyre.engine.layers.moe import FusedMoE, moe_layers


def plan_layer(load: list[float], num_ranks: int, slots_per_rank: int, current: list[int]) -> list[int]:
    """Physical slot -> logical expert for one layer (rank r holds slots r*S .. (r+1)*S - 1)."""
    num_experts = len(load)
    if sum(load) <= 0:
        return list(current)
    counts = [1] * num_experts
    heap = [(-float(load[e]), e) for e in range(num_experts)]
    heapq.heapify(heap)
    for _ in range(num_ranks * slots_per_rank - num_experts):
        while True:
            _, e = heapq.heappop(heap)
            if counts[e] < num_ranks:
                break
        counts[e] += 1
        heapq.heappush(heap, (-load[e] / counts[e], e))
    replicas = sorted(
        ((load[e] / counts[e], e) for e in range(num_experts) for _ in range(counts[e])),
        key=lambda x: (-x[0], x[1]),
    )
    rank_load = [0.0] * num_ranks
    held: list[list[int]] = [[] for _ in range(num_ranks)]
    for w, e in replicas:
        free = [r for r in range(num_ranks) if len(held[r]) < slots_per_rank]
        candidates = [r for r in free if e not in held[r]] or free
        r = min(candidates, key=lambda r: (rank_load[r], r))
        held[r].append(e)
        rank_load[r] += w
    plan: list[int] = []
    for r in range(num_ranks):
        want = Counter(held[r])
        slots: list[int | None] = []
        for e in current[r * slots_per_rank : (r + 1) * slots_per_rank]:
            keep = want[e] > 0
            slots.append(e if keep else None)
            want[e] -= keep
        rest = sorted(want.elements())
        plan += [e if e is not None else rest.pop(0) for e in slots]
    return plan


def rank_loads(load: list[float], placement: list[int], num_ranks: int) -> list[float]:
    """Expected load of each rank: an expert's load split evenly over its replicas."""
    replicas = Counter(placement)
    per_rank = len(placement) // num_ranks
    out = [0.0] * num_ranks
    for p, e in enumerate(placement):
        out[p // per_rank] += load[e] / replicas[e]
    return out


def imbalance(load: list[float], placement: list[int], num_ranks: int) -> float:
    """max / mean rank load (1.0 = perfectly balanced)."""
    ranks = rank_loads(load, placement, num_ranks)
    mean = sum(ranks) / num_ranks
    return max(ranks) / mean if mean > 0 else 1.0


@torch.no_grad()
def apply_placement(model: nn.Module, plans: list[list[int]]) -> None:
    """Every rank, together: move expert weights to the planned slots and switch the routing tables."""
    for layer, plan in zip(moe_layers(model), plans):
        if plan != layer.phys_to_logical:
            _move(layer, plan)
            layer.set_placement(plan)


def _move(layer: FusedMoE, plan: list[int]) -> None:
    per_rank, tp, me = layer.num_local, layer.tp_size, layer.rank
    holders: dict[int, list[int]] = {}
    for p, e in enumerate(layer.phys_to_logical):
        holders.setdefault(e, []).append(p)
    w13, w2 = layer.w13.data, layer.w2.data
    new13, new2 = torch.empty_like(w13), torch.empty_like(w2)
    works: list[Any] = []
    tag = 0
    for p, e in enumerate(plan):
        dst_ep, dst = divmod(p, per_rank)
        local = [q for q in holders[e] if q // per_rank == dst_ep]
        src_ep, src = divmod(local[0] if local else holders[e][p % len(holders[e])], per_rank)
        for j in range(tp):  # each slice of the expert moves between the ranks with that slice
            src_rank, dst_rank = src_ep * tp + j, dst_ep * tp + j
            if src_rank == me and dst_rank == me:
                new13[dst].copy_(w13[src])
                new2[dst].copy_(w2[src])
            elif src_rank == me:
                works += [
                    layer.group.send([w13[src]], dst_rank, tag),
                    layer.group.send([w2[src]], dst_rank, tag + 1),
                ]
            elif dst_rank == me:
                works += [
                    layer.group.recv([new13[dst]], src_rank, tag),
                    layer.group.recv([new2[dst]], src_rank, tag + 1),
                ]
            tag += 2
    for w in works:
        w.wait()
    w13.copy_(new13)
    w2.copy_(new2)


class ExpertBalancer:
    """Rank 0: expert load statistics and rebalancing of a MoE model (single process: statistics only)."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.layers = moe_layers(runner.model)
        self.interval = runner.config.eplb_interval
        self.num_steps = 0
        self.num_rebalances = 0
        self._since = [[0] * layer.num_experts for layer in self.layers]  # load at the last rebalance

    def loads(self) -> list[list[int]]:
        """Tokens routed to each logical expert of each MoE layer since the engine started."""
        if not self.layers:
            return []
        return torch.stack([layer.expert_load for layer in self.layers]).tolist()

    def on_step(self) -> None:
        self.num_steps += 1
        if self.interval and self.num_steps % self.interval == 0:
            self.rebalance()

    def rebalance(self) -> dict[str, float]:
        first = self.layers[0] if self.layers else None
        if first is None or first.ep_size == 1:
            raise ValueError("rebalance_experts needs a mixture-of-experts model with ep_size > 1")
        now = self.loads()
        window = [[a - b for a, b in zip(x, y)] for x, y in zip(now, self._since)]
        plans = [
            plan_layer(w, layer.ep_size, layer.num_local, layer.phys_to_logical)
            for w, layer in zip(window, self.layers)
        ]
        before = self._imbalance(window, [layer.phys_to_logical for layer in self.layers])
        workers = self.runner.workers
        if workers is not None:
            workers.move_experts(self.runner.model, plans, self.runner.config.weight_update_timeout_s)
        else:
            apply_placement(self.runner.model, plans)
        self._since = now
        self.num_rebalances += 1
        return {"imbalance_before": before, "imbalance_after": self._imbalance(window, plans)}

    def _imbalance(self, window: list[list[int]], placements: list[list[int]]) -> float:
        ep = self.layers[0].ep_size
        return max(imbalance(w, p, ep) for w, p in zip(window, placements))

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"expert_load": self.loads(), "num_expert_rebalances": self.num_rebalances}
        if self.layers and self.layers[0].ep_size > 1:
            now = out["expert_load"]
            window = [[a - b for a, b in zip(x, y)] for x, y in zip(now, self._since)]
            out["expert_imbalance"] = self._imbalance(
                window, [layer.phys_to_logical for layer in self.layers]
            )
            out["expert_placement"] = [list(layer.phys_to_logical) for layer in self.layers]
        return out
