"""Batch-invariant ops: every output row is computed by the same instructions in the same order whatever
else is computed with it, so a token's numbers do not depend on the batch, on chunk boundaries, on
prefix-cache hits or on a CUDA-graph bucket. The engine's deterministic mode and the training forward
(gyre.trainers.training_forward) both run these, so their logprobs agree bit for bit.

GPU (Triton):
- `linear`: one matmul kernel whose configuration depends on the weight's shape only (never on the row
  count M): fixed tiles, no split-K, K reduced in one fixed order.
- `paged_attention`: every query row, prefill or decode, is reduced over KV splits of SPLIT_SIZE
  positions (absolute, from 0), each split in BLOCK_N blocks with an online softmax, then the splits are
  merged in order. One pair of kernels with one configuration serves decode, chunked prefill and the
  training forward; a program handles a tile of TILE_ROWS = 16 (token, query head) rows of one sequence.
- rms_norm, rotary, silu_and_mul, logprobs: the existing one-program-per-row kernels (already invariant).
CPU (torch, float32):
- matmuls run on zero-padded tiles of CPU_TILE rows in fresh buffers: a fixed GEMM shape per weight
  (MKL/oneDNN pick their blocking by shape; a bare F.linear gives a row different bits for different M;
  within a tile a row's bits do not depend on its place, which tests/engine/test_deterministic.py checks).
- sums use a fixed pairwise tree; attention uses no GEMM library at all (trees over D, KV blocks at
  absolute positions).
- NOTE: only IEEE-exact elementwise ops (+ - * / sqrt) and the VML-backed exp are used: ATen computes
  the tail of a vectorised loop with scalar code, and for silu/rsqrt the scalar and vector results differ,
  so where an element lands (which depends on the tensor's size) would change its bits.
Every op here is differentiable (autograd Functions whose backward uses ordinary torch math).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from gyre.kernels.activation import silu_and_mul as silu_and_mul_gpu
from gyre.kernels.norm import rms_norm as rms_norm_gpu
from gyre.kernels.rotary import apply_rotary, apply_rotary_ref
from gyre.kernels.sampling import logprobs_of, logprobs_of_ref

CPU_TILE = 16  # rows per CPU matmul / attention tile
CPU_KV_BLOCK = 64  # KV positions per CPU attention block
SPLIT_SIZE = 256  # KV positions per GPU attention split
TILE_ROWS = 16  # (token, query head) rows per GPU attention program
_LOG2E = 1.4426950408889634
_MID_BYTES = 512 << 20  # bound on the attention split workspace of one launch
_CPU_ATTN_BYTES = 64 << 20  # bound on one CPU attention chunk's [rows, W, Hq, D] products


# --------------------------------------------------------------------------------------------------
# CPU primitives


def tree_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim in a fixed pairwise order (elementwise adds only): [..., n] -> [...]."""
    n = x.shape[-1]
    width = 1 << max(n - 1, 0).bit_length()
    if width != n:
        x = F.pad(x, (0, width - n))
    while width > 1:
        width //= 2
        x = x[..., :width] + x[..., width:]
    return x[..., 0]


def _linear_cpu(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    m, k = x.shape
    out = x.new_empty(m, weight.shape[0])
    for s in range(0, m, CPU_TILE):
        rows = min(CPU_TILE, m - s)
        tile = x.new_zeros(CPU_TILE, k)  # fresh, aligned, same shape every call
        tile[:rows] = x[s : s + rows]
        out[s : s + rows] = F.linear(tile, weight)[:rows]
    return out


def _rms_norm_cpu(x, weight, eps, residual=None):
    if residual is not None:
        x = x + residual
    xf = x.float()
    rstd = 1.0 / torch.sqrt(tree_sum(xf * xf) / xf.shape[-1] + eps)
    normed = (xf * rstd[..., None]).to(x.dtype)
    out = (weight.float() * normed.float()).to(x.dtype)
    return out if residual is None else (out, x)


def _silu_and_mul_cpu(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.float().chunk(2, dim=-1)
    return (gate / (1.0 + torch.exp(-gate)) * up).to(x.dtype)


def _block_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim (a multiple of CPU_KV_BLOCK): a tree within each block, blocks in order."""
    parts = tree_sum(x.unflatten(-1, (-1, CPU_KV_BLOCK)))
    out = parts[..., 0]
    for j in range(1, parts.shape[-1]):
        out = out + parts[..., j]
    return out


def cpu_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_table: torch.Tensor,
    row_seq: torch.Tensor,
    row_pos: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention on the CPU. q [T, Hq, D]: row t is the token at position row_pos[t] of sequence
    row_seq[t], whose position i has its K/V at k_cache/v_cache[slot_table[seq, i]] ([S, Hkv, D]).
    slot_table [B, W]: W a multiple of CPU_KV_BLOCK, > every row_pos; entries past a sequence's end are
    any valid slot (they are masked).

    Elementwise products and fixed-order sums only (no GEMM library): dot products are trees over D,
    softmax sums and the weighted sum of V are trees within KV blocks of CPU_KV_BLOCK absolute positions
    with the blocks added in order, so positions a row cannot see add exact zeros whatever W is."""
    num_tokens, num_q_heads, _ = q.shape
    group = num_q_heads // k_cache.shape[1]
    width = slot_table.shape[1]
    assert width % CPU_KV_BLOCK == 0
    if num_tokens == 0:
        return torch.empty_like(q)
    chunk = max(1, _CPU_ATTN_BYTES // (4 * width * q[0].numel()))  # rows are independent: bound the memory
    outs = []
    for s in range(0, num_tokens, chunk):
        idx = slot_table[row_seq[s : s + chunk]]  # [r, W]
        k = k_cache[idx].repeat_interleave(group, 2)  # [r, W, Hq, D]
        v = v_cache[idx].repeat_interleave(group, 2)
        scores = (tree_sum(q[s : s + chunk, None] * k) * scale).transpose(1, 2)  # [r, Hq, W]
        visible = torch.arange(width, device=q.device)[None, :] <= row_pos[s : s + chunk, None]
        scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
        p = torch.exp(scores - scores.amax(-1, keepdim=True))
        o = _block_sum(p[:, :, None, :] * v.permute(0, 2, 3, 1))  # [r, Hq, D]
        outs.append(o / _block_sum(p)[..., None])
    return torch.cat(outs)


def kv_width(max_len: int) -> int:
    """The width of a CPU slot table holding max_len positions."""
    return max(1, -(-max_len // CPU_KV_BLOCK)) * CPU_KV_BLOCK


# --------------------------------------------------------------------------------------------------
# GPU matmul: y = x @ w.T (+ b), one configuration per weight shape


@triton.jit(do_not_specialize=["M"])
def _matmul_kernel(
    a_ptr,
    w_ptr,
    bias_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_am,
    stride_wn,
    stride_cm,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_m
    pid_n = (pid % in_group) // group_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows = (offs_m % M).to(tl.int64)  # wrapped: loads stay in bounds, the store is masked
    cols = (offs_n % N).to(tl.int64)
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :]
    w_ptrs = w_ptr + cols[None, :] * stride_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N] of w.T
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs)
        else:
            a = tl.load(a_ptrs, mask=offs_k[None, :] < K - k0, other=0.0)
            w = tl.load(w_ptrs, mask=offs_k[:, None] < K - k0, other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    c = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def matmul_config(n: int, k: int, dtype: torch.dtype) -> dict:
    """The kernel configuration of a weight [n, k]: a function of the weight alone, never of M."""
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3)
    # H200, Llama-3-8B shapes: ~0.75 of cuBLAS at M = 8192, 0.55-0.85 at M = 256
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4)


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ weight[N, K].T (+ bias [N], added in float32) -> [M, N] in x.dtype (CUDA, Triton)."""
    m, k = x.shape
    n = weight.shape[0]
    assert weight.shape == (n, k), (x.shape, weight.shape)
    assert x.dtype == weight.dtype and x.device == weight.device
    assert x.stride(1) == 1 and weight.stride(1) == 1
    assert bias is None or (bias.shape == (n,) and bias.is_contiguous())
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    cfg = matmul_config(n, k, x.dtype)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    _matmul_kernel[grid](
        x, weight, bias if bias is not None else weight, out, m, n, k,
        x.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, EVEN_K=k % cfg["BLOCK_K"] == 0,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32", **cfg,
    )  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------------
# GPU attention: stage 1 = one partial softmax per (row, split); stage 2 merges a row's splits in order


def tile_tokens(group: int) -> int:
    """Tokens per attention tile: TILE_ROWS (token, head) rows hold this many tokens of one sequence."""
    return max(1, TILE_ROWS // group)


def build_tiles(q_lens: list[int], cu: list[int], group: int) -> tuple[list[int], list[int]]:
    """(sequence, first q row) of every attention tile: consecutive tokens of one sequence."""
    t = tile_tokens(group)
    seqs, rows = [], []
    for b, n in enumerate(q_lens):
        for j in range(0, n, t):
            seqs.append(b)
            rows.append(cu[b] + j)
    return seqs, rows


@triton.jit
def _attn_split_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    page_table_ptr,
    tile_seq_ptr,
    tile_row_ptr,
    cu_q_ptr,
    seq_lens_ptr,
    mid_o_ptr,  # [tiles * TOKENS, Hq, S, D] float32
    mid_lse_ptr,  # [tiles * TOKENS, Hq, S] float32, log2 units
    qk_scale,
    page_size,
    stride_qt,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    stride_pt,
    stride_mor,
    stride_moh,
    stride_mos,
    stride_mlr,
    stride_mlh,
    GROUP: tl.constexpr,
    TOKENS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    b = tl.load(tile_seq_ptr + tile)
    row0 = tl.load(tile_row_ptr + tile)
    q_start = tl.load(cu_q_ptr + b)
    q_end = tl.load(cu_q_ptr + b + 1)
    prefix = tl.load(seq_lens_ptr + b) - (q_end - q_start)
    max_pos = prefix + tl.minimum(row0 + TOKENS, q_end) - 1 - q_start
    start = split * SPLIT
    if start <= max_pos:
        end = tl.minimum(start + SPLIT, max_pos + 1)
        offs_m = tl.arange(0, BLOCK_M)
        t = offs_m // GROUP
        rows = row0 + t
        valid = (t < TOKENS) & (rows < q_end)
        q_pos = prefix + rows - q_start  # absolute position of each row's token
        heads = kv_head * GROUP + offs_m % GROUP
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < HEAD_DIM
        q = tl.load(
            q_ptr + rows.to(tl.int64)[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
            mask=valid[:, None] & mask_d[None, :],
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
            )
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
            visible = mask_n[None, :] & (pos[None, :] <= q_pos[:, None])
            qk = tl.where(visible, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            # NOTE: a block a row cannot see must leave it exactly as it was (alpha 1, p 0): the blocks a
            # program visits depend on the other rows of its tile
            alpha = tl.where(m_new == m_i, 1.0, tl.exp2(m_i - m_new))
            p = tl.where(visible, tl.exp2(qk - m_new[:, None]), 0.0)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(
                v_cache_ptr + slot[:, None] * stride_vs + kv_head * stride_vh + offs_d[None, :],
                mask=kv_mask,
                other=0.0,
            )
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        own = valid & (q_pos >= start)
        mid = (tile * TOKENS + t).to(tl.int64)
        mo = (
            mid_o_ptr
            + mid[:, None] * stride_mor
            + heads[:, None] * stride_moh
            + split * stride_mos
            + offs_d[None, :]
        )
        tl.store(mo, acc / l_i[:, None], mask=own[:, None] & mask_d[None, :])
        tl.store(mid_lse_ptr + mid * stride_mlr + heads * stride_mlh + split, m_i + tl.log2(l_i), mask=own)


@triton.jit
def _attn_merge_kernel(
    mid_o_ptr,
    mid_lse_ptr,
    o_ptr,
    tile_seq_ptr,
    tile_row_ptr,
    cu_q_ptr,
    seq_lens_ptr,
    stride_mor,
    stride_moh,
    stride_mos,
    stride_mlr,
    stride_mlh,
    stride_ot,
    stride_oh,
    TOKENS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLIT: tl.constexpr,
):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    b = tl.load(tile_seq_ptr + tile)
    row0 = tl.load(tile_row_ptr + tile)
    q_start = tl.load(cu_q_ptr + b)
    q_end = tl.load(cu_q_ptr + b + 1)
    prefix = tl.load(seq_lens_ptr + b) - (q_end - q_start)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    for t in range(TOKENS):
        row = row0 + t
        if row < q_end:
            num_splits = (prefix + row - q_start + SPLIT) // SPLIT  # cdiv(position + 1, SPLIT)
            mid = (tile * TOKENS + t).to(tl.int64)
            mo = mid_o_ptr + mid * stride_mor + head * stride_moh
            ml = mid_lse_ptr + mid * stride_mlr + head * stride_mlh
            m = float("-inf")
            l_sum = 0.0
            acc = tl.zeros([BLOCK_D], tl.float32)
            for s in range(0, num_splits):
                lse = tl.load(ml + s)
                o = tl.load(mo + s * stride_mos + offs_d, mask=mask_d, other=0.0)
                m_new = tl.maximum(m, lse)
                alpha = tl.exp2(m - m_new)
                w = tl.exp2(lse - m_new)
                acc = acc * alpha + o * w
                l_sum = l_sum * alpha + w
                m = m_new
            out = acc / tl.where(l_sum > 0.0, l_sum, 1.0)  # no KV (a padded CUDA-graph row): zeros
            o = o_ptr + row.to(tl.int64) * stride_ot + head * stride_oh + offs_d
            tl.store(o, out.to(o_ptr.dtype.element_ty), mask=mask_d)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    sm_scale: float,
    tile_seq: torch.Tensor,
    tile_row: torch.Tensor,
    max_seq_len: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of new tokens over a paged KV cache (their K/V already stored), batch-invariant.

    q [T, Hq, D]; sequence b owns q rows cu_seqlens_q[b]:cu_seqlens_q[b+1], the last of its seq_lens[b]
    KV tokens. tile_seq, tile_row int32 [num_tiles]: each tile is up to tile_tokens(Hq // Hkv) consecutive
    rows of one sequence starting at row tile_row (see build_tiles). max_seq_len (host int) bounds
    seq_lens and sizes the split grid. Returns out [T, Hq, D] (q.dtype)."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_q_heads // num_kv_heads
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    assert k_cache.shape == v_cache.shape and k_cache.shape[2] == head_dim and num_q_heads % num_kv_heads == 0
    assert q.dtype == k_cache.dtype and page_table.dtype == torch.int32 and page_table.stride(-1) == 1
    assert cu_seqlens_q.dtype == torch.int32 and seq_lens.dtype == torch.int32
    assert tile_seq.dtype == tile_row.dtype == torch.int32 and tile_seq.shape == tile_row.shape
    if out is None:
        out = torch.empty_like(q)
    num_tiles = tile_seq.shape[0]
    if num_tokens == 0 or num_tiles == 0:
        return out
    tokens = tile_tokens(group)
    num_splits = max(1, triton.cdiv(max_seq_len, SPLIT_SIZE))
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_m = max(16, triton.next_power_of_2(tokens * group))
    block_n = 64 if block_d <= 128 else 32
    per_tile = tokens * num_q_heads * num_splits * (head_dim + 1) * 4
    chunk = max(1, _MID_BYTES // per_tile)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    for t0 in range(0, num_tiles, chunk):  # bounds the workspace; rows are independent
        seqs, rows = tile_seq[t0 : t0 + chunk], tile_row[t0 : t0 + chunk]
        n = seqs.shape[0]
        mid_o = torch.empty(
            n * tokens, num_q_heads, num_splits, head_dim, dtype=torch.float32, device=q.device
        )
        mid_lse = torch.empty(n * tokens, num_q_heads, num_splits, dtype=torch.float32, device=q.device)
        _attn_split_kernel[(n, num_kv_heads, num_splits)](
            q, k_cache, v_cache, page_table, seqs, rows, cu_seqlens_q, seq_lens, mid_o, mid_lse,
            sm_scale * _LOG2E, page_size,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
            page_table.stride(0), mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
            mid_lse.stride(0), mid_lse.stride(1),
            GROUP=group, TOKENS=tokens, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_N=block_n,
            SPLIT=SPLIT_SIZE, PRECISION=precision, num_warps=4, num_stages=2,
        )  # fmt: skip
        _attn_merge_kernel[(n, num_q_heads)](
            mid_o, mid_lse, out, seqs, rows, cu_seqlens_q, seq_lens,
            mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
            out.stride(0), out.stride(1),
            TOKENS=tokens, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), SPLIT=SPLIT_SIZE,
            num_warps=1 if head_dim <= 64 else 2,
        )  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------------
# autograd-capable ops (the training forward); forward = the engine's computation exactly


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        if x.is_cuda:
            return matmul(x, weight, bias)
        y = _linear_cpu(x, weight)
        return y if bias is None else y + bias

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad @ weight if ctx.needs_input_grad[0] else None
        grad_w = grad.t() @ x if ctx.needs_input_grad[1] else None
        grad_b = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight[N, K].T (+ bias) -> [..., N], each row independent of the others."""
    shape = x.shape
    y = _Linear.apply(x.reshape(-1, shape[-1]).contiguous(), weight, bias)
    return y.view(*shape[:-1], weight.shape[0])


def _rms_norm_math(x, weight, eps, residual):
    """Differentiable reference of the norm (the backward recomputes through it)."""
    if residual is not None:
        x = x + residual
    xf = x.float()
    out = (weight.float() * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps))).to(x.dtype)
    return out, x


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, residual, eps):
        ctx.save_for_backward(x, weight, residual)
        ctx.eps = eps
        if residual is None:
            return rms_norm_gpu(x, weight, eps), None
        return rms_norm_gpu(x, weight, eps, residual)

    @staticmethod
    def backward(ctx, grad_out, grad_sum):
        x, weight, residual = ctx.saved_tensors
        with torch.enable_grad():
            wrt = [t.detach().requires_grad_() for t in (x, weight, residual) if t is not None]
            out, s = _rms_norm_math(wrt[0], wrt[1], ctx.eps, wrt[2] if residual is not None else None)
            outs, grads = [out], [grad_out]
            if residual is not None and grad_sum is not None:
                outs.append(s)
                grads.append(grad_sum)
            g = torch.autograd.grad(outs, wrt, grads)
        return g[0], g[1], g[2] if residual is not None else None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """x [T, H] -> norm(x) or, with residual, (norm(x + residual), x + residual)."""
    if not x.is_cuda:
        return _rms_norm_cpu(x, weight, eps, residual)
    x = x.contiguous()
    if residual is None:
        return _RMSNorm.apply(x, weight, None, eps)[0]
    return _RMSNorm.apply(x, weight, residual.contiguous(), eps)


class _SiluAndMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return silu_and_mul_gpu(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        gate, up = x.float().chunk(2, dim=-1)
        sig = torch.sigmoid(gate)
        g = grad.float()
        d_gate = g * up * sig * (1 + gate * (1 - sig))
        return torch.cat([d_gate, g * gate * sig], dim=-1).to(x.dtype)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2I] -> silu(x[:, :I]) * x[:, I:]."""
    if not x.is_cuda:
        return _silu_and_mul_cpu(x)
    return _SiluAndMul.apply(x.contiguous())


def _rotate(x: torch.Tensor, positions: torch.Tensor, cache: torch.Tensor, sign: float) -> torch.Tensor:
    rot = cache.shape[1]
    half = rot // 2
    cs = cache[positions]
    cos = torch.cat([cs[:, :half], cs[:, :half]], -1)[:, None, :]
    sin = sign * torch.cat([cs[:, half:], cs[:, half:]], -1)[:, None, :]
    xr = x[..., :rot].float()
    rotated = torch.cat([-xr[..., half:], xr[..., :half]], -1)
    return torch.cat([(xr * cos + rotated * sin).to(x.dtype), x[..., rot:]], -1)


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, positions, cache):
        ctx.save_for_backward(positions, cache)
        return apply_rotary(q.clone(), k.clone(), positions, cache)

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        positions, cache = ctx.saved_tensors  # a rotation's adjoint is the rotation by -angle
        return _rotate(grad_q, positions, cache, -1.0), _rotate(grad_k, positions, cache, -1.0), None, None


def rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cache: torch.Tensor):
    """Rotated (q, k) [T, H, D]: new tensors when autograd records, else (on CUDA) rotated in place."""
    if not q.is_cuda:
        return apply_rotary_ref(q, k, positions, cache)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        return _Rotary.apply(q, k, positions, cache)
    return apply_rotary(q, k, positions, cache)


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, tokens, temperature):
        ctx.save_for_backward(logits, tokens, temperature)
        return logprobs_of(logits, tokens, temperature)

    @staticmethod
    def backward(ctx, grad):
        logits, tokens, temperature = ctx.saved_tensors
        t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))[:, None]
        probs = torch.softmax(logits / t, dim=-1)
        onehot = torch.zeros_like(probs).scatter_(1, tokens[:, None], 1.0)
        return grad[:, None] * (onehot - probs) / t, None, None


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits / T')[i, tokens[i]] with T' = T if T > 0 else 1: the sampler's own computation.
    logits [N, V] float32, tokens int64 [N], temperature float32 [N] -> [N] float32."""
    if not logits.is_cuda:
        return logprobs_of_ref(logits, tokens, temperature)
    return _TokenLogprobs.apply(logits.contiguous(), tokens.contiguous(), temperature.contiguous())


class _VarlenAttention(torch.autograd.Function):
    """GPU training attention: forward = paged_attention over the packed K/V (page size 1); backward by
    recomputing each sequence with SDPA."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, lens, scale):
        ctx.save_for_backward(q, k, v)
        ctx.lens, ctx.scale = lens, scale
        cu = [0]
        for n in lens:
            cu.append(cu[-1] + n)
        width = max(lens)
        idx = torch.arange(width, device=q.device, dtype=torch.int32)
        page_table = torch.minimum(
            cu_seqlens[:-1, None] + idx[None, :], cu_seqlens[1:, None] - 1
        ).contiguous()
        seqs, rows = build_tiles(lens, cu, q.shape[1] // k.shape[1])
        dev = q.device
        seq_lens = torch.tensor(lens, dtype=torch.int32, device=dev)
        return paged_attention(
            q.contiguous(),
            k.contiguous(),
            v.contiguous(),
            page_table,
            cu_seqlens,
            seq_lens,
            1,
            scale,
            torch.tensor(seqs, dtype=torch.int32, device=dev),
            torch.tensor(rows, dtype=torch.int32, device=dev),
            width,
        )

    @staticmethod
    def backward(ctx, grad):
        q, k, v = ctx.saved_tensors
        group = q.shape[1] // k.shape[1]
        with torch.enable_grad():
            qd, kd, vd = (t.detach().requires_grad_() for t in (q, k, v))
            outs, start = [], 0
            for n in ctx.lens:
                qb = qd[start : start + n].transpose(0, 1)
                kb = kd[start : start + n].transpose(0, 1).repeat_interleave(group, 0)
                vb = vd[start : start + n].transpose(0, 1).repeat_interleave(group, 0)
                outs.append(
                    F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=ctx.scale).transpose(
                        0, 1
                    )
                )
                start += n
            gq, gk, gv = torch.autograd.grad(torch.cat(outs), (qd, kd, vd), grad)
        return gq, gk, gv, None, None, None


def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, lens: list[int], scale: float
) -> torch.Tensor:
    """Causal attention of packed whole sequences (no cache): q [T, Hq, D], k/v [T, Hkv, D], sequence b
    at rows cu_seqlens[b]:cu_seqlens[b+1] (int32 [B+1], lens its host copy) -> [T, Hq, D]. Same numbers
    as the engine computes for these tokens."""
    if q.is_cuda:
        return _VarlenAttention.apply(q, k, v, cu_seqlens, lens, scale)
    starts = torch.tensor([0] + lens[:-1]).cumsum(0)
    sizes = torch.tensor(lens)
    pos = torch.arange(kv_width(max(lens)))
    slot_table = starts[:, None] + torch.minimum(pos[None, :], sizes[:, None] - 1)  # [B, W]
    row_seq = torch.repeat_interleave(torch.arange(len(lens)), sizes)
    row_pos = torch.cat([torch.arange(n) for n in lens])
    return cpu_attention(q, k, v, slot_table, row_seq, row_pos, scale)


# --------------------------------------------------------------------------------------------------
# mixture of experts


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (weights [T, k] float32, ids [T, k] int64); softmax rows are computed by
    one kernel per row on either device; the renormalising sum is a fixed-order tree."""
    probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / tree_sum(weights)[:, None]
    return weights, ids


_MOE_CONFIG = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)  # one config for every T


def _moe_fused_gpu(x, w13, w2, topk_weights, topk_ids):
    """gyre.kernels.moe's grouped GEMMs with one fixed configuration (fused_moe picks its configuration
    by the number of pairs), then each token's slots summed in slot order in float32."""
    from gyre.kernels import moe as moe_kernels  # NOTE: its private kernels; keep in step with that file

    num_tokens, top_k = topk_ids.shape
    num_experts, two_i, hidden = w13.shape
    inter = two_i // 2
    num_pairs = num_tokens * top_k
    cfg = _MOE_CONFIG
    sorted_ids, expert_ids, num_padded = moe_kernels.moe_align_block_size(
        topk_ids, cfg["BLOCK_M"], num_experts
    )
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    act = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)
    moe_kernels._moe_gate_up_kernel[(expert_ids.shape[0], triton.cdiv(inter, cfg["BLOCK_N"]))](
        x, w13, act, sorted_ids, expert_ids, num_padded, num_pairs, top_k, hidden, inter,
        x.stride(0), w13.stride(0), w13.stride(1), act.stride(0), PRECISION=precision, **cfg,
    )  # fmt: skip
    y = torch.empty(num_pairs, hidden, dtype=x.dtype, device=x.device)
    moe_kernels._moe_down_kernel[(expert_ids.shape[0], triton.cdiv(hidden, cfg["BLOCK_N"]))](
        act, w2, y, topk_weights.reshape(-1).contiguous(), sorted_ids, expert_ids, num_padded, num_pairs,
        hidden, inter, act.stride(0), w2.stride(0), w2.stride(1), y.stride(0), PRECISION=precision, **cfg,
    )  # fmt: skip
    y = y.view(num_tokens, top_k, hidden)
    out = y[:, 0].float()
    for j in range(1, top_k):
        out = out + y[:, j].float()
    return out.to(x.dtype)


def _moe_math(x, w13, w2, topk_weights, topk_ids):
    """Differentiable reference of the GPU MoE (its backward recomputes through it)."""
    inter = w13.shape[1] // 2
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in torch.unique(topk_ids).tolist():
        tok, slot = torch.nonzero(topk_ids == e, as_tuple=True)
        h = x[tok].float() @ w13[e].float().t()
        act = (F.silu(h[:, :inter]) * h[:, inter:]).to(x.dtype).float()
        y = act @ w2[e].float().t() * topk_weights[tok, slot, None]
        out = out.index_add(0, tok, y)
    return out.to(x.dtype)


class _FusedMoE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w13, w2, topk_weights, topk_ids):
        ctx.save_for_backward(x, w13, w2, topk_weights, topk_ids)
        return _moe_fused_gpu(x, w13, w2, topk_weights, topk_ids)

    @staticmethod
    def backward(ctx, grad):
        x, w13, w2, topk_weights, topk_ids = ctx.saved_tensors
        with torch.enable_grad():
            wrt = [t.detach().requires_grad_() for t in (x, w13, w2, topk_weights)]
            g = torch.autograd.grad(_moe_math(*wrt, topk_ids), wrt, grad)
        return (*g, None)


def moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_offset: int = 0,
) -> torch.Tensor:
    """x [T, H] through the routed experts (w13 [E, 2I, H], w2 [E, H, I]) -> [T, H]. Each (token, slot)
    pair's expert output comes from batch-invariant matmuls; a token sums its slots in slot order."""
    if x.is_cuda:
        assert expert_offset == 0, "deterministic MoE on the GPU needs ep_size 1"
        return _FusedMoE.apply(x.contiguous(), w13, w2, topk_weights, topk_ids)
    num_tokens, top_k = topk_ids.shape
    local = (topk_ids - expert_offset).reshape(-1)  # [T*k] pair p = t * k + j
    pairs, order = [], []
    for e in torch.unique(local).tolist():
        if e < 0 or e >= w13.shape[0]:
            continue  # another rank's expert
        idx = torch.nonzero(local == e, as_tuple=True)[0]
        h = silu_and_mul(linear(x[idx // top_k], w13[e]))
        pairs.append(linear(h, w2[e]))
        order.append(idx)
    y = x.new_zeros(num_tokens * top_k, x.shape[1])
    if pairs:
        y = y.index_copy(0, torch.cat(order), torch.cat(pairs))  # [T*k, H] in pair order
    y = y.view(num_tokens, top_k, -1).float() * topk_weights[..., None]
    out = y[:, 0]
    for j in range(1, top_k):
        out = out + y[:, j]
    return out.to(x.dtype)
