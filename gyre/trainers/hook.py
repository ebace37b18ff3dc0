"""WeightSyncHook: after each optimizer step, push the trainer's weights to the engines as version=step.

Every trainer rank calls `after_step(step)`: the adapter's gathers are collectives, so all ranks iterate
its `named_tensors()` to the end; on the sending rank (`adapter.is_sender`) the tensors go to
`sender.push(named, version=step)`. Other ranks may pass sender=None.

Megatron-core (TP/EP shards gathered, pipeline stages sent to global rank 0, which pushes)::

    from gyre.trainers.adapters.megatron import MegatronAdapter
    from gyre.trainers.hook import WeightSyncHook
    from gyre.weight_sync.sender import WeightSender

    sender = WeightSender(engines, mode="group") if dist.get_rank() == 0 else None
    hook = WeightSyncHook(sender, MegatronAdapter(model, hf_config, dtype=torch.bfloat16))
    for step in range(1, num_steps + 1):
        forward_backward_func(forward_step_func=step_fn, data_iterator=data, model=model, ...)
        optimizer.step()
        hook.after_step(step)  # every rank

FSDP2 (rank 0 pushes; every rank takes part in the gathers, one bucket at a time)::

    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from gyre.trainers.adapters.fsdp import FSDPAdapter

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    sender = WeightSender(engines, mode="group") if dist.get_rank() == 0 else None
    hook = WeightSyncHook(sender, FSDPAdapter(model, dtype=torch.bfloat16))
    for step, batch in enumerate(loader, start=1):
        model(**batch).loss.backward()
        optimizer.step(); optimizer.zero_grad()
        hook.after_step(step)  # every rank
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import torch


class Adapter(Protocol):
    is_sender: bool

    def named_tensors(self) -> Iterator[tuple[str, torch.Tensor]]: ...


class Sender(Protocol):
    def push(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> Any: ...


class WeightSyncHook:
    """every: push after steps that are multiples of `every` (1 = each step)."""

    def __init__(self, sender: Sender | None, adapter: Adapter, every: int = 1) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if sender is None and adapter.is_sender:
            raise ValueError("this rank sends the weights (adapter.is_sender) but has no sender")
        self.sender = sender
        self.adapter = adapter
        self.every = every
        self.last_version: int | None = None

    def after_step(self, step: int) -> None:
        if step % self.every:
            return
        named = self.adapter.named_tensors()
        try:
            if self.adapter.is_sender:
                self.sender.push(named, version=step)
        finally:
            # NOTE: the other ranks are inside the same collectives: finish them even when push stopped
            # early or raised, so that a failed push is an error here and not a hang everywhere.
            for _ in named:
                pass
        self.last_version = step
