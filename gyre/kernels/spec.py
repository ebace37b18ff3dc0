"""Index arithmetic of the fused EAGLE step (gyre.engine.spec.fused) in two kernels, one program per request.

The step's model work is a few hundred kernels; its bookkeeping (positions, KV slots, lengths, sampling
parameters per verify row, acceptance, the catch-up's rows, the next step's inputs) was some 80 more tiny
torch ops, each a few microseconds in a CUDA graph. `spec_prologue` computes everything the drafts and
the verify need from the step's inputs; `spec_epilogue`, once the verify is sampled, everything after.
The *_ref functions are the torch definitions (used on the CPU); the kernels reproduce them exactly.

Inputs (FusedEagle's buffers): ints [B, num_ints] int64 with columns SLOT, LAST, START, COUNT, GENERATED,
SEED, TOP_K, MAX_GENERATED, CAP (gyre.engine.spec.fused); alive [B] int64; floats [B, 3] float32
(temperature, top_p, min_p); table [B, W] int32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SLOT, LAST, START, COUNT, GENERATED, SEED, TOP_K, MAX_GENERATED, CAP = range(9)

PROLOGUE = ("count", "slot", "positions", "slots", "step_pos", "step_slots", "step_lens", "verify_slots",
            "verify_lens", "prefix_lens", "group_lens", "temperature", "top_p", "min_p", "top_k", "seeds",
            "steps")
EPILOGUE = ("accepted", "catch_slots", "catch_lens", "pick", "out")


def spec_prologue_ref(ints: torch.Tensor, alive: torch.Tensor, floats: torch.Tensor, table: torch.Tensor, k: int,
                      page_size: int, scratch: int) -> dict[str, torch.Tensor]:
    """count, slot [B] (masked: -1 / scratch where not alive); positions, slots [B, k + 1] (L + j and its KV
    slot); step_pos, step_slots [k - 1, B] int64, step_lens [k - 1, B] int32 (draft step s at L + s, live
    while s + 1 < count); verify_slots [R] int64, verify_lens, prefix_lens, group_lens [R] int32 (R = B (k + 1);
    rows past count store nothing and read row 0's length; each request's rows one shared-prefix group);
    temperature, top_p, min_p [R] float32, top_k [R] int32, seeds, steps [R] int64 (row j: generated + j)."""
    ps, width = page_size, table.shape[1]
    alive = alive > 0
    count = torch.where(alive, ints[:, COUNT], -1)
    slot = torch.where(alive, ints[:, SLOT], scratch)
    start, real = ints[:, START], count >= 0
    j = torch.arange(k + 1, device=ints.device)
    positions = start[:, None] + j
    pages = table.gather(1, (positions // ps).clamp(0, width - 1)).to(torch.int64)
    slots = pages * ps + positions % ps
    live = count[None, :] > j[1:k, None]  # [k - 1, B]
    step_pos = positions[:, :k - 1].T.contiguous()
    out = {"count": count, "slot": slot, "positions": positions, "slots": slots, "step_pos": step_pos,
           "step_slots": torch.where(live, slots[:, :k - 1].T, -1).contiguous(),
           "step_lens": torch.where(live, step_pos + 1, 0).to(torch.int32)}
    verify = j[None] <= count[:, None]
    lens = torch.where(real[:, None], start[:, None] + 1 + torch.minimum(j[None], count.clamp(min=0)[:, None]), 0)
    out["verify_slots"] = torch.where(verify, slots, -1).reshape(-1)
    out["verify_lens"] = lens.reshape(-1).to(torch.int32)
    out["prefix_lens"] = torch.where(real[:, None], start[:, None] + 1, 0).expand(-1, k + 1).reshape(-1).to(torch.int32)
    out["group_lens"] = torch.where(real[:, None] & (j[None] == 0), k + 1, 0).reshape(-1).to(torch.int32)
    for c, name in enumerate(("temperature", "top_p", "min_p")):
        out[name] = floats[:, c].repeat_interleave(k + 1)
    out["top_k"] = ints[:, TOP_K].to(torch.int32).repeat_interleave(k + 1)
    out["seeds"] = ints[:, SEED].repeat_interleave(k + 1)
    out["steps"] = (ints[:, GENERATED, None] + j[None]).reshape(-1)
    return out


def spec_epilogue_ref(ints: torch.Tensor, pro: dict[str, torch.Tensor], drafts: torch.Tensor, samples: torch.Tensor,
                      k: int) -> dict[str, torch.Tensor]:
    """After the verify: accepted [B] (leading drafts equal to the samples, within count); catch_slots [R]
    int64, catch_lens [R] int32 (rows 0..a of live requests); pick [B] (row b (k + 1) + a); out [B, 2k + 3]
    (drafts, samples, a, count). Then ints' first five columns become the next step's (in place)."""
    count, start, generated = pro["count"], ints[:, START], ints[:, GENERATED]
    j = torch.arange(k + 1, device=ints.device)
    real = count >= 0
    match = (drafts == samples[:, :k]) & (j[None, :k] < count[:, None])
    accepted = match.to(torch.int64).cumprod(1).sum(1)
    done = (j[None] <= accepted[:, None]) & real[:, None]
    bs = ints.shape[0]
    out = {"accepted": accepted, "catch_slots": torch.where(done, pro["slots"], -1).reshape(-1),
           "catch_lens": torch.where(done, pro["positions"] + 1, 0).reshape(-1).to(torch.int32),
           "pick": torch.arange(bs, device=ints.device) * (k + 1) + accepted,
           "out": torch.cat([drafts, samples, accepted[:, None], count[:, None]], 1)}
    grown = accepted + 1
    new_start, new_generated = start + grown, generated + grown
    room = torch.minimum(ints[:, MAX_GENERATED] - new_generated - 1, ints[:, CAP] - new_start - 1)
    last = samples.gather(1, accepted[:, None])[:, 0]
    new = torch.stack([pro["slot"], torch.where(real, last, ints[:, LAST]), torch.where(real, new_start, start),
                       torch.where(real, room.clamp(min=0, max=k), -1), torch.where(real, new_generated, generated)], 1)
    ints[:, :GENERATED + 1].copy_(new)
    return out


@triton.jit
def _prologue_kernel(ints_ptr, alive_ptr, floats_ptr, table_ptr, stride_t, width, scratch,
                     count_ptr, slot_ptr, pos_ptr, slots_ptr, step_pos_ptr, step_slots_ptr, step_lens_ptr,
                     verify_slots_ptr, verify_lens_ptr, prefix_ptr, group_ptr, temp_ptr, top_p_ptr, min_p_ptr,
                     top_k_ptr, seeds_ptr, steps_ptr, B,
                     K: tl.constexpr, PS: tl.constexpr, NUM_INTS: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    row = ints_ptr + b * NUM_INTS
    alive = tl.load(alive_ptr + b) > 0
    count = tl.where(alive, tl.load(row + 3), -1)
    slot = tl.where(alive, tl.load(row + 0), scratch)
    start = tl.load(row + 2)
    tl.store(count_ptr + b, count)
    tl.store(slot_ptr + b, slot)
    j = tl.arange(0, BLOCK)
    jm = j <= K
    pos = start + j
    page = tl.load(table_ptr + b * stride_t + tl.minimum(pos // PS, width - 1), mask=jm, other=0).to(tl.int64)
    slots = page * PS + pos % PS
    r = b * (K + 1) + j
    tl.store(pos_ptr + r, pos, mask=jm)
    tl.store(slots_ptr + r, slots, mask=jm)
    sm = j < K - 1
    live = count > j + 1
    tl.store(step_pos_ptr + j * B + b, pos, mask=sm)
    tl.store(step_slots_ptr + j * B + b, tl.where(live, slots, -1), mask=sm)
    tl.store(step_lens_ptr + j * B + b, tl.where(live, pos + 1, 0).to(tl.int32), mask=sm)
    real = count >= 0
    tl.store(verify_slots_ptr + r, tl.where(j <= count, slots, -1), mask=jm)
    lens = tl.where(real, start + 1 + tl.minimum(j, tl.maximum(count, 0)), 0)
    tl.store(verify_lens_ptr + r, lens.to(tl.int32), mask=jm)
    zero = tl.zeros([BLOCK], dtype=tl.int64)
    tl.store(prefix_ptr + r, tl.where(real, start + 1 + zero, 0).to(tl.int32), mask=jm)
    tl.store(group_ptr + r, tl.where(real & (j == 0), K + 1, 0).to(tl.int32), mask=jm)
    fzero = tl.zeros([BLOCK], dtype=tl.float32)
    tl.store(temp_ptr + r, tl.load(floats_ptr + b * 3) + fzero, mask=jm)
    tl.store(top_p_ptr + r, tl.load(floats_ptr + b * 3 + 1) + fzero, mask=jm)
    tl.store(min_p_ptr + r, tl.load(floats_ptr + b * 3 + 2) + fzero, mask=jm)
    tl.store(top_k_ptr + r, (tl.load(row + 6) + zero).to(tl.int32), mask=jm)
    tl.store(seeds_ptr + r, tl.load(row + 5) + zero, mask=jm)
    tl.store(steps_ptr + r, tl.load(row + 4) + j, mask=jm)


@triton.jit
def _epilogue_kernel(ints_ptr, count_ptr, slot_ptr, pos_ptr, slots_ptr, drafts_ptr, samples_ptr,
                     accepted_ptr, catch_slots_ptr, catch_lens_ptr, pick_ptr, out_ptr,
                     K: tl.constexpr, NUM_INTS: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    j = tl.arange(0, BLOCK)
    jm = j <= K
    count = tl.load(count_ptr + b)
    r = b * (K + 1) + j
    drafts = tl.load(drafts_ptr + b * K + j, mask=j < K, other=-1)
    samples = tl.load(samples_ptr + r, mask=jm, other=-2)
    match = (drafts == samples) & (j < K) & (j < count)
    accepted = tl.min(tl.where(match, BLOCK, j), axis=0).to(tl.int64)  # the first mismatch
    real = count >= 0
    done = (j <= accepted) & real
    pos = tl.load(pos_ptr + r, mask=jm, other=0)
    tl.store(catch_slots_ptr + r, tl.where(done, tl.load(slots_ptr + r, mask=jm, other=0), -1), mask=jm)
    tl.store(catch_lens_ptr + r, tl.where(done, pos + 1, 0).to(tl.int32), mask=jm)
    tl.store(pick_ptr + b, b * (K + 1) + accepted)
    tl.store(accepted_ptr + b, accepted)
    width = 2 * K + 3
    tl.store(out_ptr + b * width + j, drafts, mask=j < K)
    tl.store(out_ptr + b * width + K + j, samples, mask=jm)
    tl.store(out_ptr + b * width + 2 * K + 1, accepted)
    tl.store(out_ptr + b * width + 2 * K + 2, count)
    row = ints_ptr + b * NUM_INTS
    start = tl.load(row + 2)
    generated = tl.load(row + 4)
    new_start = start + accepted + 1
    new_generated = generated + accepted + 1
    room = tl.minimum(tl.load(row + 7) - new_generated - 1, tl.load(row + 8) - new_start - 1)
    last = tl.sum(tl.where(j == accepted, samples, 0), axis=0)
    tl.store(row + 0, tl.load(slot_ptr + b))
    tl.store(row + 1, tl.where(real, last, tl.load(row + 1)))
    tl.store(row + 2, tl.where(real, new_start, start))
    tl.store(row + 3, tl.where(real, tl.minimum(tl.maximum(room, 0), K), -1))
    tl.store(row + 4, tl.where(real, new_generated, generated))


def spec_prologue(ints: torch.Tensor, alive: torch.Tensor, floats: torch.Tensor, table: torch.Tensor, k: int,
                  page_size: int, scratch: int) -> dict[str, torch.Tensor]:
    """spec_prologue_ref in one launch."""
    bs, dev = ints.shape[0], ints.device
    rows, steps = bs * (k + 1), max(k - 1, 0)
    assert ints.is_contiguous() and floats.is_contiguous() and table.stride(1) == 1 and alive.is_contiguous()
    i64, i32, f32 = torch.int64, torch.int32, torch.float32
    out = {"count": torch.empty(bs, dtype=i64, device=dev), "slot": torch.empty(bs, dtype=i64, device=dev),
           "positions": torch.empty(bs, k + 1, dtype=i64, device=dev),
           "slots": torch.empty(bs, k + 1, dtype=i64, device=dev),
           "step_pos": torch.empty(steps, bs, dtype=i64, device=dev),
           "step_slots": torch.empty(steps, bs, dtype=i64, device=dev),
           "step_lens": torch.empty(steps, bs, dtype=i32, device=dev)}
    for name, dtype in (("verify_slots", i64), ("verify_lens", i32), ("prefix_lens", i32), ("group_lens", i32),
                        ("temperature", f32), ("top_p", f32), ("min_p", f32), ("top_k", i32), ("seeds", i64),
                        ("steps", i64)):
        out[name] = torch.empty(rows, dtype=dtype, device=dev)
    if bs:
        _prologue_kernel[(bs,)](ints, alive, floats, table, table.stride(0), table.shape[1], scratch,
                                *(out[name] for name in PROLOGUE), bs, K=k, PS=page_size, NUM_INTS=ints.shape[1],
                                BLOCK=triton.next_power_of_2(k + 1))
    return out


def spec_epilogue(ints: torch.Tensor, pro: dict[str, torch.Tensor], drafts: torch.Tensor, samples: torch.Tensor,
                  k: int) -> dict[str, torch.Tensor]:
    """spec_epilogue_ref in one launch."""
    bs, dev = ints.shape[0], ints.device
    assert ints.is_contiguous() and drafts.is_contiguous() and samples.is_contiguous()
    out = {"accepted": torch.empty(bs, dtype=torch.int64, device=dev),
           "catch_slots": torch.empty(bs * (k + 1), dtype=torch.int64, device=dev),
           "catch_lens": torch.empty(bs * (k + 1), dtype=torch.int32, device=dev),
           "pick": torch.empty(bs, dtype=torch.int64, device=dev),
           "out": torch.empty(bs, 2 * k + 3, dtype=torch.int64, device=dev)}
    if bs:
        _epilogue_kernel[(bs,)](ints, pro["count"], pro["slot"], pro["positions"], pro["slots"], drafts, samples,
                                *(out[name] for name in EPILOGUE), K=k, NUM_INTS=ints.shape[1],
                                BLOCK=triton.next_power_of_2(k + 1))
    return out
