"""Triton attention backend (GPU default): paged decode (split-KV) and paged extend kernels.

Rotary is fused with the KV store (fuses_rotary): one launch rotates q in place and writes rotated k and v
into the pool. Decode with few (sequence, kv head) pairs, e.g. batch 1, uses the flash-decoding layout
(a fixed number of splits per sequence, merged in the same launch) so that the grid fills the GPU.
Larger decode batches read a KV prefix shared by adjacent rows (the n samples of a prompt) once per group
when the metadata carries prefix_lens / group_lens (gyre.kernels.attention.shared_prefix_groups).
"""

from __future__ import annotations

import torch

from gyre.engine.kv_pool import KVPool
from gyre.engine.layers.attention import AttentionBackend
from gyre.kernels.attention import decode_num_splits, paged_decode_attention, paged_extend_attention, store_kv
from gyre.kernels.rotary import rotary_store_kv


class TritonBackend(AttentionBackend):
    fuses_rotary = True

    def __init__(self, pool: KVPool) -> None:
        super().__init__(pool)
        dev = pool.device
        self.num_sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 4
        # arrival counters of the small-batch decode (used while B * Hkv < 2 * SMs), zero between launches
        # NOTE: so one decode at a time per backend: launches on one stream (a graph replays in its order)
        self.decode_locks = torch.zeros(2 * self.num_sms, dtype=torch.int32, device=dev)

    def decodes_shared_prefix(self, batch_size: int) -> bool:
        """The fixed-split decode (enough (sequence, kv head) programs to fill the GPU) groups rows sharing a
        prefix; the small-batch flash-decoding layout does not."""
        return batch_size * self.pool.num_kv_heads >= self.num_sms // 4

    def forward(self, q, k, v, layer_id, scale, meta, rope=None):
        k_cache, v_cache = self.pool.k_cache[layer_id], self.pool.v_cache[layer_id]
        if rope is None:
            store_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        else:
            positions, cos_sin_cache = rope
            rotary_store_kv(q, k, v, positions, cos_sin_cache, k_cache, v_cache, meta.slot_mapping)
        ps = self.pool.page_size
        if not meta.is_decode:
            return paged_extend_attention(q, k_cache, v_cache, meta.page_table, meta.cu_seqlens_q, meta.seq_lens,
                                          ps, scale, meta.max_q_len)
        bs, num_kv_heads = q.shape[0], k_cache.shape[1]
        # H200, 8 KV heads (benchmarks/attention_kernels.py): the in-kernel split wins at batch 1 (6.2 vs
        # 10.3 us at 512 tokens, 15.9 vs 15.2 at 4096) and loses from batch 8 (56.6 vs 44.2 us at 4096)
        if self.decodes_shared_prefix(bs):  # enough programs with fixed-size splits
            return paged_decode_attention(q, k_cache, v_cache, meta.page_table, meta.seq_lens, ps, scale,
                                          prefix_lens=meta.prefix_lens, group_lens=meta.group_lens)
        # NOTE: static shapes only (bs is the graph bucket, page_table.shape[1] its fixed width)
        num_splits = decode_num_splits(bs, num_kv_heads, meta.page_table.shape[1] * ps, self.num_sms)
        return paged_decode_attention(q, k_cache, v_cache, meta.page_table, meta.seq_lens, ps, scale,
                                      num_splits=num_splits, locks=self.decode_locks)
