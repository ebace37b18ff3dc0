"""Attention over the paged KV cache, behind a small backend interface.

The model runner builds one AttentionMetadata per step; every attention layer calls
`backend.forward(q, k, v, layer_id, meta)`, which stores the new K/V into the pool and attends.
Backends: "torch" (CPU, reference), "triton" (GPU default), "flashinfer" (when installed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from gyre.engine.kv_pool import KVPool


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: cache slot of each new token
    page_table: torch.Tensor  # [B, max_pages] int32
    seq_lens: torch.Tensor  # [B] int32: KV length of each sequence after this step
    cu_seqlens_q: torch.Tensor  # [B+1] int32: new tokens of sequence b are q[cu[b]:cu[b+1]]
    max_q_len: int
    seq_lens_cpu: list[int]
    q_lens_cpu: list[int]
    is_decode: bool  # every sequence has exactly one new token
    extra: dict = field(default_factory=dict)  # backend-private, filled by backend.prepare
    # decode rows whose page tables share leading pages, grouped by gyre.kernels.attention.shared_prefix_groups
    # (int32 [B] each): a backend that decodes_shared_prefix(B) reads each group's prefix once; others ignore them
    prefix_lens: torch.Tensor | None = None
    group_lens: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return len(self.seq_lens_cpu)


class AttentionBackend:
    # True: forward also takes rope=(positions [T] int64, cos_sin_cache) with q, k not yet rotated, and
    # rotates them itself (e.g. fused with the KV store); False: the layer rotates q, k before forward
    fuses_rotary = False

    def __init__(self, pool: KVPool) -> None:
        self.pool = pool

    def prepare(self, meta: AttentionMetadata) -> None:
        """Per-step work shared by all layers (index tensors, planner calls)."""

    def prepare_graph(self, meta: AttentionMetadata) -> None:
        """prepare() of a CUDA-graph decode step, run outside the graph before it is captured and before
        each replay. meta holds the graph's static buffers for its whole bucket; seq_lens_cpu has the real
        lengths, 0 on padding rows. Only state the captured kernels read from fixed addresses may change."""

    def decodes_shared_prefix(self, batch_size: int) -> bool:
        """Whether a decode batch of batch_size reads the prefix_lens / group_lens of its metadata (static
        per batch bucket, so a CUDA graph captures the choice)."""
        return False

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int, scale: float,
                meta: AttentionMetadata) -> torch.Tensor:
        raise NotImplementedError


class TorchBackend(AttentionBackend):
    """Plain torch: gather each sequence's KV slots and run SDPA with a causal offset mask."""

    def prepare(self, meta: AttentionMetadata) -> None:
        ps = self.pool.page_size
        page_table = meta.page_table.cpu()
        slots, masks = [], []
        for b, (seq_len, q_len) in enumerate(zip(meta.seq_lens_cpu, meta.q_lens_cpu)):
            pos = torch.arange(seq_len)
            s = page_table[b, pos // ps].to(torch.int64) * ps + pos % ps
            slots.append(s.to(meta.slot_mapping.device))
            prefix = seq_len - q_len
            # new token i (absolute position prefix + i) sees kv positions <= prefix + i
            mask = pos[None, :] <= (prefix + torch.arange(q_len))[:, None]
            masks.append(mask.to(meta.slot_mapping.device))
        meta.extra["kv_slots"], meta.extra["masks"] = slots, masks
        meta.extra["cu"] = meta.cu_seqlens_q.tolist()
        # slot -1: a row whose KV is not stored (padding, a masked draft row), as the GPU kernels skip it
        store = (meta.slot_mapping >= 0).nonzero()[:, 0]
        meta.extra["store"] = None if store.numel() == meta.slot_mapping.numel() else store

    def forward(self, q, k, v, layer_id, scale, meta):
        k_cache, v_cache = self.pool.k_cache[layer_id], self.pool.v_cache[layer_id]
        slot_mapping, store = meta.slot_mapping, meta.extra.get("store")
        if store is not None:
            slot_mapping, k, v = slot_mapping[store], k[store], v[store]
        k_cache.index_copy_(0, slot_mapping, k.to(k_cache.dtype))
        v_cache.index_copy_(0, slot_mapping, v.to(v_cache.dtype))
        out = torch.zeros_like(q)  # rows with no KV to read (seq_len 0) stay zero
        group = q.shape[1] // k_cache.shape[1]
        cu = meta.extra["cu"]
        for b, slots in enumerate(meta.extra["kv_slots"]):
            if slots.numel() == 0:
                continue
            qb = q[cu[b]:cu[b + 1]].transpose(0, 1)  # [Hq, q_len, D]
            kb = k_cache[slots].transpose(0, 1).repeat_interleave(group, dim=0)  # [Hq, L, D]
            vb = v_cache[slots].transpose(0, 1).repeat_interleave(group, dim=0)
            ob = F.scaled_dot_product_attention(qb, kb.to(q.dtype), vb.to(q.dtype),
                                                attn_mask=meta.extra["masks"][b], scale=scale)
            out[cu[b]:cu[b + 1]] = ob.transpose(0, 1)
        return out


def make_backend(name: str, pool: KVPool) -> AttentionBackend:
    if name == "torch":
        return TorchBackend(pool)
    if name == "triton":
        from gyre.engine.layers.triton_attention import TritonBackend

        return TritonBackend(pool)
    if name == "flashinfer":
        from gyre.engine.layers.flashinfer_attention import FlashInferBackend

        return FlashInferBackend(pool)
    raise ValueError(f"unknown attention backend {name!r}")


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, layer_id: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.layer_id = layer_id
        self.scale = head_dim**-0.5

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx, rope=None) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq * D]. rope: None (q, k already rotated) or
        (positions, cos_sin_cache) with q, k not yet rotated: only for a backend with fuses_rotary."""
        if rope is None:
            out = ctx.backend.forward(q, k, v, self.layer_id, self.scale, ctx.attn)
        else:
            out = ctx.backend.forward(q, k, v, self.layer_id, self.scale, ctx.attn, rope=rope)
        return out.reshape(q.shape[0], -1)
