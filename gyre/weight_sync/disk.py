"""write_checkpoint: named tensors -> an HF-style sharded safetensors directory (what
`Engine.update_weights_from_disk` reads). Tensors are written shard by shard as they come, so a
generator's tensors are never all alive at once."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch


def write_checkpoint(
    named_tensors: Iterable[tuple[str, torch.Tensor]], path: str | os.PathLike, max_shard_bytes: int = 5 << 30
) -> Path:
    """Shards of at most max_shard_bytes (a larger tensor gets its own) + model.safetensors.index.json,
    written into path + ".tmp" and renamed to path once complete (readers never see a partial one)."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = total = 0
    files: list[tuple[str, list[str]]] = []
    seen: set[str] = set()

    def write() -> None:
        name = f"shard-{len(files):05d}.safetensors"
        save_file(shard, str(tmp / name), metadata={"format": "pt"})
        files.append((name, list(shard)))
        shard.clear()

    for name, t in named_tensors:
        if name in seen:
            raise ValueError(f"write_checkpoint: tensor {name!r} appears twice")
        seen.add(name)
        nbytes = t.numel() * t.element_size()
        if shard and shard_bytes + nbytes > max_shard_bytes:
            write()
            shard_bytes = 0
        # NOTE: safetensors refuses tensors sharing storage (tied weights): every tensor gets its own copy
        shard[name] = t.detach().to("cpu", copy=True).contiguous()
        shard_bytes += nbytes
        total += nbytes
    if shard:
        write()
    # HF names: model-0000k-of-0000n.safetensors, known only once every shard is written
    weight_map = {}
    for k, (name, names) in enumerate(files):
        final = f"model-{k + 1:05d}-of-{len(files):05d}.safetensors"
        os.replace(tmp / name, tmp / final)
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path
