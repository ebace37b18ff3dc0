"""The trainer -> engines process group: rank 0 is the trainer, engines are ranks 1..world_size-1.

It is built straight from a TCPStore (the trainer hosts it) and a PrefixStore, as a bare gloo or NCCL
backend object: it is not torch.distributed's default group, is never registered there, and cannot
collide with the trainer's or the engine's own groups (FSDP, tensor parallel).

Every wait has a deadline. A collective that does not finish in time (a dead or silent peer) aborts the
group and raises WeightSyncTimeout; an aborted group is never used again (re-initialise instead).
NOTE: collectives cannot be relied on to notice an abort (a gloo or NCCL rank blocked on a peer that
gave up just waits), so the store is the alarm: a rank that aborts sets ABORT_KEY, and every wait polls
it, so the others stop within POLL_S. A trainer that dies takes the store with it, which waiting engines
see the same way.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

ABORT_KEY = "gyre_abort"
POLL_S = 0.05


class WeightSyncError(RuntimeError):
    """A weight transfer failed; the engine(s) keep the weights they had."""


class WeightSyncTimeout(WeightSyncError):
    pass


def _is_loopback(addr: str) -> bool:
    if addr == "localhost":
        return True
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


def _gloo_device(master_addr: str) -> Any:
    iface = os.environ.get("GLOO_SOCKET_IFNAME")
    if iface:
        return dist.ProcessGroupGloo.create_device(interface=iface.split(",")[0])
    if _is_loopback(master_addr):
        return dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")
    return dist.ProcessGroupGloo.create_default_device()


class WeightGroup:
    def __init__(
        self,
        master_addr: str,
        master_port: int,
        rank: int,
        world_size: int,
        backend: str,
        group_name: str,
        device: torch.device,
        timeout_s: float,
        store: dist.Store | None = None,
    ) -> None:
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"weight group backend must be gloo or nccl, got {backend!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of {world_size}")
        self.rank, self.world_size, self.backend = rank, world_size, backend
        self.timeout_s = float(timeout_s)
        self.device = torch.device("cpu") if backend == "gloo" else torch.device(device)
        if backend == "nccl" and self.device.type != "cuda":
            raise ValueError(f"the nccl backend needs a CUDA device, got {self.device}")
        timeout = datetime.timedelta(seconds=self.timeout_s)
        if store is None:
            store = dist.TCPStore(master_addr, master_port, world_size, is_master=False, timeout=timeout)
        self._store = store
        prefix = dist.PrefixStore(group_name, store)
        self._control = dist.PrefixStore("control", prefix)
        self.aborted = False
        if backend == "gloo":
            opts = dist.ProcessGroupGloo._Options()
            opts._timeout = timeout
            opts._devices = [_gloo_device(master_addr)]
            # the rendezvous: blocks until every rank has joined (or the timeout)
            self.pg = dist.ProcessGroupGloo(prefix, rank, world_size, opts)
        else:
            opts = dist.ProcessGroupNCCL.Options()
            # our own deadline aborts a stuck collective; NCCL's watchdog must not kill the process first
            opts._timeout = datetime.timedelta(seconds=max(10 * self.timeout_s, 600))
            opts.is_high_priority_stream = False
            with _env("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0"):  # read once, by this group's constructor
                self.pg = dist.ProcessGroupNCCL(prefix, rank, world_size, opts)
            self.wait([self.broadcast(torch.zeros(1, device=self.device))], what="connecting the NCCL group")

    # -- collectives --------------------------------------------------------------------------------
    def broadcast(self, tensor: torch.Tensor) -> Any:
        """Start broadcasting tensor from rank 0 (in place on the other ranks); returns the work."""
        if self.aborted:
            raise WeightSyncError("the weight group was aborted after an error; re-initialise it")
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        opts.rootTensor = 0
        return self.pg.broadcast([tensor], opts)

    def wait(self, works: Sequence[Any], what: str, cancel: Callable[[], str | None] | None = None) -> None:
        """Wait for works in order, each within timeout_s. On a timeout, a transport error, another rank's
        abort or cancel() returning a reason, the group is aborted and WeightSyncError raised."""
        for work in works:
            deadline = time.monotonic() + self.timeout_s
            next_poll = time.monotonic() + POLL_S
            nap = (
                5e-5  # polling backs off to 0.5 ms: a short bucket is seen at once, a long wait costs little
            )
            try:
                while not work.is_completed():
                    now = time.monotonic()
                    reason = cancel() if cancel is not None else None
                    if reason is None and now >= next_poll:
                        reason, next_poll = self._peer_abort(), now + POLL_S
                    if reason is not None:
                        self.abort(reason)
                        raise WeightSyncError(f"weight group: {what} stopped: {reason}")
                    if now > deadline:
                        self.abort(f"rank {self.rank} timed out")
                        raise WeightSyncTimeout(
                            f"weight group: {what} did not complete within {self.timeout_s:g} s "
                            f"(is the peer alive?); the group is aborted, re-initialise it"
                        )
                    time.sleep(nap)
                    nap = min(2 * nap, 5e-4)
                work.wait()  # raises the transport's error, if any
            except WeightSyncError:
                raise
            except Exception as e:
                self.abort(f"rank {self.rank}: {e}")
                if "timed out" in str(e).lower():  # the transport's own deadline (the same timeout_s)
                    raise WeightSyncTimeout(
                        f"weight group: {what} did not complete within {self.timeout_s:g} s "
                        f"(is the peer alive?): {e}"
                    ) from e
                raise WeightSyncError(f"weight group: {what} failed: {e}") from e

    def _peer_abort(self) -> str | None:
        try:
            if self._control.check([ABORT_KEY]):
                return f"another rank aborted the group ({self._control.get(ABORT_KEY).decode()})"
        except Exception as e:  # the store lives in the trainer: it is gone
            return f"the trainer's store is unreachable ({type(e).__name__}: {e})"
        return None

    def vote(self, ok: bool, what: str, cancel: Callable[[], str | None] | None = None) -> bool:
        """True on every rank iff every rank says ok (an all-reduce MIN): the commit step of an update."""
        t = torch.tensor([int(ok)], dtype=torch.int64, device=self.device)
        if self.aborted:
            raise WeightSyncError("the weight group was aborted after an error; re-initialise it")
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MIN
        self.wait([self.pg.allreduce([t], opts)], what, cancel)
        return bool(t.item())

    # -- lifetime -----------------------------------------------------------------------------------
    def abort(self, reason: str = "aborted") -> None:
        """Give up on the group and tell every other rank (through the store)."""
        if self.aborted:
            return
        self.aborted = True
        with contextlib.suppress(Exception):
            self._control.set(ABORT_KEY, reason[:500])
        if self.backend == "nccl":  # unblocks kernels stuck on a dead peer (gloo's abort would block)
            with contextlib.suppress(Exception):
                self.pg.abort()
        self._drop_pg()

    def close(self) -> None:
        if not self.aborted:  # nothing is blocked on a healthy group: release it here and now
            # NOTE: NCCL's shutdown() waits for every rank to shut down too; abort() is local
            with contextlib.suppress(Exception):
                self.pg.abort() if self.backend == "nccl" else self.pg.shutdown()
            self.aborted = True
            self.pg = None
        self._store = self._control = None

    def _drop_pg(self) -> None:
        """Release the backend on a daemon thread: its destructor joins worker threads that may sit in a
        blocked collective until the transport's own timeout."""
        holder, self.pg = [self.pg], None  # NOTE: no other reference may remain in this thread
        threading.Thread(target=holder.clear, name="gyre-group-drop", daemon=True).start()


@contextlib.contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old
