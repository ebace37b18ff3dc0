"""Named HF tensors out of a live megatron-core GPTModel sharded by TP, PP and EP, and the inverse
(`load_hf_weights`: an HF checkpoint into this rank's shards). The name and layout mapping itself is in
`megatron_mapping` (re-exported here); this module finds each parameter's global name and gathers it.

A parameter's global name: the layer index is `layer.layer_number - 1` (right under PP and virtual PP),
local expert i of EP rank r is global expert r * E / ep + i. Dense parameters are gathered over TP,
experts over expert-TP and then EP, one tensor at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gyre.trainers.adapters.hf import NamedTensor
from gyre.trainers.adapters.megatron_mapping import (
    LAYER,
    REPLICATED,
    VOCAB,
    Layout,
    expert_index,
    from_hf,
    is_expert,
    rule,
    to_hf,
    with_expert_index,
)

__all__ = ["Layout", "MegatronAdapter", "from_hf", "load_hf_weights", "model_params", "to_hf"]


# -- a live model ------------------------------------------------------------------------------------
def _unwrap(module: nn.Module) -> nn.Module:
    while hasattr(module, "module") and isinstance(module.module, nn.Module):  # DDP, Float16Module
        module = module.module
    return module


def model_params(model: nn.Module | Sequence[nn.Module], num_experts: int) -> list[tuple[str, nn.Parameter]]:
    """(global Megatron name, parameter) of this rank's model chunks: layer indices made global from
    `layer_number`, local expert indices from the EP rank."""
    from megatron.core import parallel_state as ps

    ep_size, ep_rank = ps.get_expert_model_parallel_world_size(), ps.get_expert_model_parallel_rank()
    num_local = num_experts // ep_size if num_experts else 0
    out = []
    for chunk in [_unwrap(m) for m in (model if isinstance(model, (list, tuple)) else [model])]:
        layers = chunk.decoder.layers if getattr(chunk, "decoder", None) is not None else []
        global_layer = {str(i): str(layer.layer_number - 1) for i, layer in enumerate(layers)}
        for name, p in chunk.named_parameters():
            m = LAYER.match(name)
            if m:
                rest = m.group(2)
                name = f"decoder.layers.{global_layer[m.group(1)]}.{rest}"
                if is_expert(name):
                    name = with_expert_index(name, ep_rank * num_local + expert_index(name))
            out.append((name, p))
    return out


def _tp_of(name: str) -> tuple[Any, int, int]:
    """(group, size, rank) over which parameter `name` is split: expert-TP for experts, else TP."""
    from megatron.core import parallel_state as ps

    if rule(name)[0] == REPLICATED:
        return None, 1, 0
    if is_expert(name):
        return (
            ps.get_expert_tensor_parallel_group(),
            ps.get_expert_tensor_parallel_world_size(),
            ps.get_expert_tensor_parallel_rank(),
        )
    return (
        ps.get_tensor_model_parallel_group(),
        ps.get_tensor_model_parallel_world_size(),
        ps.get_tensor_model_parallel_rank(),
    )


def _all_gather(t: torch.Tensor, group: Any, size: int) -> list[torch.Tensor]:
    if size == 1:
        return [t]
    out = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(out, t.contiguous(), group=group)
    return out


class MegatronAdapter:
    """HF-named full tensors out of a megatron-core GPTModel (or its list of virtual-pipeline chunks).

    Every rank iterates `named_tensors()` to the end. Dense parameters come first, gathered over TP one
    tensor at a time; experts come in their own pass, gathered over expert-TP then over EP. The first TP
    rank of data-parallel replica 0 of each pipeline stage computes its stage's tensors.

    gather_pipeline=True (default): stages > 0 send theirs to stage 0 (point to point, in buckets of
    `bucket_bytes`), and global rank 0 alone yields the whole model: one push per step.
    gather_pipeline=False: each stage's sender yields only its own layers. NOTE: that is one push per
    stage, each a partial update labelled with the same version; only use it with a sender that
    assembles the parts before the engines apply them.
    """

    def __init__(
        self,
        model: nn.Module | Sequence[nn.Module],
        hf_config: Any,
        dtype: torch.dtype | None = None,
        gather_pipeline: bool = True,
        bucket_bytes: int = 256 << 20,
    ) -> None:
        self.model = model
        self.layout = Layout.from_hf_config(hf_config)
        self.dtype = dtype
        self.gather_pipeline = gather_pipeline
        self.bucket_bytes = bucket_bytes

    @property
    def is_stage_sender(self) -> bool:
        from megatron.core import parallel_state as ps

        return (
            ps.get_tensor_model_parallel_rank() == 0
            and ps.get_data_parallel_rank(with_context_parallel=True) == 0
        )

    @property
    def is_sender(self) -> bool:
        from megatron.core import parallel_state as ps

        return self.is_stage_sender and (
            not self.gather_pipeline or ps.get_pipeline_model_parallel_rank() == 0
        )

    def named_tensors(self) -> Iterator[NamedTensor]:
        from megatron.core import parallel_state as ps

        local = self._stage_tensors()
        if not self.gather_pipeline or ps.get_pipeline_model_parallel_world_size() == 1:
            yield from local if self.is_stage_sender else _drain(local)
            return
        if not self.is_stage_sender:
            yield from _drain(local)
            return
        group = ps.get_pipeline_model_parallel_group()
        ranks = dist.get_process_group_ranks(group)
        if ps.get_pipeline_model_parallel_rank() == 0:
            yield from local
            for src in ranks[1:]:
                yield from _recv_buckets(src, group, self._device())
        else:
            _send_buckets(local, ranks[0], group, self.bucket_bytes)

    def _device(self) -> torch.device:
        chunk = self.model[0] if isinstance(self.model, (list, tuple)) else self.model
        return next(chunk.parameters()).device

    def _stage_tensors(self) -> Iterator[NamedTensor]:
        """This stage's HF tensors; every rank of the stage computes them (they are all-gathered)."""
        from megatron.core import parallel_state as ps

        params = model_params(self.model, self.layout.num_experts)
        with torch.no_grad():
            for name, p in params:  # pass 1: dense
                if name == "output_layer.weight" and self.layout.tie_word_embeddings:
                    continue  # the last stage's copy of the embedding, which stage 0 sends
                if not is_expert(name):
                    group, size, _ = _tp_of(name)
                    yield from to_hf(name, _all_gather(self._cast(p), group, size), self.layout)
            ep_group, ep_size = (
                ps.get_expert_model_parallel_group(),
                ps.get_expert_model_parallel_world_size(),
            )
            ep_rank = ps.get_expert_model_parallel_rank()
            num_local = self.layout.num_experts // ep_size if self.layout.num_experts else 0
            for name, p in params:  # pass 2: experts; EP rank r holds global experts r * num_local + i
                if is_expert(name):
                    group, size, _ = _tp_of(name)
                    shards = _all_gather(self._cast(p), group, size)  # [etp rank]
                    per_rank = [_all_gather(s, ep_group, ep_size) for s in shards]  # [etp rank][ep rank]
                    local_e = expert_index(name) - ep_rank * num_local
                    for r in range(ep_size):
                        gname = with_expert_index(name, r * num_local + local_e)
                        yield from to_hf(gname, [s[r] for s in per_rank], self.layout)

    def _cast(self, p: torch.Tensor) -> torch.Tensor:
        return p.detach() if self.dtype is None else p.detach().to(self.dtype)


def _drain(it: Iterator[NamedTensor]) -> Iterator[NamedTensor]:
    for _ in it:  # take part in the gathers, keep nothing
        pass
    return
    yield


def _send_buckets(it: Iterator[NamedTensor], dst: int, group: Any, bucket_bytes: int) -> None:
    bucket: list[NamedTensor] = []
    size = 0
    for name, t in it:
        bucket.append((name, t))
        size += t.numel() * t.element_size()
        if size >= bucket_bytes:
            _send_bucket(bucket, dst, group)
            bucket, size = [], 0
    if bucket:
        _send_bucket(bucket, dst, group)
    dist.send_object_list([None], dst=dst, group=group)  # end of this stage


def _send_bucket(bucket: list[NamedTensor], dst: int, group: Any) -> None:
    dist.send_object_list([[(n, tuple(t.shape), t.dtype) for n, t in bucket]], dst=dst, group=group)
    for _, t in bucket:
        dist.send(t.contiguous(), dst=dst, group=group)


def _recv_buckets(src: int, group: Any, device: torch.device) -> Iterator[NamedTensor]:
    while True:
        meta: list[Any] = [None]
        dist.recv_object_list(meta, src=src, group=group)
        if meta[0] is None:
            return
        for name, shape, dtype in meta[0]:
            t = torch.empty(shape, dtype=dtype, device=device)
            dist.recv(t, src=src, group=group)
            yield name, t


def load_hf_weights(
    model: nn.Module | Sequence[nn.Module], hf: Mapping[str, torch.Tensor], hf_config: Any
) -> None:
    """Copy HF-named full tensors into this rank's shards of a GPTModel, in place (every rank calls it;
    no communication). Every parameter of the model must be covered."""
    from megatron.core import parallel_state as ps

    layout = Layout.from_hf_config(hf_config)
    with torch.no_grad():
        for name, p in model_params(model, layout.num_experts):
            _, size, rank = _tp_of(name)
            padded = p.shape[0] * size if rule(name)[0] == VOCAB else None
            shard = from_hf(name, hf, layout, size, padded)[rank]
            if shard.shape != p.shape:
                raise ValueError(
                    f"{name}: HF gives a shard of shape {tuple(shard.shape)} for the "
                    f"parameter's {tuple(p.shape)} (TP {size}, PP rank "
                    f"{ps.get_pipeline_model_parallel_rank()})"
                )
            p.copy_(shard)
