"""The engine side of weight updates: validate everything, then copy in place, then bump the version.

Protocol (see ARCHITECTURE.md): pause(mode) -> receive/load tensors -> weight_version += 1 -> the
prefix cache drops KV of older versions -> resume(). Every tensor is checked (known HF name, shape,
dtype) before any parameter is written, so a bad update raises naming the tensor and the old weights
stay bit-identical. Writes run on the engine thread between steps through each parameter's
weight_loader (`param.data.copy_`), so captured CUDA graphs stay valid.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gyre.engine.layers.linear import expected_shape
from gyre.engine.weights import iterate_safetensors, safetensors_files

if TYPE_CHECKING:
    from gyre.engine.engine import Engine


class WeightUpdater:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.group: Any = None
        self._host_weights: dict[str, torch.Tensor] | None = None
        self.memory_released: set[str] = set()

    @property
    def model(self) -> torch.nn.Module:
        return self.engine.runner.model

    # -- validation ---------------------------------------------------------------------------------
    def check(self, name: str, shape: Sequence[int], dtype: torch.dtype) -> tuple[Any, Any] | None:
        """(param, shard_id) for a valid tensor, None for one to skip; ValueError naming it otherwise."""
        try:
            target = self.model.resolve(name)
        except KeyError:
            raise ValueError(f"weight update: unknown tensor name {name!r}") from None
        if target is None:
            return None
        param, shard = target
        want = expected_shape(param, shard)
        if tuple(shape) != tuple(want):
            raise ValueError(f"weight update: tensor {name!r} has shape {tuple(shape)}, expected {tuple(want)}")
        if dtype != param.dtype:
            raise ValueError(f"weight update: tensor {name!r} has dtype {dtype}, expected {param.dtype}")
        return target

    def _apply(self, items: list[tuple[Any, Any, torch.Tensor]], version: int | None) -> int:
        """Engine thread: write validated tensors in place and bump the version."""
        with torch.no_grad():
            for param, shard, tensor in items:
                param.weight_loader(param, tensor.to(param.device, non_blocking=True), shard)
        if self.engine.runner.device.type == "cuda":
            torch.cuda.synchronize(self.engine.runner.device)
        new_version = self.engine.weight_version + 1 if version is None else int(version)
        self.engine.set_weight_version(new_version)
        return new_version

    # -- sources ------------------------------------------------------------------------------------
    def update_from_tensors(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int | None) -> int:
        items = []
        for name, tensor in named_tensors:
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"weight update: {name!r} is not a tensor")
            target = self.check(name, tensor.shape, tensor.dtype)
            if target is not None:
                items.append((*target, tensor))
        return self.engine.call(lambda: self._apply(items, version))

    def update_from_disk(self, path: str | os.PathLike, version: int | None) -> int:
        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"weight update: {path} is not a directory")
        items = []
        # read and validate everything first: a truncated shard fails here, before any write
        for name, tensor in iterate_safetensors(safetensors_files(path)):
            target = self.check(name, tensor.shape, tensor.dtype)
            if target is not None:
                items.append((*target, tensor))
        if not items:
            raise ValueError(f"weight update: {path} holds no tensors of this model")
        return self.engine.call(lambda: self._apply(items, version))

    def init_group(self, master_addr: str, master_port: int, rank_offset: int, world_size: int, backend: str,
                   group_name: str) -> None:
        from gyre.weight_sync.receiver import GroupReceiver

        if self.group is not None:
            self.group.close()
        self.group = GroupReceiver(master_addr, master_port, rank_offset, world_size, backend, group_name,
                                   device=self.engine.runner.device,
                                   timeout_s=self.engine.config.weight_update_timeout_s)

    def update_from_group(self, names: Sequence[str], dtypes: Sequence[Any], shapes: Sequence[Sequence[int]],
                          version: int | None) -> int:
        if self.group is None:
            raise RuntimeError("init_weight_group must be called before update_weights_from_group")
        if not (len(names) == len(dtypes) == len(shapes)):
            raise ValueError("names, dtypes and shapes must have the same length")
        dtypes = [_as_dtype(d) for d in dtypes]
        targets = [self.check(n, s, d) for n, s, d in zip(names, shapes, dtypes)]
        # validation passed for every tensor: receive them all (the trainer sends regardless), then write
        tensors = self.group.receive(list(zip(names, dtypes, shapes)))
        items = [(*t, x) for t, x in zip(targets, tensors) if t is not None]
        return self.engine.call(lambda: self._apply(items, version))

    # -- memory release (colocation) ----------------------------------------------------------------
    def release_memory(self, tags: Sequence[str]) -> None:
        tags = set(tags)
        unknown = tags - {"kv_cache", "weights"}
        if unknown:
            raise ValueError(f"release_memory: unknown tags {sorted(unknown)}; use kv_cache and/or weights")
        self.engine.call(lambda: self._release(tags))

    def _release(self, tags: set[str]) -> None:
        eng = self.engine
        for req in list(eng.scheduler.running):  # recomputed after resume_memory
            eng.scheduler.retract(req)
        if "kv_cache" in tags and "kv_cache" not in self.memory_released:
            for s in list(eng._sessions.values()):
                s.drop_lock()
            if eng.cache is not None:
                eng.cache.flush()
            eng.runner.pool.release()
            self.memory_released.add("kv_cache")
        if "weights" in tags and "weights" not in self.memory_released:
            self._host_weights = {}
            for name, p in eng.runner.model.named_parameters():
                self._host_weights[name] = p.data.to("cpu", copy=True)
                p.data = torch.empty(0, dtype=p.dtype, device=p.device)
            self.memory_released.add("weights")
        eng.runner.on_memory_released()
        eng._paused_for_memory = bool(self.memory_released)

    def resume_memory(self, tags: Sequence[str]) -> None:
        self.engine.call(lambda: self._resume(set(tags)))

    def _resume(self, tags: set[str]) -> None:
        eng = self.engine
        if "weights" in tags and "weights" in self.memory_released:
            for name, p in eng.runner.model.named_parameters():
                p.data = self._host_weights[name].to(eng.runner.device)
            self._host_weights = None
            self.memory_released.discard("weights")
        if "kv_cache" in tags and "kv_cache" in self.memory_released:
            eng.runner.pool.restore()
            self.memory_released.discard("kv_cache")
        eng.runner.on_memory_resumed()
        eng._paused_for_memory = bool(self.memory_released)

    def close(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None


def _as_dtype(d: Any) -> torch.dtype:
    if isinstance(d, torch.dtype):
        return d
    name = str(d).removeprefix("torch.")
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {d!r}")
    return dtype
