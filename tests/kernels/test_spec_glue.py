"""The fused EAGLE step's index kernels (gyre.kernels.spec) against their torch definitions: every output,
and the in-place update of the next step's inputs, exactly."""

from __future__ import annotations

import pytest
import torch

from gyre.kernels.spec import (
    CAP,
    COUNT,
    GENERATED,
    MAX_GENERATED,
    PROLOGUE,
    SEED,
    SLOT,
    START,
    TOP_K,
    spec_epilogue,
    spec_epilogue_ref,
    spec_prologue,
    spec_prologue_ref,
)


def _inputs(bs, k, ps, width, gen, device):
    ints = torch.zeros(bs, 9, dtype=torch.int64)
    ints[:, SLOT] = torch.randint(0, 50, (bs,), generator=gen)
    ints[:, 1] = torch.randint(0, 1000, (bs,), generator=gen)
    ints[:, START] = torch.randint(1, width * ps - k - 1, (bs,), generator=gen)
    ints[:, COUNT] = torch.randint(-1, k + 1, (bs,), generator=gen)  # -1: a padding row
    ints[:, GENERATED] = torch.randint(0, 40, (bs,), generator=gen)
    ints[:, SEED] = torch.randint(-(2**62), 2**62, (bs,), generator=gen)
    ints[:, TOP_K] = torch.randint(-1, 50, (bs,), generator=gen)
    ints[:, MAX_GENERATED] = ints[:, GENERATED] + torch.randint(1, 12, (bs,), generator=gen)
    ints[:, CAP] = ints[:, START] + torch.randint(1, 12, (bs,), generator=gen)
    alive = (torch.rand(bs, generator=gen) < 0.8).to(torch.int64)
    floats = torch.rand(bs, 3, generator=gen)
    table = torch.randint(0, 10_000, (bs + 2, width + 3), dtype=torch.int32, generator=gen)[:bs, :width]  # strided
    return [t.to(device) for t in (ints, alive, floats)] + [table.to(device)]


@pytest.mark.parametrize("bs,k,ps", [(1, 1, 16), (3, 4, 16), (8, 3, 1), (5, 7, 4)])
def test_prologue_and_epilogue_match_torch(case, bs, k, ps):
    gen = torch.Generator().manual_seed(bs * 100 + k * 10 + ps)
    ints, alive, floats, table = _inputs(bs, k, ps, 6, gen, case.device)
    want = spec_prologue_ref(ints, alive, floats, table, k, ps, scratch=99)
    got = spec_prologue(ints, alive, floats, table, k, ps, scratch=99)
    for name in PROLOGUE:
        assert torch.equal(got[name], want[name].contiguous()), name
    drafts = torch.randint(0, 4, (bs, k), generator=gen).to(case.device)  # small ids: many matches
    samples = torch.randint(0, 4, (bs, k + 1), generator=gen).to(case.device)
    samples[0, :k] = drafts[0]  # every draft right
    ints_ref = ints.clone()
    want = spec_epilogue_ref(ints_ref, want, drafts, samples, k)
    got = spec_epilogue(ints, got, drafts, samples, k)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert torch.equal(ints, ints_ref)
    assert 0 < int(want["accepted"].max()) or int(want["out"][0, -1]) <= 0
