"""EngineProcess: a gyre.Engine in a child process, driven over a pipe.

It is the simplest remote engine handle: colocated CUDA IPC, multi-process tests and benchmarks use it;
Ray actors and HTTP servers follow the same pattern. Calls run concurrently in the child (one thread
each), so a weight update can arrive while a generate() is in flight.

NOTE: arguments travel through multiprocessing's pickler, where torch moves CPU tensors into shared
memory and sends CUDA tensors as IPC handles: mode="tensors" works across the process boundary too.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import pickle
import threading
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch.multiprocessing as mp

from gyre.weight_sync.handles import EngineHandle, NamedTensors


class EngineProcessError(RuntimeError):
    pass


_live: weakref.WeakSet = weakref.WeakSet()


@atexit.register  # before multiprocessing's own exit hook, which joins children (atexit runs LIFO)
def _close_all() -> None:
    for proc in list(_live):
        proc.close(timeout=10)


class EngineProcess(EngineHandle):
    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        env: dict[str, str] | None = None,
        start_method: str = "forkserver",
        start_timeout_s: float = 600.0,
        **engine_kwargs: Any,
    ) -> None:
        """env: variables set in the child before the engine is built (CUDA_VISIBLE_DEVICES, ...).
        start_method "forkserver" (default) imports gyre once in a clean server process and forks each
        engine from it (fast starts, no inherited threads or CUDA state); "spawn" starts from scratch."""
        ctx = mp.get_context(start_method)
        if start_method == "forkserver":
            ctx.set_forkserver_preload(["gyre.weight_sync._preload"])
        self._conn, child = ctx.Pipe()
        self._pending: dict[int, Future] = {0: Future()}
        self._ids = itertools.count(1)
        self._send_lock = threading.Lock()
        self._closed = False
        self._exit_error: EngineProcessError | None = None
        self.process = ctx.Process(
            target=_serve,
            args=(child, str(model_path), engine_kwargs, env or {}),
            daemon=False,  # a parallel engine starts worker processes of its own
            name="gyre-engine",
        )
        self.process.start()
        _live.add(self)
        child.close()
        self._reader = threading.Thread(target=self._read, name="gyre-engine-reader", daemon=True)
        self._reader.start()
        try:
            self._pending[0].result(start_timeout_s)
        except BaseException:
            self.close()
            raise

    # -- the pipe -----------------------------------------------------------------------------------
    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run engine.<method>(*args, **kwargs) in the child and return its result (or raise its error)."""
        return self.submit(method, *args, **kwargs).result()

    def submit(self, method: str, *args: Any, **kwargs: Any) -> Future:
        if self._closed:
            raise EngineProcessError("the engine process is closed")
        fut: Future = Future()
        with self._send_lock:
            if self._exit_error is not None:
                raise self._exit_error
            cid = next(self._ids)
            self._pending[cid] = fut
            try:
                self._conn.send((cid, method, args, kwargs))
            except OSError as e:
                self._pending.pop(cid, None)
                raise EngineProcessError(f"the engine process is gone ({e})") from e
        return fut

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(engine, *args) in the child; fn must be importable there (a module-level function)."""
        return self.call("__run__", fn, *args)

    def _read(self) -> None:
        while True:
            try:
                cid, ok, value = self._conn.recv()
            except (EOFError, OSError):
                break
            fut = self._pending.pop(cid, None)
            if fut is not None:
                fut.set_result(value) if ok else fut.set_exception(value)
        self.process.join(timeout=5)
        with self._send_lock:  # no call is added after this
            self._exit_error = EngineProcessError(f"the engine process exited (code {self.process.exitcode})")
            pending, self._pending = list(self._pending.values()), {}
        for fut in pending:
            if not fut.done():
                fut.set_exception(self._exit_error)

    # -- EngineHandle -------------------------------------------------------------------------------
    def weight_version(self) -> int:
        return self.call("__getattr__", "weight_version")

    def pause(self, mode: str = "in_place") -> None:
        self.call("pause", mode)

    def resume(self) -> None:
        self.call("resume")

    def update_weights(self, named_tensors: NamedTensors, version: int | None = None) -> int:
        return self.call("update_weights", list(named_tensors), version)

    def update_weights_from_disk(self, path: str, version: int | None = None) -> int:
        return self.call("update_weights_from_disk", str(path), version)

    def update_weights_from_ipc(self, payload: list[tuple[str, Any]], version: int | None = None) -> int:
        return self.call("__ipc__", payload, version)

    def init_weight_group(
        self,
        master_addr: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        backend: str,
        group_name: str,
    ) -> None:
        self.call("init_weight_group", master_addr, master_port, rank_offset, world_size, backend, group_name)

    def update_weights_from_group(
        self,
        names: Sequence[str],
        dtypes: Sequence[str],
        shapes: Sequence[Sequence[int]],
        version: int | None = None,
    ) -> int:
        return self.call(
            "update_weights_from_group", list(names), list(dtypes), [list(s) for s in shapes], version
        )

    def generate(self, prompts: Any, sampling: Any = None) -> Any:
        return self.call("generate", prompts, sampling)

    def close(self, timeout: float = 30.0) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception), self._send_lock:
            self._conn.send(None)
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self._conn.close()

    def kill(self) -> None:
        """Kill the child at once (tests of a dying engine)."""
        self._closed = True
        self.process.kill()
        self.process.join(5)

    def __enter__(self) -> EngineProcess:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _picklable(e: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return EngineProcessError(f"{type(e).__name__}: {e}")


def _serve(conn: Any, model_path: str, engine_kwargs: dict[str, Any], env: dict[str, str]) -> None:
    """Child process: build the engine, then run each call in its own thread."""
    os.environ.update(env)
    from gyre.engine.engine import Engine
    from gyre.weight_sync.ipc import update_weights_from_ipc

    lock = threading.Lock()

    def reply(cid: int, ok: bool, value: Any) -> None:
        with lock:
            try:
                conn.send((cid, ok, value))
            except Exception as e:  # an unpicklable result
                conn.send((cid, False, EngineProcessError(f"cannot send the result back: {e}")))

    try:
        engine = Engine(model_path, **engine_kwargs)
    except BaseException as e:
        reply(0, False, _picklable(e))
        return
    reply(0, True, None)

    def run(cid: int, method: str, args: tuple, kwargs: dict) -> None:
        try:
            if method == "__getattr__":
                value = getattr(engine, args[0])
            elif method == "__run__":
                value = args[0](engine, *args[1:])
            elif method == "__ipc__":
                value = update_weights_from_ipc(engine, *args)
            elif method.startswith("_"):
                raise AttributeError(f"engine method {method!r} is private")
            else:
                value = getattr(engine, method)(*args, **kwargs)
        except BaseException as e:
            reply(cid, False, _picklable(e))
        else:
            reply(cid, True, value)

    with ThreadPoolExecutor(max_workers=32, thread_name_prefix="gyre-call") as pool:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                break
            if msg is None:
                break
            pool.submit(run, *msg)
        engine.shutdown()
