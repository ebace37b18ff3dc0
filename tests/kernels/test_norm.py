from __future__ import annotations

import pytest
import torch

from gyre.kernels.norm import rms_norm, rms_norm_ref


@pytest.mark.parametrize("num_tokens,hidden", [(1, 16), (5, 96), (7, 1000), (3, 4096)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(case, num_tokens, hidden, with_residual):
    gen = torch.Generator().manual_seed(hidden)
    x = (torch.randn(num_tokens, hidden, generator=gen) * 3).to(case.device, case.dtype)
    weight = (torch.rand(hidden, generator=gen) + 0.5).to(case.device, case.dtype)
    residual = torch.randn(num_tokens, hidden, generator=gen).to(case.device, case.dtype)
    x_before, residual_before = x.clone(), residual.clone()
    out = torch.full_like(x, float("nan"))
    if with_residual:
        got, new_residual = rms_norm(x, weight, 1e-6, residual=residual, out=out)
        ref, ref_residual = rms_norm_ref(x, weight, 1e-6, residual=residual)
        case.close(new_residual, ref_residual)
    else:
        got = rms_norm(x, weight, 1e-6, out=out)
        ref = rms_norm_ref(x, weight, 1e-6)
    assert got is out and got.dtype == case.dtype
    case.close(got, ref)
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before)


def test_rms_norm_strided_rows(case):
    x = torch.randn(6, 2, 64, generator=torch.Generator().manual_seed(0)).to(case.device, case.dtype)[:, 1]
    weight = torch.rand(64, generator=torch.Generator().manual_seed(1)).to(case.device, case.dtype)
    case.close(rms_norm(x, weight, 1e-5), rms_norm_ref(x, weight, 1e-5))


def test_rms_norm_matches_hf(case):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    hf = LlamaRMSNorm(128, eps=1e-5).to(case.device, case.dtype)
    with torch.no_grad():
        hf.weight.copy_(torch.rand(128, generator=torch.Generator().manual_seed(2)) + 0.5)
        x = torch.randn(4, 128, generator=torch.Generator().manual_seed(3)).to(case.device, case.dtype)
        case.close(rms_norm(x, hf.weight, 1e-5), hf(x))
