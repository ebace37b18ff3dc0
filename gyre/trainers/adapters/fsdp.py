"""Named HF-checkpoint tensors out of an FSDP2 (`torch.distributed.fsdp.fully_shard`) model.

Every rank calls `named_tensors()` and iterates it to the end: parameters are gathered bucket by bucket
(a bucket is at most `bucket_bytes` of full tensors, or one tensor when that is larger), every rank taking
part in each gather, and only the sending rank yields them. At most one gathered bucket is alive in the
adapter at a time, never the whole model. Works for any DTensor placement (FSDP, FSDP + TP meshes).

Mixed precision: FSDP2 keeps sharded parameters in their storage dtype (usually float32) whatever
`MixedPrecisionPolicy.param_dtype` is; with `dtype` set, each shard is cast before its gather (half the
traffic for float32 -> bfloat16, and bitwise the same as casting the gathered tensor).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate

from gyre.trainers.adapters.hf import NamedTensor, clean_name, hf_tensors


class FSDPAdapter:
    def __init__(
        self,
        model: nn.Module,
        dtype: torch.dtype | None = None,
        bucket_bytes: int = 256 << 20,
        src_rank: int = 0,
    ) -> None:
        if bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
        self.model = model
        self.dtype = dtype
        self.bucket_bytes = bucket_bytes
        self.src_rank = src_rank
        self.peak_bucket_bytes = 0  # largest bucket gathered by the last named_tensors()

    @property
    def is_sender(self) -> bool:
        return not dist.is_initialized() or dist.get_rank() == self.src_rank

    def _nbytes(self, p: torch.Tensor) -> int:
        return p.numel() * (self.dtype or p.dtype).itemsize  # numel of a DTensor is the full size

    def buckets(self) -> list[list[tuple[str, torch.Tensor]]]:
        """Parameters (model order) grouped into buckets of at most bucket_bytes of full tensors."""
        out: list[list[tuple[str, torch.Tensor]]] = [[]]
        size = 0
        for name, p in self.model.named_parameters():
            nbytes = self._nbytes(p)
            if out[-1] and size + nbytes > self.bucket_bytes:
                out.append([])
                size = 0
            out[-1].append((clean_name(name), p))
            size += nbytes
        return [b for b in out if b]

    def _gather(self, p: torch.Tensor) -> torch.Tensor:
        if isinstance(p, DTensor):  # issue the all-gather now, wait later: a bucket's gathers overlap
            return p.redistribute(
                placements=[Replicate()] * p.device_mesh.ndim, async_op=True, forward_dtype=self.dtype
            ).to_local()
        return p if self.dtype is None else p.to(self.dtype)  # not sharded (or unsharded right now)

    def named_tensors(self) -> Iterator[NamedTensor]:
        self.peak_bucket_bytes = 0
        with torch.no_grad():
            for bucket in self.buckets():
                gathered = [(name, self._gather(p.detach())) for name, p in bucket]
                gathered = [(name, _wait(t)) for name, t in gathered]
                self.peak_bucket_bytes = max(
                    self.peak_bucket_bytes, sum(self._nbytes(t) for _, t in gathered)
                )
                if self.is_sender:
                    yield from _emit(gathered)
                # NOTE: drop this bucket before gathering the next, or two are alive at once
                del gathered, bucket


def _emit(gathered: list[tuple[str, torch.Tensor]]) -> Iterator[NamedTensor]:
    """Yield and forget: once the consumer drops a tensor, nothing here keeps it alive."""
    while gathered:
        name, t = gathered.pop(0)
        yield from hf_tensors(name, t)


def _wait(t: torch.Tensor) -> torch.Tensor:
    wait = getattr(t, "wait", None)  # an AsyncCollectiveTensor from an async redistribute
    return wait() if callable(wait) else t
