"""FSDP2 adapter on 2 gloo ranks: gathered tensors equal the unsharded model's, bucket by bucket."""

from __future__ import annotations

import weakref

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from transformers import AutoModelForCausalLM

from gyre.trainers.adapters.fsdp import FSDPAdapter
from gyre.trainers.adapters.hf import HFAdapter

from .helpers import quiet_transformers, spawn

BUCKET = 48 << 10  # bytes; the tiny models are ~1-2 MB, so a dozen or more buckets


def _check(rank: int, world_size: int, path: str, bf16_compute: bool) -> None:
    quiet_transformers()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ref = {n: t.clone() for n, t in HFAdapter(model).named_tensors()}  # the unsharded model
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16) if bf16_compute else MixedPrecisionPolicy()
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    if bf16_compute:  # a forward and backward in bfloat16 first: the float32 shards are what is sent
        model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits.float().sum().backward()
    assert all(type(p).__name__ == "DTensor" and p.dtype == torch.float32 for p in model.parameters())

    adapter = FSDPAdapter(model, bucket_bytes=BUCKET)
    assert adapter.is_sender == (rank == 0)
    assert len(adapter.buckets()) > 8
    largest = max(t.numel() * t.element_size() for t in ref.values())
    alive: list[tuple[weakref.ref, int]] = []
    peak, names = 0, []
    for name, t in adapter.named_tensors():  # consume one at a time, keep nothing
        assert torch.equal(t, ref[name]), name
        names.append(name)
        alive.append((weakref.ref(t), t.numel() * t.element_size()))
        peak = max(peak, sum(n for r, n in alive if r() is not None))
        del t
    if rank == 0:
        assert sorted(names) == sorted(ref)
        # what the adapter keeps alive never exceeds one bucket (or one tensor larger than a bucket)
        assert 0 < peak <= max(BUCKET, largest), (peak, BUCKET, largest)
    else:
        assert names == []  # all ranks gather, only the sender yields
    assert 0 < adapter.peak_bucket_bytes <= max(BUCKET, largest)

    # mixed precision: shards cast before the gather, bitwise what casting the full tensor gives
    half = dict(FSDPAdapter(model, dtype=torch.bfloat16, bucket_bytes=BUCKET).named_tensors())
    if rank == 0:
        assert set(half) == set(ref)
        assert all(half[n].dtype == torch.bfloat16 and torch.equal(half[n], ref[n].bfloat16()) for n in ref)
    dist.barrier()


def test_fsdp2_gather_equals_unsharded_dense(model_dirs):
    spawn(_check, 2, model_dirs["qwen3"], False)


def test_fsdp2_gather_equals_unsharded_moe(model_dirs):
    # fused [E, 2I, H] experts sharded on E, split per expert; bfloat16 compute (MixedPrecisionPolicy)
    spawn(_check, 2, model_dirs["qwen3_moe"], True)
