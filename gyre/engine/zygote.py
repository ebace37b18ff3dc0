"""The zygote that forks worker processes (gyre.engine.workers) for parallel engines.

Forking rank 0 itself is unsafe once it has run threads (OpenMP, gloo, tokenizers: a forked child may
hang or crash), a multiprocessing "spawn" child re-runs the caller's __main__ script, and a fresh
interpreter per worker re-imports torch each time (seconds). The zygote is a fresh interpreter that
imports the engine once, runs no threads and never touches CUDA; it forks a worker per request, so
workers start in milliseconds, clean, on CPUs and GPUs. One per process, started by the first parallel
engine; it exits when that process does (and its workers with it). A worker's end of its pipe is passed
over a unix socket (SCM_RIGHTS); the zygote reaps workers and reports their exit codes.
"""

from __future__ import annotations

import contextlib
import multiprocessing.connection
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from multiprocessing import reduction

FORK_TIMEOUT_S = 300.0  # the first request waits for the zygote's imports


class _Zygote:
    """Rank 0's handle on the zygote process (one per process, shared by its parallel engines)."""

    _instance: _Zygote | None = None
    _create = threading.Lock()

    @classmethod
    def get(cls) -> _Zygote:
        with cls._create:
            if cls._instance is None or cls._instance.dead:
                cls._instance = cls()
            return cls._instance

    def __init__(self) -> None:
        ours, theirs = socket.socketpair()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        code = "import gyre.engine.zygote as z; z.zygote_main()"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, str(theirs.fileno())], pass_fds=[theirs.fileno()], env=env
        )
        theirs.close()
        self.conn = multiprocessing.connection.Connection(ours.detach())
        self.dead = False
        self.exits: dict[int, int] = {}  # worker pid -> exit code
        self.changed = threading.Condition()
        self._pids: queue.Queue = queue.Queue()
        self._fork = threading.Lock()
        threading.Thread(target=self._read, name="gyre-zygote-reader", daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                with self.changed:
                    self.dead = True
                    self.changed.notify_all()
                self._pids.put(None)
                return
            if msg[0] == "exit":
                with self.changed:
                    self.exits[msg[1]] = msg[2]
                    self.changed.notify_all()
            else:
                self._pids.put(msg[1])

    def fork(self, args: tuple) -> tuple[int, multiprocessing.connection.Connection]:
        ours, theirs = socket.socketpair()
        with self._fork:
            self.conn.send(("fork", args))
            reduction.send_handle(self.conn, theirs.fileno(), self.proc.pid)
            theirs.close()
            pid = self._pids.get(timeout=FORK_TIMEOUT_S)
        if pid is None:
            raise RuntimeError(f"the worker zygote (pid {self.proc.pid}) died")
        return pid, multiprocessing.connection.Connection(ours.detach())


class WorkerProcess:
    """A worker (a child of the zygote) and rank 0's end of its pipe."""

    def __init__(self, args: tuple) -> None:
        self.zygote = _Zygote.get()
        self.pid, self.conn = self.zygote.fork(args)

    @property
    def exitcode(self) -> int | None:
        z = self.zygote
        return z.exits.get(self.pid, -1 if z.dead else None)

    def join(self, timeout: float | None = None) -> None:
        with self.zygote.changed:
            self.zygote.changed.wait_for(lambda: self.exitcode is not None, timeout)

    wait = join

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)


def zygote_main() -> None:
    """The zygote: import once, then fork a worker per request and report how each one exits."""
    conn = multiprocessing.connection.Connection(int(sys.argv[1]))
    import gyre.engine.model_runner  # noqa: F401  all a worker needs, imported once
    from gyre.engine.workers import worker_main

    parent = os.getppid()
    while os.getppid() == parent:  # rank 0's process is alive
        ready = conn.poll(0.2)
        while True:  # reap workers that exited
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn.send(("exit", pid, os.waitstatus_to_exitcode(status)))
        if not ready:
            continue
        try:
            _, args = conn.recv()
            fd = reduction.recv_handle(conn)
        except (EOFError, OSError):
            break
        pid = os.fork()
        if pid == 0:
            conn.close()
            worker_main(*args, multiprocessing.connection.Connection(fd))
        os.close(fd)
        conn.send(("pid", pid))
    os._exit(0)
