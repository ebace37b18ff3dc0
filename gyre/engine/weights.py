"""Reading HF checkpoints (single or sharded safetensors) and building random (dummy) weights."""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open


def safetensors_files(path: str | os.PathLike) -> list[Path]:
    """The checkpoint files of an HF directory: the index's shards, else every *.safetensors."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index} is not a valid safetensors index: {e}") from e
        files = sorted({path / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"shards listed in {index} are missing: {missing}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    return files


def iterate_safetensors(files: list[Path], device: str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    for f in files:
        try:
            handle = safe_open(str(f), framework="pt", device=device)
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
            raise ValueError(f"cannot read safetensors file {f}: {e}") from e
        with handle:
            for name in handle.keys():
                try:
                    yield name, handle.get_tensor(name)
                except Exception as e:
                    raise ValueError(f"cannot read tensor {name!r} from {f}: {e}") from e


def load_checkpoint(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load every weight of an HF directory in place; every expected tensor must be present."""
    loaded = model.load_weights(iterate_safetensors(safetensors_files(path)))
    missing = sorted(set(model.hf_weight_specs()) - loaded)
    if missing:
        raise ValueError(f"checkpoint {path} lacks {len(missing)} tensor(s), e.g. {missing[:5]}")


@torch.no_grad()
def init_dummy(model: torch.nn.Module, seed: int) -> None:
    """Random weights (for benchmarks): matrices ~ U(-a, a) with a = 1/sqrt(fan_in), norms = 1."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
            continue
        fan_in = p.shape[-1] if p.dim() >= 2 else 1
        bound = fan_in**-0.5
        if p.device.type == "cpu":
            p.copy_(torch.rand(p.shape, generator=gen, dtype=torch.float32).mul_(2 * bound).sub_(bound))
        else:  # draw on the device: avoids moving many GB through the host
            g = torch.Generator(device=p.device).manual_seed(seed + zlib.crc32(name.encode()))
            p.copy_(torch.rand(p.shape, generator=g, device=p.device, dtype=torch.float32).mul_(2 * bound).sub_(bound))
