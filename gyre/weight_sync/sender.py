"""WeightSender: the trainer side of a weight update, to one or many engines.

    sender = WeightSender([engine_a, engine_b], mode="group")     # gyre.Engine objects or EngineHandles
    sender.push(adapter.named_tensors(), version=step)            # HF names, in the engines' dtype

One push is the whole protocol, on every engine: pause(pause_mode) -> transfer -> the engine validates
everything, writes in place and sets weight_version -> resume(). resume() runs whatever happened, so an
error never leaves an engine paused. Modes:
  group    control calls (one thread per engine) overlap a broadcast over a dedicated NCCL/gloo group:
           flattened buckets, the next one packed while the current one is in flight (stream.py); one
           broadcast reaches every engine, and a closing vote makes the update all-or-nothing. A list
           of tensors also sends its names/dtypes/shapes on the control path (checked before any byte
           moves); a generator is streamed, bucket by bucket, never all alive at once.
  tensors  engine.update_weights(named_tensors): in-process engines get the tensors themselves
  disk     a safetensors checkpoint under disk_dir (written shard by shard), then update_weights_from_disk
  ipc      CUDA IPC handles of the trainer's GPU tensors (colocated engines on the same GPU; no copy)
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from gyre.weight_sync.buckets import dtype_name
from gyre.weight_sync.disk import write_checkpoint
from gyre.weight_sync.group import WeightGroup, WeightSyncError
from gyre.weight_sync.handles import EngineHandle, as_handle
from gyre.weight_sync.ipc import to_ipc
from gyre.weight_sync.stream import GroupStream

MODES = ("group", "tensors", "disk", "ipc")
_PAUSE_MODES = ("in_place", "abort", "retract")
NamedTensors = Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor]


class WeightSender:
    def __init__(
        self,
        engines: Any | Sequence[Any],
        mode: str = "group",
        *,
        backend: str | None = None,
        bucket_bytes: int = 512 << 20,
        device: str | torch.device | None = None,
        master_addr: str = "127.0.0.1",
        master_port: int = 0,
        group_name: str = "gyre-weights",
        timeout_s: float = 60.0,
        disk_dir: str | os.PathLike | None = None,
        max_shard_bytes: int = 5 << 30,
    ) -> None:
        """engines: gyre.Engine objects (this process) or EngineHandles (EngineProcess, Ray, HTTP).
        backend: "nccl" (default with CUDA) or "gloo"; device: the trainer's device in the group.
        master_addr: an address of this host that every engine can reach (the trainer hosts the store)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        engines = list(engines) if isinstance(engines, (list, tuple)) else [engines]
        if not engines:
            raise ValueError("WeightSender needs at least one engine")
        if bucket_bytes < 1 or max_shard_bytes < 1 or timeout_s <= 0:
            raise ValueError("bucket_bytes, max_shard_bytes and timeout_s must be positive")
        if mode == "disk" and disk_dir is None:
            raise ValueError("mode='disk' needs disk_dir (a directory every engine can read)")
        self.handles: list[EngineHandle] = [as_handle(e) for e in engines]
        self.mode = mode
        self.backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if self.backend not in ("nccl", "gloo"):
            raise ValueError(f"backend must be nccl or gloo, got {self.backend!r}")
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else "cpu"
        self.device = torch.device(device)
        self.bucket_bytes = int(bucket_bytes)
        self.master_addr, self.master_port, self.group_name = master_addr, master_port, group_name
        self.timeout_s = float(timeout_s)
        self.disk_dir = Path(disk_dir) if disk_dir is not None else None
        self.max_shard_bytes = max_shard_bytes
        self.group: WeightGroup | None = None
        self.last_timings: dict[str, float] = {}
        self._pool = ThreadPoolExecutor(
            max_workers=max(4, 2 * len(self.handles)), thread_name_prefix="gyre-send"
        )

    # -- the protocol -------------------------------------------------------------------------------
    def push(
        self, named_tensors: NamedTensors, version: int | None = None, pause_mode: str = "in_place"
    ) -> int:
        """Send the tensors to every engine; returns the new weight version (default: the highest
        engine version + 1). Raises WeightSyncError naming each engine that failed and why."""
        if pause_mode not in _PAUSE_MODES:
            raise ValueError(f"pause_mode must be one of {_PAUSE_MODES}, got {pause_mode!r}")
        if isinstance(named_tensors, Mapping):
            named_tensors = list(named_tensors.items())
        if self.mode in ("tensors", "ipc") or isinstance(named_tensors, tuple):
            named_tensors = list(named_tensors)  # these modes hand every tensor over at once
        if isinstance(named_tensors, list) and not named_tensors:
            raise ValueError("push needs at least one tensor")
        if version is None:
            version = max(self._on_all(lambda h: h.weight_version(), "reading the weight version")) + 1
        transfer = {
            "group": self._push_group,
            "tensors": self._push_tensors,
            "disk": self._push_disk,
            "ipc": self._push_ipc,
        }[self.mode]
        t0 = time.perf_counter()
        self._on_all(lambda h: h.pause(pause_mode), "pausing", undo=lambda h: h.resume())
        t1 = time.perf_counter()
        try:
            transfer(named_tensors, version)
        except BaseException:
            with contextlib.suppress(Exception):  # the transfer's error is the one to report
                self._on_all(lambda h: h.resume(), "resuming")
            raise
        t2 = time.perf_counter()
        self._on_all(lambda h: h.resume(), "resuming")
        t3 = time.perf_counter()
        self.last_timings = {
            "pause_s": t1 - t0,
            "transfer_s": t2 - t1,
            "resume_s": t3 - t2,
            "total_s": t3 - t0,
        }
        return version

    def _on_all(
        self, fn: Callable[[EngineHandle], Any], what: str, undo: Callable[[EngineHandle], Any] | None = None
    ) -> list[Any]:
        """fn on every engine in parallel; on any failure, undo on those that succeeded, then raise."""
        futures = [self._pool.submit(fn, h) for h in self.handles]
        errors = _errors(futures)
        if errors:
            if undo is not None:
                ok = [h for h, f in zip(self.handles, futures) if f.exception() is None]
                for f in [self._pool.submit(undo, h) for h in ok]:
                    with contextlib.suppress(Exception):
                        f.result()
            raise _sync_error(what, errors, len(self.handles))
        return [f.result() for f in futures]

    # -- modes --------------------------------------------------------------------------------------
    def _push_tensors(self, named: list[tuple[str, torch.Tensor]], version: int) -> None:
        self._on_all(lambda h: h.update_weights(named, version), f"updating to version {version}")

    def _push_ipc(self, named: list[tuple[str, torch.Tensor]], version: int) -> None:
        payload = to_ipc(named)
        torch.cuda.synchronize()
        self._on_all(
            lambda h: (
                h.update_weights(named, version)
                if h.is_local
                else h.update_weights_from_ipc(payload, version)
            ),
            f"updating to version {version} over IPC",
        )

    def _push_disk(self, named: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        path = write_checkpoint(named, self.disk_dir / f"weights-v{version}", self.max_shard_bytes)
        self._on_all(lambda h: h.update_weights_from_disk(str(path), version), f"loading {path}")
        for old in self.disk_dir.glob("weights-v*"):  # keep only the checkpoint every engine now has
            if old != path and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)

    def _push_group(self, named: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        if self.group is None or self.group.aborted:
            self.init_group()
        names, dtypes, shapes = [], [], []  # a generator is described in-band only
        if isinstance(named, list):
            names = [n for n, _ in named]
            dtypes = [dtype_name(t.dtype) for _, t in named]
            shapes = [list(t.shape) for _, t in named]
        futures = [
            self._pool.submit(h.update_weights_from_group, names, dtypes, shapes, version)
            for h in self.handles
        ]

        def cancel() -> str | None:
            # NOTE: an engine that rejects the update (ValueError) still receives it to the end and votes
            # no; any other early failure means it never will, so stop now rather than at the timeout
            for i, f in enumerate(futures):
                if f.done() and f.exception() is not None and not isinstance(f.exception(), ValueError):
                    return f"engine {i} failed: {type(f.exception()).__name__}: {f.exception()}"
            return None

        stream = GroupStream(self.group, version, self.bucket_bytes, cancel)
        trainer_error: BaseException | None = None
        try:
            for name, t in named:
                stream.add(name, t)
            stream.finish()
        except BaseException as e:  # noqa: BLE001 - also the trainer's own generator failing
            trainer_error = e
            self.group.abort(f"the trainer stopped: {type(e).__name__}: {e}")  # engines stop waiting now
            self.close_group()
        errors = _errors(futures)
        if trainer_error is not None and not isinstance(trainer_error, WeightSyncError):
            raise trainer_error  # the trainer's own failure; the engines kept their weights
        if trainer_error is not None and not errors:
            errors = [(-1, trainer_error)]
        if errors:
            raise _sync_error(f"updating to version {version} over the group", errors, len(self.handles))

    # -- the group ----------------------------------------------------------------------------------
    def init_group(self) -> None:
        """(Re)build the trainer -> engines group: the trainer is rank 0 and hosts the store."""
        self.close_group()
        world = 1 + len(self.handles)
        store = dist.TCPStore(
            self.master_addr,
            self.master_port,
            world,
            is_master=True,
            timeout=datetime.timedelta(seconds=self.timeout_s),
            wait_for_workers=False,
        )
        port = store.port
        futures = [
            self._pool.submit(
                h.init_weight_group, self.master_addr, port, 1 + i, world, self.backend, self.group_name
            )
            for i, h in enumerate(self.handles)
        ]
        try:
            group = WeightGroup(
                self.master_addr,
                port,
                0,
                world,
                self.backend,
                self.group_name,
                self.device,
                self.timeout_s,
                store=store,
            )
        except Exception as e:
            errors = _errors(futures) or [(-1, e)]
            raise _sync_error("initialising the weight group", errors, len(self.handles)) from e
        errors = _errors(futures)
        if errors:
            group.close()
            raise _sync_error("initialising the weight group", errors, len(self.handles))
        self.group = group

    def broadcast_raw(self, sizes: Sequence[int]) -> float:
        """Benchmark baseline: plain broadcasts of these sizes (engines call GroupReceiver.receive_raw);
        returns the seconds from the first send to the last completion."""
        g = self.group
        bufs = [torch.empty(n, dtype=torch.uint8, device=g.device) for n in sizes]
        g.vote(True, "a barrier")
        if g.device.type == "cuda":
            torch.cuda.synchronize(g.device)
        t0 = time.perf_counter()
        g.wait([g.broadcast(b) for b in bufs], "a raw broadcast")
        if g.device.type == "cuda":
            torch.cuda.synchronize(g.device)
        return time.perf_counter() - t0

    def close_group(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None

    def close(self) -> None:
        self.close_group()
        self._pool.shutdown(wait=False)

    def __enter__(self) -> WeightSender:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _errors(futures: Sequence[Future]) -> list[tuple[int, BaseException]]:
    out = []
    for i, f in enumerate(futures):
        try:
            f.result()
        except BaseException as e:  # noqa: BLE001 - reported, per engine
            out.append((i, e))
    return out


def _sync_error(what: str, errors: list[tuple[int, BaseException]], num_engines: int) -> WeightSyncError:
    lines = "; ".join(f"{'trainer' if i < 0 else f'engine {i}'}: {type(e).__name__}: {e}" for i, e in errors)
    n = sum(i >= 0 for i, _ in errors)
    err = WeightSyncError(f"weight sync failed while {what} ({n}/{num_engines} engines): {lines}")
    err.errors = errors  # type: ignore[attr-defined]
    return err
