"""The wire format alone: mixed dtypes, odd shapes and bucket sizes survive a gloo broadcast bit for bit."""

from __future__ import annotations

import datetime
import threading

import pytest
import torch
import torch.distributed as dist

from gyre.weight_sync.group import WeightGroup
from gyre.weight_sync.receiver import GroupReceiver
from gyre.weight_sync.stream import GroupStream
from tests.weight_sync.helpers import free_port


def tensors() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        ("a", torch.randn(3, 5, generator=g)),
        ("b", torch.randn(7, generator=g).to(torch.bfloat16)),
        ("big", torch.randn(64, 64, generator=g)),  # 16 KiB: larger than the small buckets below
        ("ints", torch.randint(-(2**40), 2**40, (11,), generator=g)),
        ("mask", torch.rand(13, generator=g) > 0.5),
        ("scalar", torch.tensor(3.5, dtype=torch.float16)),
        ("empty", torch.empty(0, 4)),
        ("strided", torch.randn(6, 8, generator=g).t()),  # not contiguous: packed through a copy
    ]


@pytest.mark.parametrize("bucket_bytes", [1, 1000, 10_000, 1 << 20])
def test_roundtrip(bucket_bytes):
    port = free_port()
    store = dist.TCPStore(
        "127.0.0.1", port, 2, is_master=True, timeout=datetime.timedelta(seconds=20), wait_for_workers=False
    )
    got = {}

    def engine() -> None:
        recv = GroupReceiver("127.0.0.1", port, 1, 2, "gloo", "g", torch.device("cpu"), 20)
        metas, views, _ = recv.receive(7, lambda metas: None)
        got.update({m.name: v.clone() for m, v in zip(metas, views)})
        recv.close()

    t = threading.Thread(target=engine)
    t.start()
    group = WeightGroup("127.0.0.1", port, 0, 2, "gloo", "g", torch.device("cpu"), 20, store=store)
    stream = GroupStream(group, version=7, bucket_bytes=bucket_bytes)
    sent = tensors()
    for name, x in sent:
        stream.add(name, x)
    stream.finish()
    t.join(30)
    group.close()
    assert list(got) == [n for n, _ in sent]
    for name, x in sent:
        assert got[name].dtype == x.dtype and got[name].shape == x.shape
        assert torch.equal(got[name], x), name
    if bucket_bytes in (1, 1 << 20):  # a bucket per tensor; everything in one
        assert stream.num_buckets == (len(sent) if bucket_bytes == 1 else 1)
