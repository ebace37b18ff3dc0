"""Trainer -> engine weight transports: a NCCL/gloo group with flattened buckets, CUDA IPC, tensors, disk."""

from gyre.weight_sync.disk import write_checkpoint
from gyre.weight_sync.group import WeightSyncError, WeightSyncTimeout
from gyre.weight_sync.handles import EngineHandle, LocalEngine, as_handle
from gyre.weight_sync.process import EngineProcess, EngineProcessError
from gyre.weight_sync.sender import MODES, WeightSender

__all__ = [
    "MODES",
    "EngineHandle",
    "EngineProcess",
    "EngineProcessError",
    "LocalEngine",
    "WeightSender",
    "WeightSyncError",
    "WeightSyncTimeout",
    "as_handle",
    "write_checkpoint",
]
