"""Triton attention backend (GPU default): paged decode (split-KV) and paged extend kernels."""

from __future__ import annotations

from gyre.engine.layers.attention import AttentionBackend
from gyre.kernels.attention import paged_decode_attention, paged_extend_attention, store_kv


class TritonBackend(AttentionBackend):
    def forward(self, q, k, v, layer_id, scale, meta):
        k_cache, v_cache = self.pool.k_cache[layer_id], self.pool.v_cache[layer_id]
        store_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        ps = self.pool.page_size
        if meta.is_decode:
            return paged_decode_attention(q, k_cache, v_cache, meta.page_table, meta.seq_lens, ps, scale)
        return paged_extend_attention(q, k_cache, v_cache, meta.page_table, meta.cu_seqlens_q, meta.seq_lens, ps,
                                      scale, meta.max_q_len)
