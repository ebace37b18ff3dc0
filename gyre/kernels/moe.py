"""Fused mixture-of-experts MLP: grouped GEMMs over (token, expert) pairs sorted by expert.

out[t] = sum_j topk_weights[t, j] * w2[e] @ (silu(w13[e, :I] @ x[t]) * (w13[e, I:] @ x[t])), e = topk_ids[t, j]

1. moe_align_block_size sorts the T*k pairs by expert and pads each expert's run to a multiple of BLOCK_M,
   so that every BLOCK_M rows of the sorted list belong to one expert.
2. _moe_gate_up_kernel: per block, gate and up tiles of x[tokens] @ w13[e].T, fused silu(gate) * up -> act.
3. _moe_down_kernel: per block, act[pairs] @ w2[e].T scaled by the pair's routing weight -> y[pair].
4. out = y.view(T, k, H).sum(1) (float32 accumulation): a fixed order, so results are deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# moe_align_block_size: a stable counting sort of the pairs by expert in three launches, parallel over
# tiles of pairs: per-tile expert counts; per-(tile, expert) output offsets (one program); scatter.


@triton.jit
def _moe_count_kernel(topk_ids_ptr, tile_counts_ptr, num_pairs, E_PAD: tl.constexpr, BLOCK: tl.constexpr):
    tile = tl.program_id(0)
    pairs = tile * BLOCK + tl.arange(0, BLOCK)
    offs_e = tl.arange(0, E_PAD)
    ids = tl.load(topk_ids_ptr + pairs, mask=pairs < num_pairs, other=-1)
    counts = tl.sum((ids[:, None] == offs_e[None, :]).to(tl.int32), 0)
    tl.store(tile_counts_ptr + tile * E_PAD + offs_e, counts)


@triton.jit
def _moe_offsets_kernel(
    tile_counts_ptr,  # [num_tiles, E_PAD] in: counts; out: where each tile's pairs of each expert start
    expert_ids_ptr,
    num_padded_ptr,
    num_tiles,
    num_blocks,
    BLOCK_M: tl.constexpr,
    E_PAD: tl.constexpr,
    CHUNK: tl.constexpr,
):
    offs_e = tl.arange(0, E_PAD)
    offs_c = tl.arange(0, CHUNK)
    counts = tl.zeros([E_PAD], tl.int32)
    for t0 in range(0, num_tiles, CHUNK):
        tiles = t0 + offs_c
        c = tl.load(
            tile_counts_ptr + tiles[:, None] * E_PAD + offs_e[None, :], mask=tiles[:, None] < num_tiles
        )
        counts += tl.sum(c, 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    padded_end = tl.cumsum(padded, 0)  # [E_PAD]
    next_row = padded_end - padded  # per expert: the row of its next pair
    for t0 in range(0, num_tiles, CHUNK):
        tiles = t0 + offs_c
        ptrs = tile_counts_ptr + tiles[:, None] * E_PAD + offs_e[None, :]
        c = tl.load(ptrs, mask=tiles[:, None] < num_tiles, other=0)
        tl.store(ptrs, next_row[None, :] + tl.cumsum(c, 0) - c, mask=tiles[:, None] < num_tiles)
        next_row += tl.sum(c, 0)
    total = tl.sum(padded, 0)
    tl.store(num_padded_ptr, total)
    for b0 in range(0, num_blocks, CHUNK * 4):
        blocks = b0 + tl.arange(0, CHUNK * 4)
        row = blocks * BLOCK_M
        expert = tl.sum(
            (padded_end[None, :] <= row[:, None]).to(tl.int32), 1
        )  # experts ending at or before row
        tl.store(expert_ids_ptr + blocks, tl.where(row < total, expert, -1), mask=blocks < num_blocks)


@triton.jit
def _moe_scatter_kernel(
    topk_ids_ptr, tile_offsets_ptr, sorted_ids_ptr, num_pairs, E_PAD: tl.constexpr, BLOCK: tl.constexpr
):
    tile = tl.program_id(0)
    pairs = tile * BLOCK + tl.arange(0, BLOCK)
    offs_e = tl.arange(0, E_PAD)
    ids = tl.load(topk_ids_ptr + pairs, mask=pairs < num_pairs, other=-1)
    onehot = (ids[:, None] == offs_e[None, :]).to(tl.int32)  # [BLOCK, E_PAD]
    rank = tl.cumsum(onehot, 0) - onehot  # earlier pairs of the same expert in this tile
    start = tl.load(tile_offsets_ptr + tile * E_PAD + offs_e)
    dest = tl.sum(onehot * (rank + start[None, :]), 1)
    tl.store(sorted_ids_ptr + dest, pairs, mask=pairs < num_pairs)


def _align_sizes(num_pairs: int, block_m: int, num_experts: int) -> int:
    # each expert with pairs pads its run by < block_m rows
    return triton.cdiv(num_pairs + min(num_experts, num_pairs) * (block_m - 1), block_m) * block_m


def moe_align_block_size(
    topk_ids: torch.Tensor, block_m: int, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_ids [T, k] -> (sorted_ids int32 [P], expert_ids int32 [P // block_m], num_padded int32 [1]).

    sorted_ids lists pair indices p = t * k + j grouped by expert (in pair order within an expert), each
    expert's run padded with the sentinel T * k up to a multiple of block_m; expert_ids[i] is the expert
    of rows i*block_m:(i+1)*block_m, -1 past num_padded. P is a static bound (T*k + E*(block_m-1),
    rounded up) and nothing syncs with the host: CUDA-graph safe. ids must be in [0, E).
    """
    assert topk_ids.dim() == 2 and topk_ids.dtype in (torch.int32, torch.int64), (
        topk_ids.shape,
        topk_ids.dtype,
    )
    assert block_m >= 1 and block_m & (block_m - 1) == 0
    topk_ids = topk_ids.contiguous()
    device = topk_ids.device
    num_pairs = topk_ids.numel()
    max_padded = _align_sizes(num_pairs, block_m, num_experts)
    sorted_ids = torch.full((max_padded,), num_pairs, dtype=torch.int32, device=device)
    expert_ids = torch.empty(max_padded // block_m, dtype=torch.int32, device=device)
    num_padded = torch.empty(1, dtype=torch.int32, device=device)
    e_pad = triton.next_power_of_2(num_experts)
    block = max(16, min(256, 8192 // e_pad))  # pairs per tile
    num_tiles = max(1, triton.cdiv(num_pairs, block))
    tile_counts = torch.empty(num_tiles, e_pad, dtype=torch.int32, device=device)
    _moe_count_kernel[(num_tiles,)](topk_ids, tile_counts, num_pairs, E_PAD=e_pad, BLOCK=block, num_warps=4)
    _moe_offsets_kernel[(1,)](
        tile_counts, expert_ids, num_padded, num_tiles, expert_ids.shape[0],
        BLOCK_M=block_m, E_PAD=e_pad, CHUNK=max(1, min(64, 4096 // e_pad)), num_warps=4,
    )  # fmt: skip
    _moe_scatter_kernel[(num_tiles,)](
        topk_ids, tile_counts, sorted_ids, num_pairs, E_PAD=e_pad, BLOCK=block, num_warps=4
    )
    return sorted_ids, expert_ids, num_padded


def moe_align_block_size_ref(
    topk_ids: torch.Tensor, block_m: int, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    num_pairs = topk_ids.numel()
    device = topk_ids.device
    flat = topk_ids.reshape(-1).to(torch.int64)  # [N] expert of pair p
    counts = torch.bincount(flat, minlength=num_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    order = torch.argsort(flat, stable=True)  # pairs by expert
    expert_of_sorted = flat[order]
    rank = torch.arange(num_pairs, device=device) - (counts.cumsum(0) - counts)[expert_of_sorted]
    max_padded = _align_sizes(num_pairs, block_m, num_experts)
    sorted_ids = torch.full((max_padded,), num_pairs, dtype=torch.int32, device=device)
    sorted_ids[(padded_end - padded)[expert_of_sorted] + rank] = order.to(torch.int32)
    block_start = torch.arange(0, max_padded, block_m, device=device)
    expert_ids = torch.searchsorted(padded_end, block_start, right=True)
    expert_ids = torch.where(block_start < padded_end[-1], expert_ids, -1).to(torch.int32)
    return sorted_ids, expert_ids, padded_end[-1:].to(torch.int32)


@triton.jit
def _moe_gate_up_kernel(
    x_ptr,
    w13_ptr,
    act_ptr,
    sorted_ids_ptr,
    expert_ids_ptr,
    num_padded_ptr,
    num_pairs,
    top_k,
    H,
    inter,
    stride_xt,
    stride_we,
    stride_wn,
    stride_at,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(expert_ids_ptr + pid_m)
    if (pid_m * BLOCK_M < tl.load(num_padded_ptr)) & (expert >= 0):
        pairs = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BM]
        mask_m = pairs < num_pairs
        tokens = (pairs // top_k).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < inter
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = x_ptr + tokens[:, None] * stride_xt + offs_k[None, :]  # [BM, BK]
        w_base = w13_ptr + expert.to(tl.int64) * stride_we
        g_ptrs = w_base + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]  # [BK, BN] gate rows
        u_ptrs = g_ptrs + inter * stride_wn  # up rows
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, H, BLOCK_K):
            mask_k = offs_k < H - k0
            a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            wg = tl.load(g_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            wu = tl.load(u_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc_g = tl.dot(a, wg, acc_g, input_precision=PRECISION)
            acc_u = tl.dot(a, wu, acc_u, input_precision=PRECISION)
            a_ptrs += BLOCK_K
            g_ptrs += BLOCK_K
            u_ptrs += BLOCK_K
        act = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
        out = act_ptr + pairs[:, None].to(tl.int64) * stride_at + offs_n[None, :]
        tl.store(out, act.to(act_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _moe_down_kernel(
    act_ptr,
    w2_ptr,
    y_ptr,
    topk_weights_ptr,
    sorted_ids_ptr,
    expert_ids_ptr,
    num_padded_ptr,
    num_pairs,
    H,
    inter,
    stride_at,
    stride_we,
    stride_wn,
    stride_yt,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(expert_ids_ptr + pid_m)
    if (pid_m * BLOCK_M < tl.load(num_padded_ptr)) & (expert >= 0):
        pairs = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        mask_m = pairs < num_pairs
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < H
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = act_ptr + pairs[:, None].to(tl.int64) * stride_at + offs_k[None, :]  # [BM, BK]
        w_ptrs = (
            w2_ptr
            + expert.to(tl.int64) * stride_we
            + offs_n[None, :].to(tl.int64) * stride_wn
            + offs_k[:, None]
        )
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, inter, BLOCK_K):
            mask_k = offs_k < inter - k0
            a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        weight = tl.load(topk_weights_ptr + pairs, mask=mask_m, other=0.0)
        acc = acc * weight[:, None]
        out = y_ptr + pairs[:, None].to(tl.int64) * stride_yt + offs_n[None, :]
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _config(num_pairs: int, num_experts: int) -> dict:
    if num_pairs <= num_experts:  # decode: about one pair per expert
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3)


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [T, H], w13 [E, 2I, H] (gate rows then up rows), w2 [E, H, I], topk_weights float32 [T, k],
    topk_ids int32/int64 [T, k] -> [T, H] in x.dtype."""
    num_tokens, hidden = x.shape
    num_experts, two_i, _ = w13.shape
    inter = two_i // 2
    top_k = topk_ids.shape[1]
    assert w13.shape == (num_experts, 2 * inter, hidden) and w2.shape == (num_experts, hidden, inter)
    assert x.dtype == w13.dtype == w2.dtype, (x.dtype, w13.dtype, w2.dtype)
    assert x.stride(1) == 1 and w13.stride(2) == 1 and w2.stride(2) == 1
    assert topk_ids.shape == (num_tokens, top_k) and topk_weights.shape == (num_tokens, top_k)
    assert topk_ids.dtype in (torch.int32, torch.int64) and topk_weights.dtype == torch.float32
    if out is None:
        out = torch.empty_like(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    num_pairs = num_tokens * top_k
    if num_pairs == 0:
        return out
    cfg = _config(num_pairs, num_experts)
    block_m = cfg["BLOCK_M"]
    sorted_ids, expert_ids, num_padded = moe_align_block_size(topk_ids, block_m, num_experts)
    weights = topk_weights.reshape(-1).contiguous()
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    act = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)
    grid = (expert_ids.shape[0], triton.cdiv(inter, cfg["BLOCK_N"]))
    _moe_gate_up_kernel[grid](
        x, w13, act, sorted_ids, expert_ids, num_padded, num_pairs, top_k, hidden, inter,
        x.stride(0), w13.stride(0), w13.stride(1), act.stride(0), PRECISION=precision, **cfg,
    )  # fmt: skip
    y = torch.empty(num_pairs, hidden, dtype=x.dtype, device=x.device)
    grid = (expert_ids.shape[0], triton.cdiv(hidden, cfg["BLOCK_N"]))
    _moe_down_kernel[grid](
        act, w2, y, weights, sorted_ids, expert_ids, num_padded, num_pairs, hidden, inter,
        act.stride(0), w2.stride(0), w2.stride(1), y.stride(0), PRECISION=precision, **cfg,
    )  # fmt: skip
    out.copy_(y.view(num_tokens, top_k, hidden).sum(dim=1, dtype=torch.float32))
    return out


def fused_moe_ref(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    inter = w13.shape[1] // 2
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(w13.shape[0]):
        tokens, slot = torch.nonzero(topk_ids == e, as_tuple=True)
        if tokens.numel() == 0:
            continue
        h = x[tokens].float() @ w13[e].float().T  # [n, 2I]
        act = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
        y = act @ w2[e].float().T  # [n, H]
        out.index_add_(0, tokens, y * topk_weights[tokens, slot, None])
    return out.to(x.dtype)
