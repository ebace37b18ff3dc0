"""The launchers the decode step runs inside a CUDA graph capture and replay with new inputs (no host
syncs, no data-dependent allocations)."""

from __future__ import annotations

import pytest
import torch

from gyre.kernels.attention import paged_decode_attention, paged_decode_attention_ref, store_kv
from gyre.kernels.moe import fused_moe, fused_moe_ref
from gyre.kernels.sampling import logprobs_of, sample, sample_ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_decode_step_in_cuda_graph():
    dev, dt = "cuda", torch.bfloat16
    batch, page_size, pages, heads, kv_heads, dim, vocab = 4, 16, 8, 8, 2, 64, 1000
    k_cache = torch.randn(batch * pages * page_size, kv_heads, dim, device=dev, dtype=dt)
    v_cache = torch.randn_like(k_cache)
    page_table = torch.randperm(batch * pages, device=dev, dtype=torch.int32).view(batch, pages)
    seq_lens = torch.tensor([5, 17, 100, 128], device=dev, dtype=torch.int32)
    slots = torch.zeros(batch, dtype=torch.int64, device=dev)
    q = torch.randn(batch, heads, dim, device=dev, dtype=dt)
    k_new, v_new = (
        torch.randn(batch, kv_heads, dim, device=dev, dtype=dt),
        torch.randn(batch, kv_heads, dim, device=dev, dtype=dt),
    )
    experts, hidden, inter = 8, 64, 32
    x = torch.randn(batch, hidden, device=dev, dtype=dt)
    w13 = torch.randn(experts, 2 * inter, hidden, device=dev, dtype=dt) / 8
    w2 = torch.randn(experts, hidden, inter, device=dev, dtype=dt) / 6
    topk_w, topk_ids = torch.randn(batch, experts, device=dev).softmax(-1).topk(2, -1)
    logits = torch.randn(batch, vocab, device=dev)
    params = [torch.ones(batch, device=dev), torch.full((batch,), 20, dtype=torch.int32, device=dev),
              torch.full((batch,), 0.9, device=dev), torch.zeros(batch, device=dev),
              torch.arange(batch, device=dev), torch.zeros(batch, dtype=torch.int64, device=dev)]  # fmt: skip

    def step():
        store_kv(k_cache, v_cache, k_new, v_new, slots)
        attn = paged_decode_attention(q, k_cache, v_cache, page_table, seq_lens, page_size, 0.125)
        moe = fused_moe(x, w13, w2, topk_w, topk_ids)
        tokens = sample(logits, *params)
        return attn, moe, tokens, logprobs_of(logits, tokens, params[0])

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for trial in range(2):
        q.copy_(torch.randn_like(q))
        x.copy_(torch.randn_like(x))
        logits.copy_(torch.randn_like(logits) * 3)
        seq_lens.copy_(torch.tensor([1 + trial, 40, 64, 127 - trial], dtype=torch.int32))
        last = seq_lens.long() - 1  # the new token's position
        slots.copy_(
            page_table.gather(1, last[:, None] // page_size)[:, 0].long() * page_size + last % page_size
        )
        topk_ids.copy_(torch.randint(0, experts, (batch, 2), device=dev).sort(-1).values)
        params[5].fill_(trial + 1)
        graph.replay()
        attn, moe, tokens, logprobs = outs
        ref = paged_decode_attention_ref(q, k_cache, v_cache, page_table, seq_lens, page_size, 0.125)
        torch.testing.assert_close(attn.float(), ref.float(), atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(
            moe.float(), fused_moe_ref(x, w13, w2, topk_w, topk_ids).float(), atol=2e-2, rtol=2e-2
        )
        assert torch.equal(tokens, sample_ref(logits, *params))
        expected = torch.log_softmax(logits, -1).gather(1, tokens[:, None])[:, 0]
        torch.testing.assert_close(logprobs, expected)
