"""Deterministic (batch-invariant) mode: `EngineConfig.deterministic = True`.

A sequence's tokens and logprobs then depend on its own tokens, weights and seed alone: not on what else
is in the batch, on chunked-prefill boundaries, on prefix-cache hits or on the CUDA-graph bucket. Every
layer computes through gyre.kernels.batch_invariant (fixed-order matmuls, norms and attention), and the
training forward (gyre.trainers.training_forward) runs the same ops, so the two agree bit for bit.

The switch is per model instance: `make_batch_invariant(model)` flags its modules, whose forward then
routes through the batch-invariant ops; `DeterministicBackend` replaces the attention backend.
"""

from __future__ import annotations

import torch
from torch import nn

from gyre.engine.kv_pool import KVPool
from gyre.engine.layers.attention import AttentionBackend, AttentionMetadata
from gyre.kernels import batch_invariant as bi
from gyre.kernels.attention import store_kv


def make_batch_invariant(model: nn.Module) -> nn.Module:
    """Route every layer of a gyre model through the batch-invariant ops (in place; returns model)."""
    for m in model.modules():
        if getattr(m, "tp_size", 1) > 1 or getattr(m, "ep_size", 1) > 1:
            # NOTE: collectives pick their algorithm (ring, tree) by message size, i.e. by the batch
            raise ValueError("deterministic mode needs tp_size = ep_size = 1")
    for m in model.modules():
        if hasattr(type(m), "batch_invariant"):
            m.batch_invariant = True
    return model


class DeterministicBackend(AttentionBackend):
    """Stores the new K/V, then attends with the batch-invariant kernels: on CUDA every query row is
    reduced over fixed KV splits (bi.paged_attention); on the CPU in fixed KV blocks (bi.cpu_attention)."""

    def __init__(self, pool: KVPool, group: int) -> None:
        super().__init__(pool)
        self.group = group  # query heads per KV head
        self._identity = torch.arange(4096, dtype=torch.int32, device=pool.device)  # decode tiles

    def prepare(self, meta: AttentionMetadata) -> None:
        q_lens, seq_lens = meta.q_lens_cpu, meta.seq_lens_cpu
        if self.pool.device.type != "cuda":
            ps = self.pool.page_size
            page_table = meta.page_table.cpu().to(torch.int64)  # [B, P]
            pos = torch.arange(bi.kv_width(max(seq_lens)))
            pages = page_table[:, (pos // ps).clamp(max=page_table.shape[1] - 1)]  # past the end: masked
            meta.extra["slot_table"] = pages * ps + pos % ps  # [B, W]
            meta.extra["row_seq"] = torch.repeat_interleave(torch.arange(len(q_lens)), torch.tensor(q_lens))
            meta.extra["row_pos"] = torch.cat([torch.arange(s - n, s) for s, n in zip(seq_lens, q_lens)])
        elif not meta.is_decode:
            cu = [0]
            for n in q_lens:
                cu.append(cu[-1] + n)
            seqs, rows = bi.build_tiles(q_lens, cu, self.group)
            tiles = torch.tensor([seqs, rows], dtype=torch.int32).pin_memory()
            meta.extra["tiles"] = tiles.to(self.pool.device, non_blocking=True)
            meta.extra["max_seq_len"] = max(seq_lens)

    def _decode_tiles(self, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
        if bs > self._identity.shape[0]:
            self._identity = torch.arange(2 * bs, dtype=torch.int32, device=self.pool.device)
        ids = self._identity[:bs]  # tile b = row b of sequence b
        return ids, ids

    def forward(self, q, k, v, layer_id, scale, meta):
        k_cache, v_cache = self.pool.k_cache[layer_id], self.pool.v_cache[layer_id]
        if not q.is_cuda:
            k_cache.index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
            v_cache.index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))
            x = meta.extra
            return bi.cpu_attention(q, k_cache, v_cache, x["slot_table"], x["row_seq"], x["row_pos"], scale)
        store_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        ps = self.pool.page_size
        tiles = meta.extra.get("tiles")
        if tiles is None:  # decode, possibly inside a CUDA graph: static shapes only
            tile_seq, tile_row = self._decode_tiles(q.shape[0])
            max_seq_len = meta.page_table.shape[1] * ps
        else:
            tile_seq, tile_row = tiles[0], tiles[1]
            max_seq_len = meta.extra["max_seq_len"]
        return bi.paged_attention(
            q, k_cache, v_cache, meta.page_table, meta.cu_seqlens_q, meta.seq_lens, ps, scale,
            tile_seq, tile_row, max_seq_len,
        )  # fmt: skip
