"""Paged attention: decode (split-KV, flash-decoding), extend (causal prefill over a cached prefix), store_kv.

KV cache layout, per layer: `k_cache`, `v_cache` [num_slots, num_kv_heads, head_dim] with
num_slots = num_pages * page_size and slot = page_id * page_size + offset_in_page. `page_table` int32
[B, max_pages] lists each sequence's pages in order; `seq_lens` int32 [B] counts every KV token of the
sequence, the new ones included (their K/V are stored before attention runs).

Kernels gather K/V token by token through the page table, so any page_size works (1, 3, 16, 64...).
Softmax runs in float32 with exp2; inputs are float32, float16 or bfloat16.

Decode splits each sequence's KV into splits, one program per (sequence, kv head, split), and merges the
partial softmaxes by their log-sum-exp. Two layouts: splits of a fixed size (default; many sequences) or
a fixed number of splits per sequence (flash-decoding, for small batches: the grid fills the GPU at
batch 1; the last split to finish merges, so it is one launch).

Shared prefix (fixed split size only): GRPO decodes n samples of a prompt whose page tables start with
the same pages (the radix prefix cache). Rows b .. b+g-1 form a group led by row b; the splits of their
common prefix are computed once by the leader, reading each K/V block once for the g rows, whose
queries are stacked as the M dimension of the dot (g * Hq/Hkv rows of tensor-core work per block).
The leader writes every group row's partials, the rows skip those splits, and the merge is unchanged.
`shared_prefix_groups` finds the groups on the host from the page table.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

# NOTE: a fixed split size (in KV tokens) keeps the decode reduction order independent of the batch,
# so a sequence's output does not depend on what else is being decoded with it.
DECODE_SPLIT_SIZE = 256
MAX_DECODE_SPLITS = 32  # num_splits bound of the flash-decoding layout (small batches)
_SHARED_PREFIX_M = 64  # query rows (group rows x query heads per kv head) of a shared-prefix program
_EVEN_BLOCK_N = 32  # KV tokens per step in that layout; its splits are whole blocks

_LOG2E = 1.4426950408889634


def _check_cache(
    k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor, seq_lens: torch.Tensor
):
    assert k_cache.dim() == 3 and v_cache.shape == k_cache.shape, (k_cache.shape, v_cache.shape)
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "K/V cache head_dim must be contiguous"
    assert v_cache.dtype == k_cache.dtype and v_cache.device == k_cache.device
    assert page_table.dim() == 2 and page_table.dtype == torch.int32, (page_table.shape, page_table.dtype)
    assert page_table.stride(-1) == 1
    assert seq_lens.dim() == 1 and seq_lens.dtype == torch.int32 and seq_lens.is_contiguous()
    assert seq_lens.shape[0] == page_table.shape[0]


def _check_out(out: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty_like(q)
    assert out.shape == q.shape and out.dtype == q.dtype and out.stride(-1) == 1, (out.shape, out.dtype)
    return out


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))  # tl.dot needs K >= 16


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # "tf32" is ignored for 16-bit inputs


# --------------------------------------------------------------------------------------------------
# store_kv


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kc_s,
    stride_kc_h,
    stride_vc_s,
    stride_vc_h,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    if slot >= 0:  # slot < 0 marks a padding token: nothing is stored
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_h[:, None] < NUM_HEADS) & (offs_d[None, :] < HEAD_DIM)
        t64 = t.to(tl.int64)
        k = tl.load(k_ptr + t64 * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
        v = tl.load(v_ptr + t64 * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
        kc = k_cache_ptr + slot * stride_kc_s + offs_h[:, None] * stride_kc_h + offs_d[None, :]
        vc = v_cache_ptr + slot * stride_vc_s + offs_h[:, None] * stride_vc_h + offs_d[None, :]
        tl.store(kc, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(vc, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """k_cache[slot_mapping[t]] = k[t] (same for v), in place. k, v: [T, Hkv, D]; slot_mapping int64 [T].

    A negative slot skips that token (padding).
    """
    num_tokens, num_heads, head_dim = k.shape
    assert v.shape == k.shape and k.stride(-1) == 1 and v.stride(-1) == 1, (k.shape, v.shape)
    assert k_cache.dim() == 3 and v_cache.shape == k_cache.shape and k_cache.shape[1:] == k.shape[1:]
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    assert slot_mapping.shape == (num_tokens,) and slot_mapping.dtype == torch.int64
    assert slot_mapping.is_contiguous()
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        NUM_HEADS=num_heads, HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=4,
    )  # fmt: skip


def store_kv_ref(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    keep = slot_mapping >= 0
    k_cache.index_copy_(0, slot_mapping[keep], k[keep].to(k_cache.dtype))
    v_cache.index_copy_(0, slot_mapping[keep], v[keep].to(v_cache.dtype))


# --------------------------------------------------------------------------------------------------
# decode: stage 1 computes one partial softmax per (sequence, kv head, split); the splits are merged by
# a second kernel (fixed split size) or by the last split of each (sequence, kv head) to finish (a fixed
# number of splits: the flash-decoding layout for small batches)


def decode_num_splits(batch: int, num_kv_heads: int, max_seq_len: int, num_sms: int) -> int:
    """Splits per sequence for `paged_decode_attention(num_splits=...)`: about two (sequence, kv head,
    split) programs per SM. Static arguments only (batch bucket, heads, page-table width), so the grid
    of a CUDA graph is fixed; each sequence then cuts its own length into that many splits."""
    target = triton.cdiv(2 * num_sms, max(1, batch * num_kv_heads))
    return max(1, min(target, MAX_DECODE_SPLITS, triton.cdiv(max_seq_len, _EVEN_BLOCK_N)))


def shared_prefix_max_rows(group: int) -> int:
    """The most rows a shared-prefix group may hold at GQA group size `group` (= Hq // Hkv)."""
    return max(1, _SHARED_PREFIX_M // group)


def shared_prefix_groups(
    page_table: torch.Tensor,
    seq_lens: list[int],
    page_size: int,
    max_rows: int,
    multiple: int = 1,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(prefix_lens, group_lens) for `paged_decode_attention`, or None when no group saves anything.

    page_table: the host int32 [B, W] table (a row's entries past its pages are padding). Groups are
    runs of adjacent rows whose first pages are the same page ids; a group's prefix is the tokens of
    those pages, capped by its shortest row and rounded down to a multiple of `multiple`. Greedy, left to right: the
    prefix a row shares with the next one is its group's prefix; the group takes following rows while
    they share all of it and it has fewer than max_rows rows; the next row starts the next group. A
    row that shares less with the next row than that row shares with its own next one stays plain, so
    that it does not cap the prefix of the group the next row leads (the rows of one prompt after a
    group cut at max_rows). Groups of one row, and rows of seq_len 0, are left plain (prefix 0).
    """
    batch = page_table.shape[0]
    assert page_table.dim() == 2 and page_table.dtype == torch.int32 and len(seq_lens) == batch
    assert page_table.device.type == "cpu" and max_rows >= 1 and multiple >= 1
    if batch < 2 or max_rows < 2:
        return None
    # numpy: a fraction of torch's per-op overhead at these sizes (B 1024 x W 512 in well under 1 ms)
    table = page_table.numpy()
    lens = np.array(seq_lens, dtype=np.int64)
    width = min(table.shape[1], -(-int(lens.max()) // page_size))  # the pages any row uses
    differs = np.empty((batch - 1, width + 1), dtype=bool)  # rows b and b + 1, by page; a sentinel column
    np.not_equal(table[1:, :width], table[:-1, :width], out=differs[:, :width])
    differs[:, width] = True
    # tokens rows b and b + 1 share; capped by both lens, so matching padding never counts
    tokens = np.minimum(differs.argmax(1) * page_size, np.minimum(lens[1:], lens[:-1]))
    shared = np.concatenate([tokens // multiple * multiple, [0, 0]])  # [B + 1]: pair b, then pads
    run_starts = np.flatnonzero(shared[1:] != shared[:-1]) + 1
    bounds = np.concatenate([[0], run_starts, [batch + 1]])
    run_end = np.repeat(bounds[1:], np.diff(bounds)).tolist()  # [b]: the first pair after b's run of equals
    shared = shared.tolist()
    # NOTE: the loop steps over runs of equal shares, not rows: a few hundred steps at B = 1024
    sizes, prefixes, leader = [], [], 0  # consecutive segments of rows: a group or plain rows
    while leader < batch:
        prefix, end = shared[leader], leader + 1
        if prefix == 0:
            end = min(run_end[leader], batch)  # rows up to the next nonzero share are plain
        elif prefix >= shared[leader + 1]:
            limit = min(leader + max_rows, batch)
            while end < limit and shared[end - 1] >= prefix:
                end = min(run_end[end - 1] + 1, limit)
        sizes.append(end - leader)
        prefixes.append(prefix if end - leader > 1 else 0)
        leader = end
    sizes_np, prefixes_np = np.array(sizes), np.array(prefixes)
    if not prefixes_np.any():
        return None
    prefix_lens = np.repeat(prefixes_np, sizes_np).astype(np.int32)
    group_lens = np.zeros(batch, dtype=np.int32)
    group_lens[np.cumsum(sizes_np) - sizes_np] = np.where(prefixes_np > 0, sizes_np, 0)
    return torch.from_numpy(prefix_lens), torch.from_numpy(group_lens)


@triton.jit
def _merge_splits(
    mid_o_ptr,
    mid_lse_ptr,
    o_ptr,
    b,
    kv_head,
    num_splits,
    stride_mob,
    stride_moh,
    stride_mos,
    stride_mlb,
    stride_mlh,
    stride_ob,
    stride_oh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """o[b, the GROUP heads of kv_head] = the merge of partials [0, num_splits); zeros when there are none."""
    offs_g = tl.arange(0, BLOCK_G)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < GROUP
    mask_d = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_g
    b64 = b.to(tl.int64)
    ml = mid_lse_ptr + b64 * stride_mlb + heads[:, None] * stride_mlh  # [BLOCK_G, 1]
    mo = mid_o_ptr + b64 * stride_mob + heads[:, None, None] * stride_moh + offs_d[None, None, :]
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        s = s0 + offs_s
        mask_gs = mask_g[:, None] & (s[None, :] < num_splits)
        # .cg: read through L2, these were written by other programs of this launch
        lse = tl.load(ml + s[None, :], mask=mask_gs, other=float("-inf"), cache_modifier=".cg")  # [G, S]
        o = tl.load(
            mo + s[None, :, None] * stride_mos,
            mask=mask_gs[:, :, None] & mask_d[None, None, :],
            other=0.0,
            cache_modifier=".cg",
        )  # [BLOCK_G, BLOCK_S, BLOCK_D]
        m_new = tl.maximum(m, tl.max(lse, 1))
        m_new = tl.where(m_new > float("-inf"), m_new, 0.0)  # padded heads: keep exp2 args finite
        alpha = tl.exp2(m - m_new)
        w = tl.exp2(lse - m_new[:, None])  # [BLOCK_G, BLOCK_S], 0 for masked splits
        acc = acc * alpha[:, None] + tl.sum(o * w[:, :, None], 1)
        l_sum = l_sum * alpha + tl.sum(w, 1)
        m = m_new
    out = acc / tl.where(l_sum > 0.0, l_sum, 1.0)[:, None]  # no splits (seq_len 0, a padded row): zeros
    o = o_ptr + b64 * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
    tl.store(o, out.to(o_ptr.dtype.element_ty), mask=mask_g[:, None] & mask_d[None, :])


@triton.jit
def _decode_split_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    page_table_ptr,
    seq_lens_ptr,
    mid_o_ptr,  # [B, Hq, S, D] float32
    mid_lse_ptr,  # [B, Hq, S] float32, log2 units
    o_ptr,  # [B, Hq, D]: written here when SPLIT_SIZE == 0
    prefix_lens_ptr,  # [B] int32, read when SHARED_PREFIX: splits below it are the group leader's
    lock_ptr,  # [B * Hkv] int32 arrival counters, zero before and after a launch (SPLIT_SIZE == 0)
    qk_scale,  # sm_scale * log2(e)
    page_size,
    num_splits,
    stride_qb,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    stride_pt,
    stride_mob,
    stride_moh,
    stride_mos,
    stride_mlb,
    stride_mlh,
    stride_ob,
    stride_oh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT_SIZE: tl.constexpr,  # > 0: fixed split size; 0: num_splits even splits, merged in the epilogue
    MERGE_G: tl.constexpr,
    MERGE_S: tl.constexpr,
    PRECISION: tl.constexpr,
    SHARED_PREFIX: tl.constexpr,  # (SPLIT_SIZE > 0 only) skip the splits _decode_shared_prefix_kernel writes
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    if SPLIT_SIZE > 0:
        split_size = SPLIT_SIZE
    else:  # whole blocks, so that every split but the last is full
        split_size = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * split_size
    end = tl.minimum(start + split_size, seq_len)
    empty = False  # this split lies in the row's prefix but is merged as the row's own: an empty partial
    if SHARED_PREFIX:  # the group leader computed positions < prefix (_decode_shared_prefix_kernel)
        prefix = tl.load(prefix_lens_ptr + b)
        empty = (start < prefix) & (prefix < start + split_size) & (prefix == seq_len)
        start = tl.maximum(start, prefix)
    if start < end:
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        mask_g = offs_g < GROUP
        mask_d = offs_d < HEAD_DIM
        heads = kv_head * GROUP + offs_g  # the query heads sharing this kv head
        q = tl.load(
            q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
            mask=mask_g[:, None] & mask_d[None, :],
            other=0.0,
        )  # [BLOCK_G, BLOCK_D]
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        pt_row = page_table_ptr + b.to(tl.int64) * stride_pt
        for n0 in range(start, end, BLOCK_N):
            pos = n0 + tl.arange(0, BLOCK_N)
            mask_n = pos < end
            page = tl.load(pt_row + pos // page_size, mask=mask_n, other=0).to(tl.int64)
            slot = page * page_size + pos % page_size
            kv_mask = mask_n[:, None] & mask_d[None, :]
            k = tl.load(
                k_cache_ptr + slot[:, None] * stride_ks + kv_head * stride_kh + offs_d[None, :],
                mask=kv_mask,
                other=0.0,
            )  # [BLOCK_N, BLOCK_D]
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BLOCK_G, BLOCK_N]
            qk = tl.where(mask_n[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))  # finite: every block holds a valid token
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(
                v_cache_ptr + slot[:, None] * stride_vs + kv_head * stride_vh + offs_d[None, :],
                mask=kv_mask,
                other=0.0,
            )
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        mo = mid_o_ptr + b.to(tl.int64) * stride_mob + heads[:, None] * stride_moh + split * stride_mos
        tl.store(mo + offs_d[None, :], acc / l_i[:, None], mask=mask_g[:, None] & mask_d[None, :])
        ml = mid_lse_ptr + b.to(tl.int64) * stride_mlb + heads * stride_mlh + split
        tl.store(ml, m_i + tl.log2(l_i), mask=mask_g)
        if SPLIT_SIZE == 0:  # the last split of this (sequence, kv head) to finish merges them all
            lock = lock_ptr + b * tl.num_programs(1) + kv_head
            # NOTE: the barrier orders every thread's partial stores before the release of the atomic;
            # the acquire (and .cg loads in the merge) make the other programs' partials visible
            tl.debug_barrier()
            arrived = tl.atomic_add(lock, 1, sem="acq_rel")
            if arrived == tl.cdiv(seq_len, split_size) - 1:
                tl.store(lock, 0)  # zero again for the next launch
                _merge_splits(
                    mid_o_ptr, mid_lse_ptr, o_ptr, b, kv_head, tl.cdiv(seq_len, split_size),
                    stride_mob, stride_moh, stride_mos, stride_mlb, stride_mlh, stride_ob, stride_oh,
                    GROUP, HEAD_DIM, MERGE_G, MERGE_S, BLOCK_D,
                )  # fmt: skip
    elif SPLIT_SIZE == 0 and split == 0:  # seq_len == 0 (a padded row): zeros
        _merge_splits(
            mid_o_ptr, mid_lse_ptr, o_ptr, b, kv_head, 0,
            stride_mob, stride_moh, stride_mos, stride_mlb, stride_mlh, stride_ob, stride_oh,
            GROUP, HEAD_DIM, MERGE_G, MERGE_S, BLOCK_D,
        )  # fmt: skip
    if empty:
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        mask_g = offs_g < GROUP
        heads = kv_head * GROUP + offs_g
        mo = mid_o_ptr + b.to(tl.int64) * stride_mob + heads[:, None] * stride_moh + split * stride_mos
        tl.store(mo + offs_d[None, :], tl.zeros([BLOCK_G, BLOCK_D], tl.float32),
                 mask=mask_g[:, None] & (offs_d[None, :] < HEAD_DIM))
        ml = mid_lse_ptr + b.to(tl.int64) * stride_mlb + heads * stride_mlh + split
        tl.store(ml, tl.full([BLOCK_G], float("-inf"), tl.float32), mask=mask_g)


@triton.jit
def _decode_shared_prefix_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    page_table_ptr,
    seq_lens_ptr,
    prefix_lens_ptr,  # [B] int32
    group_lens_ptr,  # [B] int32: g > 0 leads rows b .. b+g-1, 0 otherwise
    mid_o_ptr,  # [B, Hq, S, D] float32
    mid_lse_ptr,  # [B, Hq, S] float32, log2 units
    qk_scale,  # sm_scale * log2(e)
    page_size,
    stride_qb,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    stride_pt,
    stride_mob,
    stride_moh,
    stride_mos,
    stride_mlb,
    stride_mlh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT_SIZE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """The partials of one prefix split for every row of a group, the K/V read once (leader's pages). A
    split the prefix ends inside is written to each row's extra partial, index cdiv(seq_len, SPLIT_SIZE)
    (the row's own program computes the rest of that split)."""
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_rows = tl.load(group_lens_ptr + b)
    prefix = tl.load(prefix_lens_ptr + b)
    start = split * SPLIT_SIZE
    if (num_rows > 0) & (start < prefix):
        end = tl.minimum(start + SPLIT_SIZE, prefix)
        offs_m = tl.arange(0, BLOCK_M)  # m = row_in_group * GROUP + head_in_group
        offs_d = tl.arange(0, BLOCK_D)
        mask_m = offs_m < num_rows * GROUP
        mask_d = offs_d < HEAD_DIM
        rows = (b + offs_m // GROUP).to(tl.int64)
        heads = kv_head * GROUP + offs_m % GROUP
        q = tl.load(
            q_ptr + rows[:, None] * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
            mask=mask_m[:, None] & mask_d[None, :],
            other=0.0,
        )  # [BLOCK_M, BLOCK_D]
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        pt_row = page_table_ptr + b.to(tl.int64) * stride_pt
        for n0 in range(start, end, BLOCK_N):
            pos = n0 + tl.arange(0, BLOCK_N)
            mask_n = pos < end
            page = tl.load(pt_row + pos // page_size, mask=mask_n, other=0).to(tl.int64)
            slot = page * page_size + pos % page_size
            kv_mask = mask_n[:, None] & mask_d[None, :]
            k = tl.load(
                k_cache_ptr + slot[:, None] * stride_ks + kv_head * stride_kh + offs_d[None, :],
                mask=kv_mask,
                other=0.0,
            )  # [BLOCK_N, BLOCK_D]
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
            qk = tl.where(mask_n[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(
                v_cache_ptr + slot[:, None] * stride_vs + kv_head * stride_vh + offs_d[None, :],
                mask=kv_mask,
                other=0.0,
            )
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        # a whole split is the rows' split `split`; the prefix's last, partial one their extra partial
        extra = tl.cdiv(tl.load(seq_lens_ptr + rows, mask=mask_m, other=0), SPLIT_SIZE)
        part = tl.where(end == start + SPLIT_SIZE, split, extra)  # [BLOCK_M]
        mo = mid_o_ptr + rows[:, None] * stride_mob + heads[:, None] * stride_moh + part[:, None] * stride_mos
        tl.store(mo + offs_d[None, :], acc / l_i[:, None], mask=mask_m[:, None] & mask_d[None, :])
        ml = mid_lse_ptr + rows * stride_mlb + heads * stride_mlh + part
        tl.store(ml, m_i + tl.log2(l_i), mask=mask_m)


@triton.jit
def _decode_reduce_kernel(
    mid_o_ptr,
    mid_lse_ptr,
    o_ptr,
    seq_lens_ptr,
    prefix_lens_ptr,  # read when SHARED_PREFIX: a prefix ending inside a split adds an extra partial
    stride_mob,
    stride_moh,
    stride_mos,
    stride_mlb,
    stride_mlh,
    stride_ob,
    stride_oh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLIT_SIZE: tl.constexpr,
    SHARED_PREFIX: tl.constexpr,
):
    b = tl.program_id(0)
    num_splits = tl.cdiv(tl.load(seq_lens_ptr + b), SPLIT_SIZE)
    if SHARED_PREFIX:
        num_splits += (tl.load(prefix_lens_ptr + b) % SPLIT_SIZE != 0).to(tl.int32)
    _merge_splits(
        mid_o_ptr, mid_lse_ptr, o_ptr, b, tl.program_id(1), num_splits,
        stride_mob, stride_moh, stride_mos, stride_mlb, stride_mlh, stride_ob, stride_oh,
        GROUP, HEAD_DIM, BLOCK_G, BLOCK_S, BLOCK_D,
    )  # fmt: skip


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    sm_scale: float,
    max_seq_len: int | None = None,
    split_size: int = DECODE_SPLIT_SIZE,
    num_splits: int | None = None,
    locks: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    prefix_lens: torch.Tensor | None = None,
    group_lens: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query token per sequence. q [B, Hq, D] -> out [B, Hq, D] (q.dtype).

    Default: splits of split_size KV tokens (the reduction order of a sequence does not depend on the
    batch), grid sized by max_seq_len (optional host int; by default page_table.shape[1] * page_size,
    which needs no device sync: CUDA-graph safe), merged by a second kernel.
    num_splits (see decode_num_splits): flash-decoding for small batches. Each sequence is cut into at
    most num_splits splits of whole 32-token blocks; the last split of each (sequence, kv head) to
    finish merges them, so the attention is one launch. locks: int32 [>= B * Hkv] zeros (left zeroed;
    allocated when None). out: optional preallocated [B, Hq, D] output.
    prefix_lens, group_lens (fixed split size only; int32 [B], see shared_prefix_groups): group_lens[b]
    = g > 0 makes row b the leader of rows b .. b+g-1 (g <= shared_prefix_max_rows(Hq // Hkv)), which
    all have prefix_lens[b] (<= their seq_lens) and the same page ids over positions [0, prefix_lens[b]);
    the leader computes the partials of their prefix splits once for all (a split the prefix ends inside:
    the leader's part is merged as one more partial of each row).
    Every row with prefix_lens > 0 must be in a group. Same result as without them.
    """
    batch, num_q_heads, head_dim = q.shape
    _check_cache(k_cache, v_cache, page_table, seq_lens)
    num_kv_heads = k_cache.shape[1]
    assert q.stride(-1) == 1 and q.dtype == k_cache.dtype and q.device == k_cache.device
    assert k_cache.shape[2] == head_dim and num_q_heads % num_kv_heads == 0, (q.shape, k_cache.shape)
    assert page_table.shape[0] == batch and k_cache.shape[0] % page_size == 0
    assert split_size >= 16 and split_size & (split_size - 1) == 0, "split_size: a power of 2 >= 16"
    group = num_q_heads // num_kv_heads
    out = _check_out(out, q)
    shared_prefix = prefix_lens is not None
    assert (group_lens is not None) == shared_prefix, "prefix_lens and group_lens go together"
    if shared_prefix:
        assert num_splits is None, "shared prefixes need the fixed split size"
        for t in (prefix_lens, group_lens):
            assert t.shape == (batch,) and t.dtype == torch.int32 and t.is_contiguous(), (t.shape, t.dtype)
            assert t.device == q.device
    if batch == 0:
        return out
    block_d = _block_d(head_dim)
    merge_g = triton.next_power_of_2(group)
    merge_s = max(1, 8192 // (merge_g * block_d))  # partials merged per step: <= 8K floats in registers
    if num_splits is None:
        if max_seq_len is None:
            max_seq_len = page_table.shape[1] * page_size
        grid_splits = max(1, triton.cdiv(max_seq_len, split_size))
        block_n, kernel_split_size = min(64 if block_d <= 128 else 32, split_size), split_size
    else:
        assert 1 <= num_splits <= MAX_DECODE_SPLITS, num_splits
        if locks is None:
            locks = torch.zeros(batch * num_kv_heads, dtype=torch.int32, device=q.device)
        assert locks.dtype == torch.int32 and locks.is_contiguous() and locks.numel() >= batch * num_kv_heads
        assert locks.device == q.device
        grid_splits, block_n, kernel_split_size = num_splits, _EVEN_BLOCK_N, 0
        merge_s = min(merge_s, triton.next_power_of_2(num_splits))
    slots = grid_splits + shared_prefix  # a prefix ending inside a split adds a partial past a row's splits
    mid_o = torch.empty(batch, num_q_heads, slots, head_dim, dtype=torch.float32, device=q.device)
    mid_lse = torch.empty(batch, num_q_heads, slots, dtype=torch.float32, device=q.device)
    strides = (mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
               out.stride(0), out.stride(1))  # fmt: skip
    if shared_prefix:
        block_m = max(16, triton.next_power_of_2(shared_prefix_max_rows(group) * group))
        _decode_shared_prefix_kernel[(batch, num_kv_heads, grid_splits)](
            q, k_cache, v_cache, page_table, seq_lens, prefix_lens, group_lens, mid_o, mid_lse,
            sm_scale * _LOG2E, page_size,
            q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
            page_table.stride(0), *strides[:5],
            GROUP=group, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_N=block_n,
            SPLIT_SIZE=split_size, PRECISION=_precision(q.dtype),
            num_warps=4 if block_m * block_d <= 64 * 128 else 8, num_stages=2,
        )  # fmt: skip
    _decode_split_kernel[(batch, num_kv_heads, grid_splits)](
        q, k_cache, v_cache, page_table, seq_lens, mid_o, mid_lse, out,
        prefix_lens if shared_prefix else seq_lens,  # (unused without shared prefixes)
        locks if locks is not None else seq_lens,  # (unused with a fixed split size)
        sm_scale * _LOG2E, page_size, grid_splits,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        page_table.stride(0), *strides,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_D=block_d,
        BLOCK_N=block_n, SPLIT_SIZE=kernel_split_size, MERGE_G=merge_g, MERGE_S=merge_s,
        PRECISION=_precision(q.dtype), SHARED_PREFIX=shared_prefix, num_warps=4, num_stages=2,
    )  # fmt: skip
    if num_splits is None:
        _decode_reduce_kernel[(batch, num_kv_heads)](
            mid_o, mid_lse, out, seq_lens, prefix_lens if shared_prefix else seq_lens, *strides,
            GROUP=group, HEAD_DIM=head_dim, BLOCK_G=merge_g, BLOCK_S=merge_s, BLOCK_D=block_d,
            SPLIT_SIZE=split_size, SHARED_PREFIX=shared_prefix, num_warps=4,
        )  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------------
# extend: new tokens of each sequence attend to the cached prefix and causally to each other


@triton.jit
def _extend_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    o_ptr,
    page_table_ptr,
    cu_seqlens_q_ptr,
    seq_lens_ptr,
    qk_scale,
    page_size,
    stride_qt,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_pt,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    head = tl.program_id(1)
    m_block = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q_ptr + b)
    q_len = tl.load(cu_seqlens_q_ptr + b + 1) - q_start
    if m_block * BLOCK_M < q_len:
        seq_len = tl.load(seq_lens_ptr + b)
        prefix_len = seq_len - q_len
        kv_head = head // GROUP
        offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)  # index among this sequence's new tokens
        offs_d = tl.arange(0, BLOCK_D)
        mask_m = offs_m < q_len
        mask_d = offs_d < HEAD_DIM
        rows = (q_start + offs_m).to(tl.int64)
        q = tl.load(
            q_ptr + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
            mask=mask_m[:, None] & mask_d[None, :],
            other=0.0,
        )  # [BLOCK_M, BLOCK_D]
        q_pos = prefix_len + offs_m  # absolute position of each new token
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        kv_end = tl.minimum(seq_len, prefix_len + (m_block + 1) * BLOCK_M)
        pt_row = page_table_ptr + b.to(tl.int64) * stride_pt
        for n0 in range(0, kv_end, BLOCK_N):
            pos = n0 + tl.arange(0, BLOCK_N)
            mask_n = pos < kv_end
            page = tl.load(pt_row + pos // page_size, mask=mask_n, other=0).to(tl.int64)
            slot = page * page_size + pos % page_size
            kv_mask = mask_n[:, None] & mask_d[None, :]
            k = tl.load(
                k_cache_ptr + slot[:, None] * stride_ks + kv_head * stride_kh + offs_d[None, :],
                mask=kv_mask,
                other=0.0,
            )
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
            # NOTE: position 0 is visible to every row, so each row's running max is finite after block 0
            visible = mask_n[None, :] & (pos[None, :] <= q_pos[:, None])
            qk = tl.where(visible, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(
                v_cache_ptr + slot[:, None] * stride_vs + kv_head * stride_vh + offs_d[None, :],
                mask=kv_mask,
                other=0.0,
            )
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        out = acc / l_i[:, None]
        o = o_ptr + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
        tl.store(o, out.to(o_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def paged_extend_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    sm_scale: float,
    max_q_len: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention for new tokens. q [T, Hq, D] -> out [T, Hq, D] (q.dtype).

    Sequence b owns q rows cu_seqlens_q[b]:cu_seqlens_q[b+1] (q_len of them), the last q_len of its
    seq_lens[b] KV tokens; new token i sees KV positions <= seq_lens[b] - q_len + i. max_q_len (host
    int) must be >= every q_len; it sizes the grid. out: optional preallocated [T, Hq, D] output.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    _check_cache(k_cache, v_cache, page_table, seq_lens)
    batch = seq_lens.shape[0]
    num_kv_heads = k_cache.shape[1]
    assert q.stride(-1) == 1 and q.dtype == k_cache.dtype and q.device == k_cache.device
    assert k_cache.shape[2] == head_dim and num_q_heads % num_kv_heads == 0, (q.shape, k_cache.shape)
    assert cu_seqlens_q.shape == (batch + 1,) and cu_seqlens_q.dtype == torch.int32
    assert cu_seqlens_q.is_contiguous() and k_cache.shape[0] % page_size == 0
    out = _check_out(out, q)
    if num_tokens == 0 or batch == 0 or max_q_len == 0:
        return out
    block_d = _block_d(head_dim)
    block_m = 64 if block_d <= 128 else 32
    block_n = 64 if block_d <= 64 else 32
    grid = (batch, num_q_heads, triton.cdiv(max_q_len, block_m))
    _extend_kernel[grid](
        q, k_cache, v_cache, out, page_table, cu_seqlens_q, seq_lens,
        sm_scale * _LOG2E, page_size,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        out.stride(0), out.stride(1), page_table.stride(0),
        GROUP=num_q_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=_precision(q.dtype),
        num_warps=4, num_stages=2,
    )  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------------
# torch references: gather each sequence's K/V, softmax in float32


def _gather_kv(k_cache, v_cache, page_table, b: int, seq_len: int, page_size: int):
    pos = torch.arange(seq_len, device=k_cache.device)
    slots = page_table[b, pos // page_size].long() * page_size + pos % page_size
    return k_cache[slots].float(), v_cache[slots].float()  # [S, Hkv, D]


def _attend(q, k, v, sm_scale: float, mask: torch.Tensor | None) -> torch.Tensor:
    # q [M, Hq, D] float32; k, v [S, Hkv, D]; mask [M, S] True = visible
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("mhd,shd->hms", q, k) * sm_scale
    if mask is not None:
        scores = scores.masked_fill(~mask[None], float("-inf"))
    return torch.einsum("hms,shd->mhd", scores.softmax(-1), v)


def paged_decode_attention_ref(q, k_cache, v_cache, page_table, seq_lens, page_size, sm_scale):
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for b in range(q.shape[0]):
        seq_len = int(seq_lens[b])
        if seq_len > 0:
            k, v = _gather_kv(k_cache, v_cache, page_table, b, seq_len, page_size)
            out[b] = _attend(q[b : b + 1].float(), k, v, sm_scale, None)[0]
    return out.to(q.dtype)


def paged_extend_attention_ref(q, k_cache, v_cache, page_table, cu_seqlens_q, seq_lens, page_size, sm_scale):
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for b in range(seq_lens.shape[0]):
        start, end = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        seq_len, q_len = int(seq_lens[b]), end - start
        if q_len == 0:
            continue
        k, v = _gather_kv(k_cache, v_cache, page_table, b, seq_len, page_size)
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]
        out[start:end] = _attend(q[start:end].float(), k, v, sm_scale, mask)
    return out.to(q.dtype)
