"""Ranks, process groups and collectives for tensor and expert parallelism.

Layout (world = max(tp_size, ep_size); the smaller must divide the larger):
- rank 0 is the engine process (it schedules and samples), ranks 1.. are worker processes
  (gyre.engine.workers); on GPUs rank r runs on the engine's device index + r.
- Every rank computes every token of a step: rank 0 sends the step's host tensors to the workers.
- Attention and dense MLPs: tensor parallel over groups of tp_size consecutive ranks (heads and
  intermediate dims split, all-reduce after row-parallel layers, lm_head gathered); when world > tp
  the groups are replicas of each other.
- MoE layers: rank r holds the physical expert slots of ep_rank = r // moe_tp and the slice
  moe_tp_rank = r % moe_tp of their intermediate dim, moe_tp = world // ep_size (so TP alone shards
  every expert, EP alone places whole experts). How tokens reach their experts: layers/moe.py.

The groups are bare gloo / NCCL backend objects built from a TCPStore that rank 0 hosts: never
torch.distributed's default group, so a trainer in the same process keeps its own. The state is per
thread: the engine thread of a parallel engine and a worker's main thread set it; everything else in
the process (other engines, training code) sees the single-process default.
"""

from __future__ import annotations

import contextlib
import datetime
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

COLLECTIVE_TIMEOUT_S = 300.0  # a step or transfer that stalls longer (a hung peer) raises
DISPATCH_MODES = ("allreduce", "alltoall")


@dataclass
class ParallelState:
    tp_rank: int = 0
    tp_size: int = 1
    tp_group: Any = None  # attention / dense layers
    ep_rank: int = 0
    ep_size: int = 1
    ep_group: Any = None  # MoE combine: every rank (an expert's slices may live on all of them)
    rank: int = 0
    world_size: int = 1
    world_group: Any = None
    moe_tp_rank: int = 0
    moe_tp_size: int = 1
    num_redundant_experts: int = 0  # extra physical expert slots per MoE layer (EPLB replicas)
    ep_dispatch: str = "allreduce"
    device: torch.device | None = None  # where this rank's collectives run (cpu for gloo)


_DEFAULT = ParallelState()
_local = threading.local()


def get_parallel_state() -> ParallelState:
    return getattr(_local, "state", _DEFAULT)


def set_parallel_state(state: ParallelState) -> None:
    """Set this thread's state (the engine thread and each worker's main thread)."""
    _local.state = state


@contextlib.contextmanager
def use_parallel_state(state: ParallelState) -> Iterator[ParallelState]:
    prev = get_parallel_state()
    set_parallel_state(state)
    try:
        yield state
    finally:
        set_parallel_state(prev)


# -- layout and validation ---------------------------------------------------------------------------
def world_size_of(tp_size: int, ep_size: int) -> int:
    return max(tp_size, ep_size)


def rank_state(
    rank: int, tp_size: int, ep_size: int, num_redundant: int = 0, dispatch: str = "allreduce"
) -> ParallelState:
    """The ranks of `rank` (no groups yet)."""
    world = world_size_of(tp_size, ep_size)
    moe_tp = world // ep_size
    return ParallelState(
        tp_rank=rank % tp_size,
        tp_size=tp_size,
        ep_rank=rank // moe_tp,
        ep_size=ep_size,
        rank=rank,
        world_size=world,
        moe_tp_rank=rank % moe_tp,
        moe_tp_size=moe_tp,
        num_redundant_experts=num_redundant if ep_size > 1 else 0,
        ep_dispatch=dispatch,
    )


def check_config(config: Any, hf_config: Any, device: torch.device) -> None:
    """ValueError naming what is wrong with tp_size / ep_size for this model and machine."""
    tp, ep = config.tp_size, config.ep_size
    world = world_size_of(tp, ep)
    if world % tp or world % ep:
        raise ValueError(
            f"tp_size {tp} and ep_size {ep}: the smaller must divide the larger (both parallelisms "
            f"run on the same {world} ranks)"
        )
    num_experts = getattr(hf_config, "num_experts", None) or getattr(hf_config, "num_local_experts", 0) or 0
    if ep > 1 and not num_experts:
        raise ValueError(
            f"ep_size {ep} needs a mixture-of-experts model; {hf_config.model_type!r} has no experts "
            "(use tp_size)"
        )
    heads, kv_heads = hf_config.num_attention_heads, hf_config.num_key_value_heads
    if heads % tp or kv_heads % tp:
        raise ValueError(
            f"tp_size {tp} must divide num_attention_heads {heads} and num_key_value_heads {kv_heads}"
        )
    if tp > 1 and not getattr(hf_config, "tie_word_embeddings", False) and hf_config.vocab_size % tp:
        raise ValueError(f"tp_size {tp} must divide vocab_size {hf_config.vocab_size} (lm_head is split)")
    dense = getattr(hf_config, "intermediate_size", None)
    if (
        dense
        and dense % tp
        and (
            not num_experts
            or getattr(hf_config, "mlp_only_layers", None)
            or (getattr(hf_config, "decoder_sparse_step", 1) or 1) > 1
        )
    ):
        raise ValueError(f"tp_size {tp} must divide intermediate_size {dense}")
    redundant = config.ep_num_redundant_experts
    if num_experts:
        if (num_experts + redundant) % ep:
            extra = f" + ep_num_redundant_experts {redundant}" if redundant else ""
            raise ValueError(f"ep_size {ep} must divide num_experts {num_experts}{extra}")
        moe_inter = getattr(hf_config, "moe_intermediate_size", None) or dense
        if moe_inter % (world // ep):
            raise ValueError(
                f"{world // ep} ranks share each expert (tp_size {tp}, ep_size {ep}), which must divide "
                f"moe_intermediate_size {moe_inter}"
            )
    if redundant > num_experts * (ep - 1):
        raise ValueError(f"ep_num_redundant_experts {redundant} exceeds one replica of each expert per rank")
    if config.ep_dispatch == "alltoall" and (ep == 1 or ep != world):
        raise ValueError(f"ep_dispatch='alltoall' needs ep_size = the number of ranks ({world}) > 1")
    if world > 1:
        if config.deterministic:
            raise ValueError("deterministic mode needs tp_size = ep_size = 1")
        if config.spec_method is not None:
            raise ValueError("speculative decoding is not supported with tp_size or ep_size > 1")
        if device.type == "cuda":
            count = torch.cuda.device_count()
            first = (
                device.index if device.index is not None else (torch.cuda.current_device() if count else 0)
            )
            if first + world > count:
                raise ValueError(
                    f"tp_size {tp} / ep_size {ep} need {world} CUDA devices from cuda:{first}, "
                    f"but only {count} are visible"
                )
        elif device.type != "cpu":
            raise ValueError(f"tp_size / ep_size > 1 runs on cuda or cpu, not {device.type}")


# -- groups ------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_store(port: int, rank: int, world: int, timeout_s: float) -> dist.Store:
    return dist.TCPStore(
        "127.0.0.1",
        port,
        world,
        is_master=rank == 0,
        timeout=datetime.timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )


def _backend(store: dist.Store, name: str, rank: int, size: int, backend: str) -> Any:
    prefix = dist.PrefixStore(name, store)
    timeout = datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timeout
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
        return dist.ProcessGroupGloo(prefix, rank, size, opts)
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = timeout
    return dist.ProcessGroupNCCL(prefix, rank, size, opts)


def init_groups(state: ParallelState, store: dist.Store, device: torch.device) -> ParallelState:
    """Connect this rank's groups (blocks until every rank of each group has joined)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    state.device = device if backend == "nccl" else torch.device("cpu")
    world, tp = state.world_size, state.tp_size
    state.world_group = _backend(store, "world", state.rank, world, backend)
    if tp == world:
        state.tp_group = state.world_group
    elif tp > 1:
        first = state.rank - state.tp_rank
        state.tp_group = _backend(store, f"tp{first}", state.tp_rank, tp, backend)
    state.ep_group = state.world_group
    return state


def shutdown_groups(state: ParallelState, abort: bool = False) -> None:
    """Drop the groups (on a daemon thread: a backend's destructor may wait on a blocked collective)."""
    groups = {id(g): g for g in (state.world_group, state.tp_group) if g is not None}
    state.world_group = state.tp_group = state.ep_group = None

    def drop() -> None:
        for g in groups.values():
            with contextlib.suppress(Exception):
                g.abort() if abort else g.shutdown()
        groups.clear()

    threading.Thread(target=drop, name="gyre-group-drop", daemon=True).start()


# -- collectives (no-ops on a single rank) ------------------------------------------------------------
def all_reduce(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Sum x over the group, in place."""
    if group is not None:
        group.allreduce([x]).wait()
    return x


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    return all_reduce(x, get_parallel_state().tp_group)


def tp_all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """[N, D / tp] on each TP rank -> [N, D], ranks' parts in order."""
    st = get_parallel_state()
    if st.tp_size == 1:
        return x
    out = torch.empty((st.tp_size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    if x.numel():  # every rank has the same rows
        st.tp_group._allgather_base(out, x.contiguous()).wait()
    return out.view(st.tp_size, *x.shape).movedim(0, -2).reshape(*x.shape[:-1], st.tp_size * x.shape[-1])


def all_gather_rows(x: torch.Tensor, counts: list[int], group: Any) -> torch.Tensor:
    """Each rank's x [counts[rank], ...] -> every rank's rows concatenated in rank order."""
    width = max(counts)
    buf = x.new_empty((width, *x.shape[1:]))
    buf[: x.shape[0]] = x
    out = x.new_empty((len(counts) * width, *x.shape[1:]))
    group._allgather_base(out, buf).wait()
    return torch.cat([out[r * width : r * width + n] for r, n in enumerate(counts)])


def all_to_all(x: torch.Tensor, send_counts: list[int], recv_counts: list[int], group: Any) -> torch.Tensor:
    """Rows [sum(send_counts), ...]: the first send_counts[0] go to rank 0, ... -> rows received, by rank."""
    out = x.new_empty((sum(recv_counts), *x.shape[1:]))
    group.alltoall_base(
        out, x.contiguous(), list(recv_counts), list(send_counts), dist.AllToAllOptions()
    ).wait()
    return out


def broadcast(x: torch.Tensor, group: Any, root: int = 0) -> Any:
    """Start broadcasting x from root (in place elsewhere); returns the work."""
    opts = dist.BroadcastOptions()
    opts.rootRank, opts.rootTensor = root, 0
    return group.broadcast([x], opts)


def min_over_ranks(value: int) -> int:
    """The smallest of every rank's value (e.g. KV pages that fit on every device)."""
    st = get_parallel_state()
    if st.world_group is None:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=st.device)
    opts = dist.AllreduceOptions()
    opts.reduceOp = dist.ReduceOp.MIN
    st.world_group.allreduce([t], opts).wait()
    return int(t.item())
