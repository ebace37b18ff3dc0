from __future__ import annotations

import pytest
import torch

from gyre.kernels.activation import silu_and_mul, silu_and_mul_ref


@pytest.mark.parametrize("num_tokens,inter", [(1, 8), (5, 100), (3, 1536), (2, 2500)])
def test_silu_and_mul(case, num_tokens, inter):
    gen = torch.Generator().manual_seed(inter)
    x = (torch.randn(num_tokens, 2 * inter, generator=gen) * 4).to(case.device, case.dtype)
    out = torch.full((num_tokens, inter), float("nan"), dtype=case.dtype, device=case.device)
    got = silu_and_mul(x, out=out)
    assert got is out
    case.close(got, silu_and_mul_ref(x))
    ref_hf = torch.nn.functional.silu(x[:, :inter].float()) * x[:, inter:].float()
    case.close(got, ref_hf)


def test_silu_and_mul_strided_rows(case):
    x = torch.randn(4, 3, 64, generator=torch.Generator().manual_seed(0)).to(case.device, case.dtype)[:, 1]
    case.close(silu_and_mul(x), silu_and_mul_ref(x))
