"""GroupStream: the trainer's side of one update over a weight group (wire format in buckets.py).

Tensors are added as they come (from a list or an adapter's generator). A full bucket is packed into
one of two staging buffers and broadcast asynchronously; the next bucket is packed into the other
buffer while it is in flight. At most two buckets are in flight, so a generator's tensors are released
bucket by bucket. A bucket of one tensor already contiguous on the group's device goes out as it is.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from gyre.weight_sync.buckets import KIND_BUCKET, KIND_END, TensorMeta, align, as_bytes, encode_meta, frame
from gyre.weight_sync.group import WeightGroup


class GroupStream:
    def __init__(
        self,
        group: WeightGroup,
        version: int,
        bucket_bytes: int,
        cancel: Callable[[], str | None] | None = None,
    ) -> None:
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
        self.g, self.version, self.bucket_bytes, self.cancel = group, version, bucket_bytes, cancel
        self.num_tensors = self.num_buckets = self.num_bytes = 0
        self._pending: list[tuple[TensorMeta, int, torch.Tensor]] = []  # (meta, offset, tensor)
        self._pending_bytes = 0
        self._staging: list[torch.Tensor | None] = [None, None]
        self._in_flight: deque[tuple[Any, int | None, torch.Tensor]] = deque()  # (work, staging slot, data)
        self._small: list[tuple[Any, torch.Tensor]] = []  # frames and metadata

    def add(self, name: str, tensor: torch.Tensor) -> None:
        m = TensorMeta.of(name, tensor)
        start = align(self._pending_bytes) if self._pending else 0
        if self._pending and start + m.nbytes > self.bucket_bytes:
            self.flush()
            start = 0
        self._pending.append((m, start, tensor.detach()))
        self._pending_bytes = start + m.nbytes

    def flush(self) -> None:
        """Send the pending bucket (if any)."""
        if not self._pending:
            return
        g, nbytes = self.g, self._pending_bytes
        while len(self._in_flight) > 1:  # at most one other bucket in flight while this one is packed
            self._retire()
        only = self._pending[0][2] if len(self._pending) == 1 else None
        if only is not None and only.device == g.device and only.is_contiguous():
            slot, data = None, only.reshape(-1).view(torch.uint8)  # no copy
        else:
            busy = {s for _, s, _ in self._in_flight}
            slot = 0 if 0 not in busy else 1
            buf = self._staging[slot]
            if buf is None or buf.numel() < nbytes:
                self._staging[slot] = buf = None  # free the old one first
                buf = self._staging[slot] = torch.empty(nbytes, dtype=torch.uint8, device=g.device)
            data = buf[:nbytes]
            for m, off, t in self._pending:
                data[off : off + m.nbytes].copy_(as_bytes(t), non_blocking=True)
        raw = encode_meta([(m, off) for m, off, _ in self._pending])
        self._send_small(frame(KIND_BUCKET, self.version, len(raw), nbytes, len(self._pending)))
        meta = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(g.device)
        self._small.append((g.broadcast(meta), meta))
        self._in_flight.append((g.broadcast(data), slot, data))
        self.num_tensors += len(self._pending)
        self.num_buckets += 1
        self.num_bytes += nbytes
        self._pending, self._pending_bytes = [], 0

    def finish(self) -> None:
        """Send the last bucket and the END frame, wait for everything, then take the commit vote."""
        self.flush()
        self._send_small(frame(KIND_END, self.version, num_tensors=self.num_tensors))
        while self._in_flight:
            self._retire()
        self.g.wait([w for w, _ in self._small], "sending frames", self.cancel)
        self._small.clear()
        self._staging = [None, None]
        self.g.vote(True, "the commit vote (every engine has received the update)", self.cancel)

    def _send_small(self, values: list[int]) -> None:
        t = torch.tensor(values, dtype=torch.int64, device=self.g.device)
        self._small.append((self.g.broadcast(t), t))

    def _retire(self) -> None:
        work, _, _ = self._in_flight[0]
        self.g.wait(
            [work],
            f"sending bucket {self.num_buckets - len(self._in_flight) + 1} of version {self.version}",
            self.cancel,
        )
        self._in_flight.popleft()
