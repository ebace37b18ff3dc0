"""The engine side of weight updates: validate everything, then copy in place, then bump the version.

Protocol (see ARCHITECTURE.md): pause(mode) -> receive/load tensors -> weight_version += 1 -> the
prefix cache drops KV of older versions -> resume(). Every tensor is checked (known HF name, shape,
dtype, no duplicates, a version above the current one) before any parameter is written, so a bad update
raises naming the tensor and the old weights stay bit-identical. Tensors are received or read in full
off the engine thread; only the in-place writes run on the engine thread, between steps, through each
parameter's weight_loader (`param.data.copy_`), so captured CUDA graphs stay valid.

NOTE: updates are serialised by `_lock`; the group path receives even an update it rejects, so that the
trainer's broadcast completes and the group stays usable.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gyre.engine.layers.linear import expected_shape
from gyre.engine.weights import iterate_safetensors, safetensors_files

if TYPE_CHECKING:
    from gyre.engine.engine import Engine

_TAGS = ("kv_cache", "weights")


class WeightUpdater:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.group: Any = None  # gyre.weight_sync.receiver.GroupReceiver
        self._group_error: str | None = None
        self._lock = threading.Lock()
        self._host_weights: dict[str, torch.Tensor] | None = None  # released weights (pinned on CUDA)
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
            raise ValueError(
                f"weight update: tensor {name!r} has shape {tuple(shape)}, expected {tuple(want)}"
            )
        if dtype != param.dtype:
            raise ValueError(f"weight update: tensor {name!r} has dtype {dtype}, expected {param.dtype}")
        return target

    def check_all(
        self, metas: Iterable[tuple[str, Sequence[int], torch.dtype]]
    ) -> list[tuple[Any, Any] | None]:
        if "weights" in self.memory_released:
            raise ValueError(
                "weight update: the weights are released (release_memory); call "
                "resume_memory(['weights']) first"
            )
        seen: set[str] = set()
        targets = []
        for name, shape, dtype in metas:
            if name in seen:
                raise ValueError(f"weight update: tensor {name!r} appears twice")
            seen.add(name)
            targets.append(self.check(name, shape, dtype))
        return targets

    def next_version(self, version: int | None) -> int:
        current = self.engine.weight_version
        if version is None:
            return current + 1
        if isinstance(version, bool) or not isinstance(version, int):
            raise ValueError(f"weight update: version must be an integer, got {version!r}")
        if version <= current:
            # a reused version number would let KV cached under other weights match again
            raise ValueError(f"weight update: version {version} must be greater than the current {current}")
        return version

    def _apply(self, items: list[tuple[Any, Any, torch.Tensor]], version: int) -> int:
        """Engine thread: write validated tensors in place and bump the version."""
        workers = self.engine.runner.workers
        if workers is not None:  # tp/ep > 1: the other ranks' shards first (experts only where they live)
            workers.push_weights(self.model, items, self.engine.config.weight_update_timeout_s)
        with torch.no_grad():
            for param, shard, tensor in items:
                param.weight_loader(param, tensor.to(param.device, non_blocking=True), shard)
        if self.engine.runner.device.type == "cuda":
            torch.cuda.synchronize(self.engine.runner.device)
        self.engine.set_weight_version(version)
        return version

    # -- sources ------------------------------------------------------------------------------------
    def update_from_tensors(
        self,
        named_tensors: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor],
        version: int | None,
    ) -> int:
        if isinstance(named_tensors, Mapping):
            named_tensors = named_tensors.items()
        named = list(named_tensors)
        for name, tensor in named:
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"weight update: {name!r} is not a tensor")
        with self._lock:
            targets = self.check_all((n, t.shape, t.dtype) for n, t in named)
            version = self.next_version(version)
            items = [(*tg, t) for tg, (_, t) in zip(targets, named) if tg is not None]
            return self.engine.call(lambda: self._apply(items, version))

    def update_from_disk(self, path: str | os.PathLike, version: int | None) -> int:
        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"weight update: {path} is not a directory")
        with self._lock:
            version = self.next_version(version)
            # read and validate everything first: a truncated shard fails here, before any write
            named = list(iterate_safetensors(safetensors_files(path)))
            targets = self.check_all((n, t.shape, t.dtype) for n, t in named)
            items = [(*tg, t) for tg, (_, t) in zip(targets, named) if tg is not None]
            if not items:
                raise ValueError(f"weight update: {path} holds no tensors of this model")
            return self.engine.call(lambda: self._apply(items, version))

    def init_group(
        self,
        master_addr: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        backend: str,
        group_name: str,
    ) -> None:
        from gyre.weight_sync.receiver import GroupReceiver

        with self._lock:
            self.close()
            self.group = GroupReceiver(
                master_addr,
                master_port,
                rank_offset,
                world_size,
                backend,
                group_name,
                device=self.engine.runner.device,
                timeout_s=self.engine.config.weight_update_timeout_s,
            )
            self._group_error = None

    def update_from_group(
        self,
        names: Sequence[str],
        dtypes: Sequence[Any],
        shapes: Sequence[Sequence[int]],
        version: int | None,
    ) -> int:
        """names/dtypes/shapes may be empty: the trainer streams tensors it could not list in advance,
        and the broadcast's own metadata (checked the same way, before any write) is what counts."""
        from gyre.weight_sync.buckets import parse_dtype
        from gyre.weight_sync.group import WeightSyncError

        with self._lock:
            if self.group is None:
                why = f" (the last one failed: {self._group_error})" if self._group_error else ""
                raise RuntimeError(f"init_weight_group must be called before update_weights_from_group{why}")
            requested, rejected, expected = version, None, None
            try:  # what the control call says is checked now; the bytes are received regardless
                if not (len(names) == len(dtypes) == len(shapes)):
                    raise ValueError("weight update: names, dtypes and shapes must have the same length")
                expected = [
                    (n, tuple(int(x) for x in s), parse_dtype(d)) for n, d, s in zip(names, dtypes, shapes)
                ]
                self.check_all(expected)
                version = self.next_version(version)
            except ValueError as e:
                rejected = e

            def validate(metas: list) -> list:
                got = [(m.name, m.shape, m.dtype) for m in metas]
                if expected and got != expected:
                    raise ValueError(
                        "weight update: the tensors broadcast are not the names/dtypes/shapes of "
                        "the control call"
                    )
                if not got:
                    raise ValueError("weight update: the trainer sent no tensors")
                return self.check_all(got)

            try:
                _, tensors, targets = self.group.receive(requested, None if rejected else validate)
            except WeightSyncError as e:
                self._group_error = str(e)
                self.close()
                msg = f"{e}; the engine keeps weight version {self.engine.weight_version}"
                raise WeightSyncError(msg if rejected is None else f"{rejected} (and then: {msg})") from e
            if rejected is not None:
                raise rejected
            items = [(*tg, t) for tg, t in zip(targets, tensors) if tg is not None]
            return self.engine.call(lambda: self._apply(items, version))

    # -- memory release (colocation) ----------------------------------------------------------------
    def release_memory(self, tags: Sequence[str]) -> None:
        tags = _check_tags(tags, "release_memory")
        with self._lock:
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
            if eng.spec is not None:
                eng.spec.drafter.on_memory_released()
            self.memory_released.add("kv_cache")
        if "weights" in tags and "weights" not in self.memory_released:
            on_device = eng.runner.device.type != "cpu"
            # NOTE: host copies (pinned on CUDA) are kept and reused by later cycles: pinning is slow
            host = self._host_weights or {}
            for name, p in eng.runner.model.named_parameters():
                if on_device:
                    if name not in host:
                        host[name] = torch.empty(p.shape, dtype=p.dtype, pin_memory=True)
                    host[name].copy_(p.data, non_blocking=True)
                else:
                    host[name] = p.data  # nothing to free on the CPU: keep the tensor itself
            if on_device:
                torch.cuda.synchronize(eng.runner.device)
            for p in eng.runner.model.parameters():
                p.data = torch.empty(0, dtype=p.dtype, device=p.device)
            self._host_weights = host
            self.memory_released.add("weights")
        eng.runner.on_memory_released()
        if eng.runner.workers is not None:
            eng.runner.workers.memory("release", tags, eng.config.weight_update_timeout_s)
        eng._paused_for_memory = bool(self.memory_released)

    def resume_memory(self, tags: Sequence[str]) -> None:
        tags = _check_tags(tags, "resume_memory")
        with self._lock:
            self.engine.call(lambda: self._resume(tags))

    def _resume(self, tags: set[str]) -> None:
        eng = self.engine
        if "weights" in tags and "weights" in self.memory_released:
            dev = eng.runner.device
            for name, p in eng.runner.model.named_parameters():
                host = self._host_weights[name]
                p.data = host.to(dev, non_blocking=True) if dev.type != "cpu" else host
            if dev.type != "cpu":
                torch.cuda.synchronize(dev)
            else:
                self._host_weights = None
            self.memory_released.discard("weights")
        if "kv_cache" in tags and "kv_cache" in self.memory_released:
            eng.runner.pool.restore()
            if eng.spec is not None:
                eng.spec.drafter.on_memory_resumed()
            self.memory_released.discard("kv_cache")
        if eng.runner.workers is not None:  # tp/ep > 1: all ranks together (CUDA graphs hold collectives)
            eng.runner.workers.memory(
                "resume", tags, eng.config.weight_update_timeout_s, eng.runner.on_memory_resumed
            )
        else:
            eng.runner.on_memory_resumed()
        eng._paused_for_memory = bool(self.memory_released)

    def close(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None


def _check_tags(tags: Sequence[str], what: str) -> set[str]:
    tags = {tags} if isinstance(tags, str) else set(tags)
    unknown = tags - set(_TAGS)
    if unknown or not tags:
        raise ValueError(f"{what}: unknown tags {sorted(unknown)}; use kv_cache and/or weights")
    return tags
