"""Weights by rank: loading a checkpoint into this rank's shard, and moving named tensors from rank 0 to
the ranks that need them (gyre.engine.workers): uint8 buckets, each tensor 16-byte aligned, that both
sides plan identically from the tensors' metadata.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from gyre.engine.layers.moe import FusedMoE, moe_layers

BUCKET_BYTES = 256 << 20


def load_shard(model: nn.Module, path: str | os.PathLike) -> None:
    """Load an HF checkpoint into this rank's parameters: experts other ranks hold are not even read;
    dense tensors are read whole and narrowed to this rank's TP shard by their loaders."""
    from safetensors import safe_open

    from gyre.engine.weights import safetensors_files

    owners = {id(p): m for m in moe_layers(model) for p in (m.w13, m.w2)}
    loaded: set[str] = set()
    with torch.no_grad():
        for f in safetensors_files(path):
            try:
                handle = safe_open(str(f), framework="pt", device="cpu")
            except Exception as e:
                raise ValueError(f"cannot read safetensors file {f}: {e}") from e
            with handle:
                for name in handle.keys():
                    target = model.resolve(name)
                    if target is None:
                        continue
                    param, shard = target
                    moe: FusedMoE | None = owners.get(id(param))
                    loaded.add(name)
                    if moe is not None and not moe.owns(shard[1]):
                        continue
                    try:
                        tensor = handle.get_tensor(name)
                    except Exception as e:
                        raise ValueError(f"cannot read tensor {name!r} from {f}: {e}") from e
                    param.weight_loader(param, tensor.to(param.dtype), shard)
    missing = sorted(set(model.hf_weight_specs()) - loaded)
    if missing:
        raise ValueError(f"checkpoint {path} lacks {len(missing)} tensor(s), e.g. {missing[:5]}")


def hf_name(param_name: str, shard: Any) -> str:
    """The HF checkpoint name that (our parameter, shard id) loads from: the inverse of resolve()."""
    if isinstance(shard, tuple):  # an expert: (gate | up | down, e)
        which, e = shard
        return f"{param_name.rsplit('.', 1)[0]}.{e}.{which}_proj.weight"
    if shard in ("q", "k", "v"):
        return param_name.replace("qkv_proj", f"{shard}_proj")
    if shard in ("gate", "up"):
        return param_name.replace("gate_up_proj", f"{shard}_proj")
    return param_name


def pack(tensors: list[torch.Tensor], device: torch.device) -> Iterable[torch.Tensor]:
    """uint8 buckets of at most BUCKET_BYTES (a larger tensor alone), each tensor 16-byte aligned."""
    group: list[torch.Tensor] = []
    size = 0
    for t in [*tensors, None]:
        nbytes = aligned_bytes(t) if t is not None else 0
        if group and (t is None or size + nbytes > BUCKET_BYTES):
            parts = []
            for g in group:
                raw = g.detach().to(device).contiguous().reshape(-1).view(torch.uint8)
                parts.append(torch.nn.functional.pad(raw, (0, aligned_bytes(g) - raw.numel())))
            yield torch.cat(parts)
            group, size = [], 0
        if t is not None:
            group.append(t)
            size += nbytes


def aligned_bytes(t: torch.Tensor) -> int:
    return -(-t.numel() * t.element_size() // 16) * 16


def _meta_bytes(meta: tuple) -> int:
    """meta: (name, shape, dtype name, ...) -> its aligned size in a bucket."""
    return -(-math.prod(meta[1]) * dtype_of(meta[2]).itemsize // 16) * 16


def unpack_plan(metas: list[tuple]) -> list[list[tuple[int, tuple]]]:
    """The buckets pack() makes of tensors with these metas: per bucket, (byte offset, meta)."""
    buckets: list[list] = []
    size = 0
    for meta in metas:
        nbytes = _meta_bytes(meta)
        if not buckets or (buckets[-1] and size + nbytes > BUCKET_BYTES):
            buckets.append([])
            size = 0
        buckets[-1].append((size, meta))
        size += nbytes
    return buckets


def bucket_bytes(bucket: list[tuple[int, tuple]]) -> int:
    offset, meta = bucket[-1]
    return offset + _meta_bytes(meta)


def unpack(buf: torch.Tensor, bucket: list[tuple[int, tuple]]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) views into a received bucket."""
    for offset, (name, shape, dtype, *_) in bucket:
        dt = dtype_of(dtype)
        yield name, buf[offset : offset + math.prod(shape) * dt.itemsize].view(dt).view(shape)


def dtype_of(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))
