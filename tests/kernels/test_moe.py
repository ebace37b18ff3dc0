from __future__ import annotations

import pytest
import torch

from gyre.kernels.moe import fused_moe, fused_moe_ref, moe_align_block_size, moe_align_block_size_ref


@pytest.mark.parametrize(
    "num_tokens,top_k,num_experts,block_m", [(1, 1, 1, 16), (5, 2, 8, 16), (40, 4, 6, 64), (70, 8, 160, 16)]
)
def test_moe_align_block_size(case, num_tokens, top_k, num_experts, block_m):
    gen = torch.Generator().manual_seed(num_tokens)
    topk_ids = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(num_tokens)])
    got = moe_align_block_size(topk_ids.int().to(case.device), block_m, num_experts)
    ref = moe_align_block_size_ref(topk_ids, block_m, num_experts)
    for g, r in zip(got, ref):
        assert g.dtype == torch.int32 and torch.equal(g.cpu(), r)
    sorted_ids, expert_ids, num_padded = ref
    num_pairs = num_tokens * top_k
    total = int(num_padded)
    assert total % block_m == 0 and sorted_ids.shape[0] >= total and sorted_ids.shape[0] % block_m == 0
    flat = topk_ids.flatten()
    real = sorted_ids[:total][sorted_ids[:total] < num_pairs]
    assert sorted(real.tolist()) == list(range(num_pairs))  # every pair exactly once
    assert (sorted_ids[total:] == num_pairs).all()
    for i in range(total // block_m):
        rows = sorted_ids[i * block_m : (i + 1) * block_m]
        rows = rows[rows < num_pairs].long()
        assert len(rows) > 0 and (flat[rows] == expert_ids[i]).all()  # one expert per block
    assert (expert_ids[total // block_m :] == -1).all()


CASES = [
    # T, H, I, E, k
    (1, 32, 16, 4, 2),
    (7, 64, 48, 8, 2),
    (33, 48, 80, 6, 3),  # > E pairs: BLOCK_M = 64 blocks, ragged H and I
    (3, 128, 64, 16, 1),
]


@pytest.mark.parametrize("num_tokens,hidden,inter,num_experts,top_k", CASES)
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
def test_fused_moe(case, num_tokens, hidden, inter, num_experts, top_k, ids_dtype):
    gen = torch.Generator().manual_seed(num_tokens * hidden)
    x = torch.randn(num_tokens, hidden, generator=gen).to(case.device, case.dtype)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden**0.5).to(
        case.device, case.dtype
    )
    w2 = (torch.randn(num_experts, hidden, inter, generator=gen) / inter**0.5).to(case.device, case.dtype)
    scores = torch.randn(num_tokens, num_experts, generator=gen).softmax(-1)
    topk_weights, topk_ids = scores.topk(top_k, dim=-1)
    topk_weights, topk_ids = topk_weights.to(case.device), topk_ids.to(case.device, ids_dtype)
    out = torch.full_like(x, float("nan"))
    got = fused_moe(x, w13, w2, topk_weights, topk_ids, out=out)
    assert got is out
    case.close(got, fused_moe_ref(x, w13, w2, topk_weights, topk_ids))
