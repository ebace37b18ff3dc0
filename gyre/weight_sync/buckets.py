"""Flattened buckets and the wire format of one update over a weight group.

Tensors of mixed dtypes travel as byte buckets: taken in order, a bucket holds tensors until the next
one would push it past bucket_bytes (a larger tensor gets a bucket of its own, sent without a copy).
Offsets inside a bucket are aligned to ALIGN bytes so that every tensor is a valid typed view of it.

The stream describes itself, so the trainer can send tensors as they come out of a generator (an FSDP
or Megatron adapter gathers them bucket by bucket and never holds the whole model):
    frame  int64[FRAME_LEN]  MAGIC, PROTOCOL, kind, version, meta_bytes, data_bytes, num_tensors, 0
    meta   uint8[meta_bytes] JSON [[name, dtype, shape, offset], ...]       (kind BUCKET only)
    data   uint8[data_bytes] the bucket                                     (kind BUCKET only)
    ... more buckets ..., then a frame of kind END (num_tensors = the total)
    vote   int64[1]          all-reduce MIN over every rank: 1 = received and valid here
An engine stages every bucket, checks every tensor, and writes only when the vote is 1: an update is
taken by every engine or by none, and one that an engine rejects is still received to the end, so the
group stays in step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

ALIGN = 256
MAGIC = 0x67797265  # "gyre"
PROTOCOL = 2
FRAME_LEN = 8
KIND_BUCKET, KIND_END = 1, 2


@dataclass(frozen=True)
class TensorMeta:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        numel = 1
        for d in self.shape:
            numel *= d
        return numel * self.dtype.itemsize

    @classmethod
    def of(cls, name: str, t: torch.Tensor) -> TensorMeta:
        return cls(name, t.dtype, tuple(t.shape))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(d: object) -> torch.dtype:
    if isinstance(d, torch.dtype):
        return d
    dtype = getattr(torch, str(d).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"weight update: unknown dtype {d!r}")
    return dtype


def align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A tensor's memory as a flat uint8 view (a copy only if t is not contiguous)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def frame(
    kind: int, version: int, meta_bytes: int = 0, data_bytes: int = 0, num_tensors: int = 0
) -> list[int]:
    return [MAGIC, PROTOCOL, kind, version, meta_bytes, data_bytes, num_tensors, 0]


def encode_meta(entries: list[tuple[TensorMeta, int]]) -> bytes:
    return json.dumps([[m.name, dtype_name(m.dtype), list(m.shape), off] for m, off in entries]).encode()


def decode_meta(raw: bytes, data_bytes: int) -> list[tuple[TensorMeta, int]]:
    """(meta, offset) pairs of one bucket; ValueError if they do not describe data_bytes of tensors."""
    out = []
    for name, dtype, shape, off in json.loads(raw.decode()):
        m = TensorMeta(str(name), parse_dtype(dtype), tuple(int(x) for x in shape))
        if off % ALIGN or off < 0 or off + m.nbytes > data_bytes:
            raise ValueError(f"weight update: tensor {m.name!r} lies outside its bucket")
        out.append((m, int(off)))
    return out


def view(buf: torch.Tensor, m: TensorMeta, offset: int) -> torch.Tensor:
    """The tensor m stored at offset of a uint8 bucket buf (a view, no copy)."""
    return buf[offset : offset + m.nbytes].view(m.dtype).view(m.shape)
