"""Engine side of the weight group: receive one update (frames, metadata, buckets; see buckets.py).

Every bucket of an update is received into a buffer of its own before anything is returned, so a
trainer that dies or stalls mid-broadcast leaves the engine's weights untouched (the cost: staging
memory of the update's size). An update the engine rejects is still received to the end and dropped,
so that the trainer's broadcast completes and the group stays in step for the next one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from gyre.weight_sync.buckets import (
    FRAME_LEN,
    KIND_BUCKET,
    KIND_END,
    MAGIC,
    PROTOCOL,
    TensorMeta,
    decode_meta,
    view,
)
from gyre.weight_sync.group import WeightGroup, WeightSyncError

Validate = Callable[[list[TensorMeta]], Any]


class GroupReceiver:
    def __init__(
        self,
        master_addr: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        backend: str,
        group_name: str,
        device: torch.device,
        timeout_s: float,
    ) -> None:
        if rank_offset < 1:
            raise ValueError(f"rank_offset must be >= 1 (rank 0 is the trainer), got {rank_offset}")
        self.group = WeightGroup(
            master_addr, master_port, rank_offset, world_size, backend, group_name, device, timeout_s
        )

    def receive(
        self, version: int | None, validate: Validate | None
    ) -> tuple[list[TensorMeta], list[torch.Tensor], Any]:
        """(metas, tensors, validate(metas)) of one update; tensors are views into the received buckets.

        validate raises ValueError to reject the update; None rejects it outright. Either way the update
        is received to the end and this engine votes no: nothing is written anywhere. ValueError: the
        update was rejected, here or by another rank (the group is still in step); WeightSyncError: the
        transfer failed (the group is aborted and must be re-initialised)."""
        g = self.group
        metas: list[TensorMeta] = []
        tensors: list[torch.Tensor] = []
        works: list[Any] = []
        problem: ValueError | None = None
        while True:
            f = torch.empty(FRAME_LEN, dtype=torch.int64, device=g.device)
            g.wait([g.broadcast(f)], "receiving a frame of the update")
            magic, proto, kind, sent_version, meta_bytes, data_bytes, num_tensors, _ = f.tolist()
            if magic != MAGIC or proto != PROTOCOL or kind not in (KIND_BUCKET, KIND_END):
                g.abort("garbled frame")
                raise WeightSyncError(
                    f"weight group: garbled frame {f.tolist()}; the group is out of step and "
                    "was aborted, re-initialise it"
                )
            if version is not None and sent_version != version and problem is None:
                problem = ValueError(
                    f"weight update: the trainer sends version {sent_version}, the control "
                    f"call said {version}"
                )
            if kind == KIND_END:
                if num_tensors != len(metas) and problem is None:
                    problem = ValueError(f"weight update: {len(metas)} tensors received, {num_tensors} sent")
                break
            meta = torch.empty(meta_bytes, dtype=torch.uint8, device=g.device)
            try:
                data = torch.empty(data_bytes, dtype=torch.uint8, device=g.device)
            except torch.OutOfMemoryError as e:
                g.abort("out of memory")
                raise WeightSyncError(
                    f"weight group: no memory on {g.device} to stage a bucket of "
                    f"{data_bytes / 2**20:.1f} MiB (the update is staged whole before it is "
                    "written); the group was aborted"
                ) from e
            g.wait([g.broadcast(meta)], "receiving bucket metadata")
            works.append(g.broadcast(data))  # waited for at the end: the next frame can come first
            try:
                entries = decode_meta(meta.cpu().numpy().tobytes(), data_bytes)
            except (ValueError, TypeError, KeyError) as e:
                g.abort("garbled metadata")
                raise WeightSyncError(
                    f"weight group: garbled bucket metadata ({e}); the group was aborted"
                ) from e
            for m, off in entries:
                metas.append(m)
                tensors.append(view(data, m, off))
        g.wait(works, f"receiving {len(metas)} tensors of weight version {sent_version}")
        result = None
        if validate is not None and problem is None:
            try:
                result = validate(metas)
            except ValueError as e:
                problem = e
        agreed = g.vote(validate is not None and problem is None, "the commit vote")
        if problem is not None:
            raise problem
        if validate is not None and not agreed:
            raise ValueError("weight update: rejected by another engine of the group; nothing was changed")
        return metas, tensors, result

    def receive_raw(self, sizes: Sequence[int]) -> None:
        """Benchmark baseline: receive plain broadcasts of these sizes (no frames, no unpacking)."""
        bufs = [torch.empty(n, dtype=torch.uint8, device=self.group.device) for n in sizes]
        self.group.vote(True, "a barrier")  # WeightSender.broadcast_raw starts its clock after it
        self.group.wait([self.group.broadcast(b) for b in bufs], "a raw broadcast")

    def close(self) -> None:
        self.group.close()
