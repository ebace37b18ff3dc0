"""Sampling with temperature, top-k, top-p and min-p, without sorting the vocabulary; logprobs.

Semantics (sample_ref defines them; the Triton kernel reproduces them token for token):
- temperature <= 0: greedy, argmax(logits) (lowest index on ties).
- otherwise z = logits / temperature (IEEE division) and the keep set is the intersection of
  top-k:  z >= the k-th largest z (ties at the k-th value are all kept); off when k <= 0 or k >= V;
  min-p:  z - max(z) >= log(min_p), i.e. prob >= min_p * max_prob; off when min_p <= 0;
  top-p:  z >= v*, v* the largest z value whose mass at or above it, sum(exp(z_i - max z) for z_i >= v*),
          is >= top_p * sum(exp(z - max z)): the smallest nucleus of highest-prob tokens reaching
          top_p, the crossing token and its ties included; off when top_p >= 1.
  All three are defined on the full (unfiltered) distribution.
- the token is argmax over the keep set of z + g, g = gyre.kernels.random.gumbel_noise(seeds, steps, V),
  i.e. a sample from softmax(z) restricted to the keep set.

Every filter keeps an upper set {z >= t}; the kernel finds each threshold exactly by bisection over
float32 bit patterns (monotone int32 keys), counting tokens / summing mass at or above the pivot in
passes over the row, and stops once the pivot's neighbours in the row bracket the threshold (a few
passes to ~32 at most per filter); then one pass takes argmax(z + g) with g hashed in-kernel.
A row with no filter on reads the logits once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gyre.kernels.random import gumbel_noise

_BLOCK = 2048  # tokens per step of a pass; with 16 warps (measured best on H200, V = 152k)


# NOTE: the Triton interpreter re-patches the language on every call of a jit helper (~ms each), so
# the kernels below are written out without helpers to keep the CPU tests fast.


@triton.jit
def _sample_kernel(
    logits_ptr,
    stride_row,
    temperature_ptr,
    top_k_ptr,
    top_p_ptr,
    log_min_p_ptr,
    seeds_ptr,
    steps_ptr,
    out_ptr,
    V,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    offs = tl.arange(0, BLOCK)
    temperature = tl.load(temperature_ptr + row)
    greedy = temperature <= 0.0
    temperature = tl.where(greedy, 1.0, temperature)  # greedy rows: z = logits exactly
    top_k = tl.load(top_k_ptr + row)
    top_p = tl.load(top_p_ptr + row)
    log_min_p = tl.load(log_min_p_ptr + row)
    use_k = (top_k > 0) & (top_k < V)
    use_p = top_p < 1.0
    use_m = log_min_p > float("-inf")

    # NOTE: z = lg / T is monotone in the logit lg, so each filter's set {z >= t} is also {lg >= t_l} for
    # a logit t_l of the row. Thresholds are searched over logits; the keep set is z >= t_l / T, which
    # keeps ties in z whole, as the reference does.
    t_l = tl.full([], float("-inf"), tl.float32)
    if (~greedy) & (use_k | use_p | use_m):
        l_max = tl.full([], float("-inf"), tl.float32)
        l_min = tl.full([], float("inf"), tl.float32)
        for off in range(0, V, BLOCK):
            idx = off + offs
            lg = tl.load(row_ptr + idx, mask=idx < V, other=float("-inf"))
            l_max = tl.maximum(l_max, tl.max(lg, 0))
            l_min = tl.minimum(l_min, tl.min(tl.where(idx < V, lg, float("inf")), 0))
        z_max = tl.math.div_rn(l_max, temperature)
        mass_scale = 1.4426950408889634 / temperature  # log2(e) / T
        t_l = l_min
        if use_m:  # the smallest lg with z - z_max >= log(min_p)
            m = tl.full([BLOCK], float("inf"), tl.float32)
            for off in range(0, V, BLOCK):
                idx = off + offs
                lg = tl.load(row_ptr + idx, mask=idx < V, other=float("-inf"))
                m = tl.minimum(
                    m, tl.where(tl.math.div_rn(lg, temperature) - z_max >= log_min_p, lg, float("inf"))
                )
            t_l = tl.min(m, 0)

        # top-k (each token weighs 1, target k) then top-p (weight exp(z - z_max), target top_p * total):
        # find the largest row logit v with W(v) >= target, W(v) = weight of the tokens with lg >= v,
        # by bisection over monotone int32 keys of floats, keeping W(lo) >= target > W(hi).
        # Each pass also finds the pivot's neighbours in the row (the smallest lg >= pivot, the largest
        # lg < pivot, and their weights): bounds snap to row values and the search stops as soon as a
        # neighbour is the answer. The first pass, at t_l, checks W(t_l) >= target (else t_l stands).
        for f in tl.static_range(2):
            if f == 0:
                active = use_k
            else:
                active = use_p
            bits = t_l.to(tl.int32, bitcast=True)
            lo = tl.where(t_l == 0.0, 0, tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)).to(tl.int64)
            bits = l_max.to(tl.int32, bitcast=True)
            hi = tl.where(l_max == 0.0, 0, tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)).to(tl.int64) + 1
            hi = tl.where(active, hi, lo)
            it = tl.full([], 0, tl.int32)
            while hi - lo > 1:
                # pivot: t_l first; then the midpoint in value while the bounds are far apart (it finds
                # the right binade faster), at most 16 times, then the midpoint in key space (<= 32 more)
                key = lo.to(tl.int32)
                v_a = tl.where(key >= 0, key, key ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)
                key = (hi - 1).to(tl.int32)
                v_b = tl.where(key >= 0, key, key ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)
                v_mid = v_a * 0.5 + v_b * 0.5
                bits = v_mid.to(tl.int32, bitcast=True)
                k_val = tl.where(v_mid == 0.0, 0, tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)).to(tl.int64)
                use_val = (hi - lo > 4194304) & (it < 16) & (k_val > lo) & (k_val < hi)
                key = tl.where(it == 0, lo, tl.where(use_val, k_val, lo + (hi - lo) // 2)).to(tl.int32)
                pivot = tl.where(key >= 0, key, key ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)
                w_total = tl.zeros([BLOCK], tl.float32)
                w_ge = tl.zeros([BLOCK], tl.float32)
                v_lo = tl.full([BLOCK], float("inf"), tl.float32)  # per lane: min lg >= pivot, its weight
                w_lo = tl.zeros([BLOCK], tl.float32)
                v_hi = tl.full([BLOCK], float("-inf"), tl.float32)  # per lane: max lg < pivot, its weight
                w_hi = tl.zeros([BLOCK], tl.float32)
                for off in range(0, V, BLOCK):
                    idx = off + offs
                    valid = idx < V
                    lg = tl.load(row_ptr + idx, mask=valid, other=float("-inf"))
                    if f == 0:
                        w = tl.where(valid, 1.0, 0.0)
                    else:  # exp(z - z_max), without a division per token: the mass need not be exact
                        w = tl.where(valid, tl.exp2((lg - l_max) * mass_scale), 0.0)
                    above = valid & (lg >= pivot)
                    below = valid & (lg < pivot)
                    w_total += w
                    w_ge += tl.where(above, w, 0.0)
                    new_lo = tl.minimum(v_lo, tl.where(above, lg, float("inf")))
                    w_lo = tl.where(new_lo < v_lo, 0.0, w_lo) + tl.where(above & (lg == new_lo), w, 0.0)
                    v_lo = new_lo
                    new_hi = tl.maximum(v_hi, tl.where(below, lg, float("-inf")))
                    w_hi = tl.where(new_hi > v_hi, 0.0, w_hi) + tl.where(below & (lg == new_hi), w, 0.0)
                    v_hi = new_hi
                if f == 0:
                    target = top_k.to(tl.float32)
                else:
                    target = top_p * tl.sum(w_total, 0)
                lane_lo = tl.min(v_lo, 0)
                lane_hi = tl.max(v_hi, 0)
                ge = tl.sum(w_ge, 0)
                at_lo = tl.sum(tl.where(v_lo == lane_lo, w_lo, 0.0), 0)
                at_hi = tl.sum(tl.where(v_hi == lane_hi, w_hi, 0.0), 0)
                if ge >= target:
                    bits = lane_lo.to(tl.int32, bitcast=True)
                    lo = tl.where(lane_lo == 0.0, 0, tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)).to(
                        tl.int64
                    )
                    if ge - at_lo < target:  # lane_lo is the answer
                        hi = lo + 1
                else:  # on the first pass this leaves hi <= lo: t_l stands
                    bits = lane_hi.to(tl.int32, bitcast=True)
                    hi = (
                        tl.where(lane_hi == 0.0, 0, tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)).to(tl.int64)
                        + 1
                    )
                    if (ge + at_hi >= target) & (hi > lo):  # lane_hi is the answer
                        lo = hi - 1
                it += 1
            key = lo.to(tl.int32)
            t_l = tl.where(key >= 0, key, key ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)
    t = tl.math.div_rn(t_l, temperature)

    # per-row noise key: mix32(mix32(seed_lo ^ mix32(seed_hi)) ^ step), as gyre.kernels.random
    seed = tl.load(seeds_ptr + row)
    step = (tl.load(steps_ptr + row) & 0xFFFFFFFF).to(tl.uint32)
    h = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    for i in tl.static_range(3):
        h = h ^ (h >> 16)
        h = h * tl.full([], 0x7FEB352D, tl.uint32)
        h = h ^ (h >> 15)
        h = h * tl.full([], 0x846CA68B, tl.uint32)
        h = h ^ (h >> 16)
        if i == 0:
            h = h ^ (seed & 0xFFFFFFFF).to(tl.uint32)
        if i == 1:
            h = h ^ step
    row_hash = h

    # final pass: argmax of z + g over the keep set (of the logits when greedy); lowest index on ties
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK], tl.int32)
    for off in range(0, V, BLOCK):
        idx = off + offs
        valid = idx < V
        z = tl.math.div_rn(tl.load(row_ptr + idx, mask=valid, other=float("-inf")), temperature)
        if greedy:
            score = z
        else:
            x = row_hash ^ idx.to(tl.uint32)  # mix32, then u in (0, 1) from the top 24 bits
            x = x ^ (x >> 16)
            x = x * tl.full([], 0x7FEB352D, tl.uint32)
            x = x ^ (x >> 15)
            x = x * tl.full([], 0x846CA68B, tl.uint32)
            x = x ^ (x >> 16)
            u = ((x >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
            score = tl.where(z >= t, z - tl.log(-tl.log(u)), float("-inf"))
        score = tl.where(valid, score, float("-inf"))
        better = score > best
        best = tl.where(better, score, best)
        best_idx = tl.where(better, idx, best_idx)
    top = tl.max(best, 0)
    token = tl.min(tl.where(best == top, best_idx, V), 0)
    token = tl.where(token == V, 0, token)  # every score -inf: index 0, as torch.argmax
    tl.store(out_ptr + row, token.to(tl.int64))


def _check_params(logits, *params):
    batch, _ = logits.shape
    assert logits.dtype == torch.float32 and logits.stride(1) == 1, (logits.dtype, logits.stride())
    for p in params:
        assert p.shape == (batch,) and p.is_contiguous() and p.device == logits.device, (p.shape, batch)


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    seeds: torch.Tensor,
    steps: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """logits [B, V] float32; temperature, top_p, min_p float32 [B]; top_k int32 [B]; seeds, steps
    int64 [B] -> tokens int64 [B]. See the module docstring for the semantics."""
    batch, vocab = logits.shape
    _check_params(logits, temperature, top_k, top_p, min_p, seeds, steps)
    assert temperature.dtype == top_p.dtype == min_p.dtype == torch.float32
    assert top_k.dtype == torch.int32 and seeds.dtype == steps.dtype == torch.int64
    assert vocab < 2**31 - 1
    if out is None:
        out = torch.empty(batch, dtype=torch.int64, device=logits.device)
    assert out.shape == (batch,) and out.dtype == torch.int64
    log_min_p = torch.log(min_p)  # computed by torch so that kernel and reference compare the same value
    if batch > 0:
        _sample_kernel[(batch,)](
            logits, logits.stride(0), temperature, top_k, top_p, log_min_p, seeds, steps, out, vocab,
            BLOCK=_BLOCK, num_warps=16,
        )  # fmt: skip
    return out


def sample_ref(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    seeds: torch.Tensor,
    steps: torch.Tensor,
) -> torch.Tensor:
    batch, vocab = logits.shape
    greedy = temperature <= 0
    z = logits / torch.where(greedy, 1.0, temperature)[:, None]
    z_max = z.max(-1, keepdim=True).values
    z_sorted = z.sort(-1, descending=True).values
    keep = torch.ones_like(z, dtype=torch.bool)
    # top-k: z >= the k-th largest z
    k = top_k.long()
    kth = z_sorted.gather(1, (k.clamp(1, vocab) - 1)[:, None])
    keep &= ~((k > 0) & (k < vocab))[:, None] | (z >= kth)
    # top-p: z >= the first sorted value whose cumulative mass reaches top_p * total
    cum = torch.exp(z_sorted - z_max).cumsum(-1)
    reach = cum >= top_p[:, None] * torch.exp(z - z_max).sum(-1, keepdim=True)
    first = torch.where(reach.any(-1), reach.int().argmax(-1), vocab - 1)
    keep &= ~(top_p < 1.0)[:, None] | (z >= z_sorted.gather(1, first[:, None]))
    # min-p: prob >= min_p * max_prob, compared in log space
    keep &= (z - z_max) >= torch.log(min_p)[:, None]
    scores = torch.where(keep, z + gumbel_noise(seeds, steps, vocab), float("-inf"))
    return torch.where(greedy, logits.argmax(-1), scores.argmax(-1))


# --------------------------------------------------------------------------------------------------
# split over the vocabulary: small batches read the logits with many programs (one program reading a
# 128k-token row is latency-bound: ~50 us on an H200 at batch 1). Per chunk: the logsumexp partial of
# z = logits / T and, when sampling (no row filters anything), argmax(z + g) (of the logits when greedy)
# with its lowest index; then one program per row merges them: the token, then its logprob.

_CHUNK = 4096  # vocabulary entries per program


@triton.jit
def _chunk_kernel(
    logits_ptr,
    stride_row,
    temperature_ptr,
    seeds_ptr,
    steps_ptr,
    m_ptr,  # [B, C] float32: max z of the chunk
    s_ptr,  # [B, C] float32: sum exp(z - m)
    best_ptr,  # [B, C] float32: best score (SAMPLE)
    best_idx_ptr,  # [B, C] int32: its lowest index (SAMPLE)
    V,
    C,
    CHUNK: tl.constexpr,
    SAMPLE: tl.constexpr,
):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    idx = chunk * CHUNK + tl.arange(0, CHUNK)
    valid = idx < V
    temperature = tl.load(temperature_ptr + row)
    greedy = temperature <= 0.0
    temperature = tl.where(greedy, 1.0, temperature)
    lg = tl.load(logits_ptr + row.to(tl.int64) * stride_row + idx, mask=valid, other=float("-inf"))
    z = tl.math.div_rn(lg, temperature)
    m = tl.max(z, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    tl.store(m_ptr + row * C + chunk, m)
    tl.store(s_ptr + row * C + chunk, tl.sum(tl.exp(z - m_safe), 0))
    if SAMPLE:
        if greedy:
            score = z
        else:  # the noise of _sample_kernel, bit for bit
            seed = tl.load(seeds_ptr + row)
            step = (tl.load(steps_ptr + row) & 0xFFFFFFFF).to(tl.uint32)
            h = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
            for i in tl.static_range(3):
                h = h ^ (h >> 16)
                h = h * tl.full([], 0x7FEB352D, tl.uint32)
                h = h ^ (h >> 15)
                h = h * tl.full([], 0x846CA68B, tl.uint32)
                h = h ^ (h >> 16)
                if i == 0:
                    h = h ^ (seed & 0xFFFFFFFF).to(tl.uint32)
                if i == 1:
                    h = h ^ step
            x = h ^ idx.to(tl.uint32)
            x = x ^ (x >> 16)
            x = x * tl.full([], 0x7FEB352D, tl.uint32)
            x = x ^ (x >> 15)
            x = x * tl.full([], 0x846CA68B, tl.uint32)
            x = x ^ (x >> 16)
            u = ((x >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
            score = z - tl.log(-tl.log(u))
        score = tl.where(valid, score, float("-inf"))
        top = tl.max(score, 0)
        tl.store(best_ptr + row * C + chunk, top)
        tl.store(best_idx_ptr + row * C + chunk, tl.min(tl.where(score == top, idx, V), 0))


@triton.jit
def _finish_kernel(
    logits_ptr,
    stride_row,
    temperature_ptr,
    m_ptr,
    s_ptr,
    best_ptr,
    best_idx_ptr,
    tokens_ptr,  # [B] int64: written when SAMPLE, read otherwise
    out_ptr,  # [B] float32 logprobs
    V,
    C,
    BLOCK_C: tl.constexpr,
    SAMPLE: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_C)
    mask = offs < C
    m = tl.load(m_ptr + row * C + offs, mask=mask, other=float("-inf"))
    s = tl.load(s_ptr + row * C + offs, mask=mask, other=0.0)
    m_row = tl.max(m, 0)
    lse = m_row + tl.log(tl.sum(s * tl.exp(m - m_row), 0))
    if SAMPLE:
        best = tl.load(best_ptr + row * C + offs, mask=mask, other=float("-inf"))
        best_idx = tl.load(best_idx_ptr + row * C + offs, mask=mask, other=V)
        top = tl.max(best, 0)
        token = tl.min(tl.where(best == top, best_idx, V), 0)
        token = tl.where(token >= V, 0, token).to(tl.int64)  # every score -inf: index 0, as torch.argmax
        tl.store(tokens_ptr + row, token)
    else:
        token = tl.load(tokens_ptr + row)
    temperature = tl.load(temperature_ptr + row)
    temperature = tl.where(temperature > 0.0, temperature, 1.0)
    z_token = tl.math.div_rn(tl.load(logits_ptr + row.to(tl.int64) * stride_row + token), temperature)
    tl.store(out_ptr + row, z_token - lse)


def sample_and_logprobs(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    seeds: torch.Tensor,
    steps: torch.Tensor,
    filtered: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`sample` and `logprobs_of` of its tokens, split over the vocabulary -> (tokens int64 [B], logprobs
    float32 [B]). filtered: whether any row has a top-k / top-p / min-p filter on (a host fact; then the
    tokens come from `sample`'s per-row kernel). The logprobs never depend on that choice or on the batch."""
    batch, vocab = logits.shape
    _check_params(logits, temperature, top_k, top_p, min_p, seeds, steps)
    tokens = sample(logits, temperature, top_k, top_p, min_p, seeds, steps) if filtered else \
        torch.empty(batch, dtype=torch.int64, device=logits.device)
    out = torch.empty(batch, dtype=torch.float32, device=logits.device)
    if batch == 0:
        return tokens, out
    chunks = triton.cdiv(vocab, _CHUNK)
    m, s, best = (torch.empty(batch, chunks, dtype=torch.float32, device=logits.device) for _ in range(3))
    best_idx = torch.empty(batch, chunks, dtype=torch.int32, device=logits.device)
    _chunk_kernel[(batch, chunks)](
        logits, logits.stride(0), temperature, seeds, steps, m, s, best, best_idx, vocab, chunks,
        CHUNK=_CHUNK, SAMPLE=not filtered, num_warps=8,
    )  # fmt: skip
    _finish_kernel[(batch,)](
        logits, logits.stride(0), temperature, m, s, best, best_idx, tokens, out, vocab, chunks,
        BLOCK_C=max(16, triton.next_power_of_2(chunks)), SAMPLE=not filtered, num_warps=4,
    )  # fmt: skip
    return tokens, out


# --------------------------------------------------------------------------------------------------
# logprobs


@triton.jit
def _logprobs_kernel(logits_ptr, stride_row, temperature_ptr, tokens_ptr, out_ptr, V, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    temperature = tl.load(temperature_ptr + row)
    temperature = tl.where(temperature > 0.0, temperature, 1.0)
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    for off in range(0, V, BLOCK):  # online logsumexp, one running (max, sum) per lane
        idx = off + tl.arange(0, BLOCK)
        z = tl.math.div_rn(tl.load(row_ptr + idx, mask=idx < V, other=float("-inf")), temperature)
        m_new = tl.maximum(m, z)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.exp(z - m_safe)
        m = m_new
    m_row = tl.max(m, 0)
    lse = m_row + tl.log(tl.sum(s * tl.exp(m - m_row), 0))
    token = tl.load(tokens_ptr + row)
    z_token = tl.math.div_rn(tl.load(row_ptr + token), temperature)
    tl.store(out_ptr + row, z_token - lse)


def logprobs_of(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """log_softmax(logits / T')[b, tokens[b]] -> float32 [B], T' = temperature if > 0 else 1.

    logits [B, V] float32, tokens int64 [B], temperature float32 [B]."""
    batch, vocab = logits.shape
    _check_params(logits, tokens, temperature)
    assert tokens.dtype == torch.int64 and temperature.dtype == torch.float32
    if out is None:
        out = torch.empty(batch, dtype=torch.float32, device=logits.device)
    assert out.shape == (batch,) and out.dtype == torch.float32
    if batch > 0:
        _logprobs_kernel[(batch,)](
            logits, logits.stride(0), temperature, tokens, out, vocab, BLOCK=_BLOCK, num_warps=16
        )
    return out


def logprobs_of_ref(logits: torch.Tensor, tokens: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    t = torch.where(temperature > 0, temperature, 1.0)[:, None]
    return torch.log_softmax(logits / t, dim=-1).gather(1, tokens[:, None])[:, 0]
