"""Engine handles: what a WeightSender needs of one engine, wherever the engine lives.

`LocalEngine` wraps a `gyre.Engine` of this process; `EngineProcess` (process.py) drives one in a child
process over a pipe. A Ray actor or an HTTP server becomes a handle by forwarding the same calls (the
arguments are plain names, dtypes as strings, shapes, paths and picklable IPC payloads).
"""

from __future__ import annotations

import abc
import os
from collections.abc import Sequence
from typing import Any

import torch

from gyre.engine.engine import Engine

NamedTensors = Sequence[tuple[str, torch.Tensor]]


class EngineHandle(abc.ABC):
    #: tensors passed to update_weights reach the engine as they are (same process, same memory)
    is_local: bool = False

    @abc.abstractmethod
    def weight_version(self) -> int: ...

    @abc.abstractmethod
    def pause(self, mode: str = "in_place") -> None: ...

    @abc.abstractmethod
    def resume(self) -> None: ...

    @abc.abstractmethod
    def update_weights(self, named_tensors: NamedTensors, version: int | None = None) -> int: ...

    @abc.abstractmethod
    def update_weights_from_disk(self, path: str, version: int | None = None) -> int: ...

    @abc.abstractmethod
    def update_weights_from_ipc(self, payload: list[tuple[str, Any]], version: int | None = None) -> int:
        """payload: gyre.weight_sync.ipc.to_ipc(...), opened in the engine's process."""

    @abc.abstractmethod
    def init_weight_group(
        self,
        master_addr: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        backend: str,
        group_name: str,
    ) -> None: ...

    @abc.abstractmethod
    def update_weights_from_group(
        self,
        names: Sequence[str],
        dtypes: Sequence[str],
        shapes: Sequence[Sequence[int]],
        version: int | None = None,
    ) -> int: ...

    def close(self) -> None:  # noqa: B027 - optional
        """Release what the handle holds (not the engine, unless the handle owns it)."""


class LocalEngine(EngineHandle):
    is_local = True

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def weight_version(self) -> int:
        return self.engine.weight_version

    def pause(self, mode: str = "in_place") -> None:
        self.engine.pause(mode)

    def resume(self) -> None:
        self.engine.resume()

    def update_weights(self, named_tensors: NamedTensors, version: int | None = None) -> int:
        return self.engine.update_weights(named_tensors, version)

    def update_weights_from_disk(self, path: str, version: int | None = None) -> int:
        return self.engine.update_weights_from_disk(path, version)

    def update_weights_from_ipc(self, payload: list[tuple[str, Any]], version: int | None = None) -> int:
        raise RuntimeError(
            "CUDA IPC handles cannot be opened by the process that made them; an engine in "
            "the trainer's process takes the tensors themselves (mode='tensors')"
        )

    def init_weight_group(
        self,
        master_addr: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        backend: str,
        group_name: str,
    ) -> None:
        self.engine.init_weight_group(master_addr, master_port, rank_offset, world_size, backend, group_name)

    def update_weights_from_group(
        self,
        names: Sequence[str],
        dtypes: Sequence[str],
        shapes: Sequence[Sequence[int]],
        version: int | None = None,
    ) -> int:
        return self.engine.update_weights_from_group(names, dtypes, shapes, version)


def as_handle(engine: Any) -> EngineHandle:
    if isinstance(engine, EngineHandle):
        return engine
    if isinstance(engine, Engine):
        return LocalEngine(engine)
    if isinstance(engine, (str, os.PathLike)) and str(engine).startswith(("http://", "https://")):
        raise NotImplementedError(
            f"no HTTP engine handle yet for {engine}; pass a gyre.Engine or an EngineHandle"
        )
    raise TypeError(f"expected a gyre.Engine or an EngineHandle, got {type(engine).__name__}")
