"""Colocated updates over CUDA IPC: the trainer passes handles to its own GPU tensors; the engine (another
process on the same GPU or one with peer access) opens them and copies straight into its parameters.
No bytes go through the host and the trainer makes no copy.

NOTE: the trainer must keep its tensors alive and unchanged until the engine's update call returns
(WeightSender.push holds them for that long); torch's IPC reference counting keeps the memory valid
while the engine still has it open.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.multiprocessing.reductions import rebuild_cuda_tensor, reduce_tensor


def to_ipc(named_tensors: Sequence[tuple[str, torch.Tensor]]) -> list[tuple[str, Any]]:
    """Picklable (name, handle) pairs for CUDA tensors."""
    payload = []
    for name, t in named_tensors:
        if t.device.type != "cuda":
            raise ValueError(f"ipc mode needs CUDA tensors; {name!r} is on {t.device}")
        payload.append((name, reduce_tensor(t.detach())))
    return payload


def from_ipc(payload: Sequence[tuple[str, Any]]) -> list[tuple[str, torch.Tensor]]:
    """Open the handles (in a process other than the one that made them)."""
    out = []
    for name, (fn, args) in payload:
        if fn is not rebuild_cuda_tensor:  # never call an arbitrary function from a payload
            raise ValueError(f"ipc payload for {name!r} is not a CUDA tensor handle")
        out.append((name, fn(*args)))
    return out


def update_weights_from_ipc(
    engine: Any, payload: Sequence[tuple[str, Any]], version: int | None = None
) -> int:
    """Engine process: open the trainer's tensors and update in place (validation as update_weights)."""
    named = from_ipc(payload)
    try:
        return engine.update_weights(named, version)
    finally:
        del named  # closes the IPC mappings
