"""Worker processes of a parallel engine (ranks 1..world-1; rank 0 is the engine process).

Each worker builds its own ModelRunner (its TP shard, its experts, a KV pool of its heads) and then does
what rank 0 tells it, in order, over a pipe; tensors move over the process group (gloo on CPUs, NCCL
on GPUs), so that every rank issues the same collectives in the same order:

  ("step", host_tensors, capture)  run the forward of one step (ModelRunner.prepare's dict)
  ("tokens", n)                    rank 0 broadcasts the step's n sampled tokens: the next step's
                                   pending tokens are filled in from them on the device
  ("weights", metas)               new weights: dense tensors broadcast, experts sent only to the ranks
                                   holding them (their own pass); each rank's loaders keep its shard
  ("placement", plans)             EPLB: move experts rank to rank (gyre.engine.eplb)
  ("memory", what, tags)           release_memory / resume_memory
  ("stop",)

Replies (to weights, placement, memory, and "ready" at start): ("ok", None) or ("error", traceback).
A worker that fails sends ("error", ...) and exits; rank 0's monitor thread sees the exit, and every
later step raises WorkerError naming the rank (gloo fails a collective with a dead peer at once; a
NCCL group is aborted by the monitor). A worker exits when rank 0's process is gone.

Workers are forked by a zygote (_Zygote): a clean interpreter that imported the engine once, so
they start in milliseconds, on CPUs (torch then runs one thread in each) and GPUs (device = rank).
"""

from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import multiprocessing.connection
import os
import pickle
import signal
import threading
import time
import traceback
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from gyre.engine.layers.moe import moe_layers
from gyre.engine.parallel import (
    ParallelState,
    broadcast,
    check_config,
    free_port,
    init_groups,
    make_store,
    rank_state,
    set_parallel_state,
    shutdown_groups,
    world_size_of,
)
from gyre.engine.shards import bucket_bytes, hf_name, pack, unpack, unpack_plan
from gyre.engine.zygote import WorkerProcess

STORE_TIMEOUT_S = 120.0  # workers connecting at start
READY_TIMEOUT_S = 1800.0  # a worker loading a large checkpoint


class WorkerError(RuntimeError):
    """A worker process died or failed; the engine cannot run steps any more."""


def _worker_device(device: torch.device, rank: int) -> str:
    if device.type != "cuda":
        return "cpu"
    first = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{first + rank}"


def _state_for(rank: int, config: Any) -> ParallelState:
    return rank_state(
        rank, config.tp_size, config.ep_size, config.ep_num_redundant_experts, config.ep_dispatch
    )


# -- rank 0 -------------------------------------------------------------------------------------------
class WorkerGroup:
    """Rank 0's handle on the workers: starts them, joins the process groups, sends them work."""

    def __init__(self, config: Any, hf_config: Any, device: torch.device) -> None:
        check_config(config, hf_config, device)
        if config.ep_dispatch == "alltoall":
            config.cuda_graph = False  # NOTE: its per-layer host sync (split sizes) cannot be captured
        world = world_size_of(config.tp_size, config.ep_size)
        self.state = _state_for(0, config)
        self.error: str | None = None
        self._stopping = False
        self._lock = threading.Lock()
        self._names: dict[int, str] | None = None
        port = free_port()
        self.procs: list[WorkerProcess] = []
        self.conns: list[multiprocessing.connection.Connection] = []
        try:
            for rank in range(1, world):
                cfg = dataclasses.replace(config, device=_worker_device(device, rank))
                self.procs.append(WorkerProcess((rank, cfg, port)))
                self.conns.append(self.procs[-1].conn)
            store = make_store(port, 0, world, STORE_TIMEOUT_S)
            self._await(
                lambda: store.check([f"up{r}" for r in range(1, world)]), STORE_TIMEOUT_S, "to connect"
            )
            init_groups(self.state, store, device)
        except BaseException:
            self.stop()
            raise
        self._store = store
        for rank, proc in enumerate(self.procs, 1):
            threading.Thread(
                target=self._watch, args=(rank, proc), name=f"gyre-watch-{rank}", daemon=True
            ).start()

    # -- lifetime ---------------------------------------------------------------------------------------
    def wait_ready(self) -> None:
        for rank, conn in enumerate(self.conns, 1):
            self._reply(rank, conn, READY_TIMEOUT_S, "to build its model")

    def abort_start(self) -> WorkerError | None:
        """Rank 0's start failed: stop the workers; the error of a worker that failed first, if any."""
        deadline = time.monotonic() + 2.0
        while self.error is None and time.monotonic() < deadline:
            try:
                self.check()
            except WorkerError:
                break
            time.sleep(0.05)
        self.stop()
        return WorkerError(self.error) if self.error is not None else None

    def _watch(self, rank: int, proc: WorkerProcess) -> None:
        proc.wait()
        if self._stopping:
            return
        self._set_error(rank, proc)
        if self.state.device is not None and self.state.device.type == "cuda":
            shutdown_groups(self.state, abort=True)  # unblocks NCCL kernels waiting on the dead rank

    def _set_error(self, rank: int, proc: WorkerProcess) -> None:
        why = ""
        conn = self.conns[rank - 1]
        try:
            while conn.poll(0):
                kind, text = conn.recv()
                if kind == "error":
                    why = f": {text.strip().splitlines()[-1]}"
        except (EOFError, OSError):
            pass
        if self.error is None:
            self.error = f"worker rank {rank} (pid {proc.pid}) died with exit code {proc.exitcode}{why}"

    def check(self) -> None:
        if self.error is None:
            for rank, proc in enumerate(self.procs, 1):
                if proc.exitcode is not None and not self._stopping:
                    self._set_error(rank, proc)
                    break
        if self.error is not None:
            raise WorkerError(self.error)

    @contextlib.contextmanager
    def failures(self) -> Iterator[None]:
        """A collective that fails because a worker died raises WorkerError naming it."""
        try:
            yield
        except WorkerError:
            raise
        except Exception as e:
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                try:
                    self.check()
                except WorkerError as err:
                    raise err from e
                time.sleep(0.02)
            raise

    def _await(self, done, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            self.check()
            if time.monotonic() > deadline:
                raise WorkerError(f"workers did not manage {what} within {timeout:g} s")
            time.sleep(0.01)

    def _reply(self, rank: int, conn, timeout: float, what: str) -> None:
        self._await(lambda: conn.poll(0), timeout, what)
        try:
            kind, text = conn.recv()
        except (EOFError, OSError):
            self.check()
            raise WorkerError(f"worker rank {rank} closed its pipe") from None
        if kind != "ok":
            raise WorkerError(f"worker rank {rank} failed {what}: {text}")

    def _send(self, msg: tuple) -> None:
        self.check()
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            for conn in self.conns:
                conn.send_bytes(data)
        except OSError as e:
            time.sleep(0.1)
            self.check()
            raise WorkerError(f"a worker's pipe broke: {e}") from e

    def _call(self, msg: tuple, timeout: float, what: str, between=None) -> None:
        """Send msg to every worker, run between() (rank 0's part of the collective work), await replies."""
        with self._lock:
            self._send(msg)
            if between is not None:
                with self.failures():
                    between()
            for rank, conn in enumerate(self.conns, 1):
                self._reply(rank, conn, timeout, what)

    def stop(self) -> None:
        self._stopping = True
        for conn in self.conns:
            try:
                conn.send_bytes(pickle.dumps(("stop",)))
            except OSError:
                pass
        deadline = time.monotonic() + 10.0
        for proc in self.procs:
            proc.join(max(deadline - time.monotonic(), 0.1))
            if proc.exitcode is None:
                proc.kill()
                proc.join(5.0)
        for conn in self.conns:
            conn.close()
        shutdown_groups(self.state)

    # -- steps ------------------------------------------------------------------------------------------
    def send_step(self, h: dict[str, Any], capture: bool) -> None:
        self._send(("step", _to_wire(h), capture))

    def share_tokens(self, tokens: torch.Tensor) -> None:
        """Broadcast a step's sampled tokens [n] int64: the workers' next step may read them."""
        self._send(("tokens", tokens.shape[0]))
        with self.failures():
            broadcast(tokens, self.state.world_group).wait()

    # -- weights ----------------------------------------------------------------------------------------
    def push_weights(
        self, model: nn.Module, items: list[tuple[nn.Parameter, Any, torch.Tensor]], timeout: float
    ) -> None:
        """Send validated (param, shard_id, tensor) to the workers: each keeps its shard / its experts."""
        if self._names is None:
            self._names = {id(p): n for n, p in model.named_parameters()}
        experts = {id(p): m for m in moe_layers(model) for p in (m.w13, m.w2)}
        metas, dense, per_rank = [], [], {r: [] for r in range(1, len(self.procs) + 1)}
        for param, shard, tensor in items:
            moe = experts.get(id(param))
            holders = None if moe is None else [r for r in moe.ranks_holding(shard[1]) if r != 0]
            metas.append(
                (hf_name(self._names[id(param)], shard), tuple(tensor.shape), str(tensor.dtype), holders)
            )
            if holders is None:
                dense.append(tensor)
            for r in holders or ():
                per_rank[r].append(tensor)

        def send() -> None:
            group, dev = self.state.world_group, self.state.device
            for buf in pack(dense, dev):
                broadcast(buf, group).wait()
            for r, tensors in per_rank.items():  # experts: their own pass, only to the ranks holding them
                for buf in pack(tensors, dev):
                    group.send([buf], r, 0).wait()

        self._call(("weights", metas), timeout, "a weight update", send)

    def move_experts(self, model: nn.Module, plans: list[list[int]], timeout: float) -> None:
        from gyre.engine.eplb import apply_placement

        self._call(
            ("placement", plans), timeout, "an expert rebalance", lambda: apply_placement(model, plans)
        )

    def memory(self, what: str, tags: set[str], timeout: float, between=None) -> None:
        self._call(("memory", what, sorted(tags)), timeout, f"{what}_memory", between)


def _to_wire(h: dict[str, Any]) -> dict[str, Any]:
    return {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in h.items()}


def _from_wire(h: dict[str, Any]) -> dict[str, Any]:
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in h.items()}


# -- a worker ------------------------------------------------------------------------------------------
def _watch_parent(parent_pid: int) -> None:
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)  # the zygote is gone, so is rank 0: nothing will ever come

    threading.Thread(target=watch, name="gyre-parent-watch", daemon=True).start()


def worker_main(rank: int, config: Any, port: int, conn) -> None:
    """A worker (forked by the zygote): connect, build this rank's ModelRunner, serve rank 0."""
    _watch_parent(os.getppid())
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>` prints a stuck worker's stacks
    try:
        from gyre.engine.model_runner import ModelRunner, resolve_device

        device = resolve_device(config.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:
            torch.set_num_threads(1)  # ranks share the cores; also keeps OpenMP safe after the fork
        state = _state_for(rank, config)
        store = make_store(port, rank, state.world_size, STORE_TIMEOUT_S)
        store.set(f"up{rank}", "1")
        init_groups(state, store, device)
        set_parallel_state(state)
        runner = ModelRunner(config, rank=rank)
        conn.send(("ok", None))
        _Worker(runner, state, conn).serve()
    except BaseException:
        try:
            conn.send(("error", traceback.format_exc()))
        except OSError:
            pass
        os._exit(1)
    os._exit(0)


class _Worker:
    def __init__(self, runner: Any, state: ParallelState, conn) -> None:
        self.runner, self.state, self.conn = runner, state, conn
        self.prev: Any = None  # the last step's sampled tokens, as a StepHandle look-alike
        self.host_weights: dict[str, torch.Tensor] = {}

    def serve(self) -> None:
        while True:
            try:
                msg = pickle.loads(self.conn.recv_bytes())
            except (EOFError, OSError):
                return
            kind = msg[0]
            if kind == "stop":
                shutdown_groups(self.state)
                return
            if kind == "step":
                self.runner.forward_prepared(_from_wire(msg[1]), msg[2], self.prev)
            elif kind == "tokens":
                tokens = torch.empty(msg[1], dtype=torch.int64, device=self.state.device)
                broadcast(tokens, self.state.world_group).wait()
                self.prev = SimpleNamespace(device_sample=SimpleNamespace(tokens=tokens))
            else:
                {"weights": self._weights, "placement": self._placement, "memory": self._memory}[kind](
                    *msg[1:]
                )
                self.conn.send(("ok", None))

    @torch.no_grad()
    def _weights(self, metas: list[tuple]) -> None:
        st, model = self.state, self.runner.model
        dense = unpack_plan([m for m in metas if m[3] is None])
        mine = unpack_plan([m for m in metas if m[3] is not None and st.rank in m[3]])
        for bucket, from_root in [(b, True) for b in dense] + [(b, False) for b in mine]:
            buf = torch.empty(bucket_bytes(bucket), dtype=torch.uint8, device=st.device)
            (broadcast(buf, st.world_group) if from_root else st.world_group.recv([buf], 0, 0)).wait()
            for name, tensor in unpack(buf, bucket):
                param, shard = model.resolve(name)
                param.weight_loader(param, tensor.to(param.device), shard)

    def _placement(self, plans: list[list[int]]) -> None:
        from gyre.engine.eplb import apply_placement

        apply_placement(self.runner.model, plans)

    def _memory(self, what: str, tags: list[str]) -> None:
        runner = self.runner
        on_device = runner.device.type != "cpu"
        if what == "release":
            if "kv_cache" in tags:
                runner.pool.release()
            if "weights" in tags and not self.host_weights:
                for name, p in runner.model.named_parameters():
                    self.host_weights[name] = p.data.to("cpu") if on_device else p.data
                    p.data = torch.empty(0, dtype=p.dtype, device=p.device)
            runner.on_memory_released()
        else:
            if "weights" in tags and self.host_weights:
                for name, p in runner.model.named_parameters():
                    p.data = self.host_weights[name].to(runner.device)
                self.host_weights = {}
            if "kv_cache" in tags:
                runner.pool.restore()
            runner.on_memory_resumed()
