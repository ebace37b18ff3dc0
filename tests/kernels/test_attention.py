from __future__ import annotations

import pytest
import torch

from gyre.kernels.attention import (
    MAX_DECODE_SPLITS,
    decode_num_splits,
    paged_decode_attention,
    paged_decode_attention_ref,
    paged_extend_attention,
    paged_extend_attention_ref,
    store_kv,
    store_kv_ref,
)


def _paged_cache(seq_lens, page_size, num_kv_heads, head_dim, case, seed):
    """Random K/V in shuffled pages; page_table rows padded with a page no sequence owns."""
    gen = torch.Generator().manual_seed(seed)
    pages = [-(-s // page_size) for s in seq_lens]
    num_pages = sum(pages) + 2
    perm = torch.randperm(num_pages, generator=gen)
    page_table = torch.full((len(seq_lens), max(max(pages), 1) + 1), num_pages - 1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(pages):
        page_table[b, :n] = perm[used : used + n]
        used += n
    shape = (num_pages * page_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(case.device, case.dtype)
    v_cache = torch.randn(shape, generator=gen).to(case.device, case.dtype)
    return k_cache, v_cache, page_table.to(case.device)


DECODE_CASES = [
    # page_size, head_dim, (Hq, Hkv), seq_lens, split_size
    (1, 16, (2, 2), [1, 7, 40], 16),
    (3, 32, (4, 2), [5, 33, 70], 32),
    (4, 64, (8, 2), [16, 1, 100], 32),
    (16, 128, (4, 1), [17, 64, 129], 64),
    (64, 64, (6, 3), [200, 3, 64], 64),
    (16, 128, (8, 1), [300, 2], 256),  # default split size, two splits
    (4, 32, (2, 1), [0, 9], 16),  # an empty (padded) sequence gives zeros
    (16, 64, (8, 1), [1000], 16),  # 63 splits: four merge steps of 16
]


@pytest.mark.parametrize("page_size,head_dim,heads,seq_lens,split_size", DECODE_CASES)
def test_paged_decode_attention(case, page_size, head_dim, heads, seq_lens, split_size):
    num_q_heads, num_kv_heads = heads
    k_cache, v_cache, page_table = _paged_cache(seq_lens, page_size, num_kv_heads, head_dim, case, seed=1)
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(len(seq_lens), num_q_heads, head_dim, generator=gen).to(case.device, case.dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=case.device)
    scale = head_dim**-0.5
    out = torch.full_like(q, float("nan"))  # poison: every element must be written
    paged_decode_attention(
        q, k_cache, v_cache, page_table, lens, page_size, scale, split_size=split_size, out=out
    )
    ref = paged_decode_attention_ref(q, k_cache, v_cache, page_table, lens, page_size, scale)
    case.close(out, ref)


def test_paged_decode_attention_batch_invariant(case):
    """A sequence's output is bitwise the same alone or inside a batch (fixed split size)."""
    seq_lens = [90, 35, 61]
    k_cache, v_cache, page_table = _paged_cache(seq_lens, 4, 2, 32, case, seed=3)
    q = torch.randn(3, 4, 32, generator=torch.Generator().manual_seed(4)).to(case.device, case.dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=case.device)
    full = paged_decode_attention(q, k_cache, v_cache, page_table, lens, 4, 0.2, split_size=32)
    alone = paged_decode_attention(q[:1], k_cache, v_cache, page_table[:1], lens[:1], 4, 0.2, split_size=32)
    assert torch.equal(full[:1], alone)


SPLIT_CASES = [
    # page_size, head_dim, (Hq, Hkv), seq_lens, num_splits
    (1, 32, (32, 8), [0, 1, 70], 4),  # 70 tokens: 3 splits of 32
    (16, 32, (8, 1), [33, 0, 200, 1], 8),  # 200 tokens: 7 splits of 32
    (3, 16, (4, 2), [100, 5], 3),
    (16, 64, (6, 2), [64, 65, 31], 2),  # a group of 3 query heads
    (16, 64, (8, 1), [1000, 0], MAX_DECODE_SPLITS),  # 32 splits: two merge steps of 16
]


@pytest.mark.parametrize("page_size,head_dim,heads,seq_lens,num_splits", SPLIT_CASES)
def test_paged_decode_attention_num_splits(case, page_size, head_dim, heads, seq_lens, num_splits):
    """The flash-decoding layout (small batches): even splits merged by the last one to finish."""
    num_q_heads, num_kv_heads = heads
    k_cache, v_cache, page_table = _paged_cache(seq_lens, page_size, num_kv_heads, head_dim, case, seed=11)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=case.device)
    locks = torch.zeros(len(seq_lens) * num_kv_heads + 3, dtype=torch.int32, device=case.device)
    gen = torch.Generator().manual_seed(12)
    for _ in range(2):  # the counters are zero again after a launch
        q = torch.randn(len(seq_lens), num_q_heads, head_dim, generator=gen).to(case.device, case.dtype)
        out = torch.full_like(q, float("nan"))
        paged_decode_attention(q, k_cache, v_cache, page_table, lens, page_size, head_dim**-0.5,
                               num_splits=num_splits, locks=locks, out=out)  # fmt: skip
        ref = paged_decode_attention_ref(q, k_cache, v_cache, page_table, lens, page_size, head_dim**-0.5)
        case.close(out, ref)
        assert not locks.any()


def test_decode_num_splits_fill_the_gpu():
    assert decode_num_splits(1, 8, 8192, num_sms=132) == MAX_DECODE_SPLITS  # 8 programs -> 256
    assert decode_num_splits(4, 8, 8192, num_sms=132) == 9  # 32 programs -> 288
    assert decode_num_splits(1, 8, 40, num_sms=132) == 2  # no more splits than 32-token blocks
    assert decode_num_splits(64, 8, 8192, num_sms=132) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 4])
def test_decode_num_splits_in_cuda_graph_replays(batch):
    """Llama-3-8B heads in a CUDA graph: new seq_lens (0, 1, long) on every replay."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    dev, dt, page_size, max_pages, dim = "cuda", torch.bfloat16, 16, 300, 128
    gen = torch.Generator(device=dev).manual_seed(batch)
    k_cache = torch.randn(batch * max_pages * page_size, 8, dim, device=dev, dtype=dt, generator=gen)
    v_cache = torch.randn_like(k_cache)
    page_table = torch.randperm(batch * max_pages, device=dev, generator=gen).to(torch.int32)
    page_table = page_table.view(batch, max_pages)
    seq_lens = torch.ones(batch, dtype=torch.int32, device=dev)
    q = torch.randn(batch, 32, dim, device=dev, dtype=dt, generator=gen)
    locks = torch.zeros(batch * 8, dtype=torch.int32, device=dev)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    num_splits = decode_num_splits(batch, 8, max_pages * page_size, sms)

    def step():
        return paged_decode_attention(q, k_cache, v_cache, page_table, seq_lens, page_size, dim**-0.5,
                                      num_splits=num_splits, locks=locks)  # fmt: skip

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for trial in range(20):
        lens = torch.randint(0, max_pages * page_size + 1, (batch,), generator=gen, device=dev)
        lens[0] = [0, 1, max_pages * page_size, 577][trial % 4]
        seq_lens.copy_(lens)
        q.copy_(torch.randn(q.shape, device=dev, generator=gen))
        graph.replay()
        ref = paged_decode_attention_ref(q, k_cache, v_cache, page_table, seq_lens, page_size, dim**-0.5)
        torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    assert not locks.any()


EXTEND_CASES = [
    # page_size, head_dim, (Hq, Hkv), q_lens, prefix_lens
    (1, 16, (2, 1), [5, 1, 9], [0, 7, 3]),
    (3, 32, (4, 2), [70, 4], [0, 11]),
    (4, 64, (4, 4), [3, 66, 1], [5, 0, 0]),
    (16, 128, (8, 2), [20, 17], [33, 0]),
    (64, 32, (2, 2), [40, 0, 7], [100, 5, 64]),  # a sequence with no new tokens
]


@pytest.mark.parametrize("page_size,head_dim,heads,q_lens,prefix_lens", EXTEND_CASES)
def test_paged_extend_attention(case, page_size, head_dim, heads, q_lens, prefix_lens):
    num_q_heads, num_kv_heads = heads
    seq_lens = [p + n for p, n in zip(q_lens, prefix_lens)]
    k_cache, v_cache, page_table = _paged_cache(seq_lens, page_size, num_kv_heads, head_dim, case, seed=5)
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(sum(q_lens), num_q_heads, head_dim, generator=gen).to(case.device, case.dtype)
    cu = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32).to(case.device)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=case.device)
    scale = head_dim**-0.5
    out = torch.full_like(q, float("nan"))
    paged_extend_attention(q, k_cache, v_cache, page_table, cu, lens, page_size, scale, max(q_lens), out=out)
    ref = paged_extend_attention_ref(q, k_cache, v_cache, page_table, cu, lens, page_size, scale)
    case.close(out, ref)


def test_extend_matches_decode_for_one_token(case):
    seq_lens = [13, 50]
    k_cache, v_cache, page_table = _paged_cache(seq_lens, 4, 1, 64, case, seed=7)
    q = torch.randn(2, 2, 64, generator=torch.Generator().manual_seed(8)).to(case.device, case.dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=case.device)
    cu = torch.tensor([0, 1, 2], dtype=torch.int32, device=case.device)
    ext = paged_extend_attention(q, k_cache, v_cache, page_table, cu, lens, 4, 0.125, 1)
    dec = paged_decode_attention(q, k_cache, v_cache, page_table, lens, 4, 0.125, split_size=16)
    case.close(ext, dec)


@pytest.mark.parametrize("num_kv_heads,head_dim", [(1, 16), (2, 64), (3, 128)])
def test_store_kv(case, num_kv_heads, head_dim):
    gen = torch.Generator().manual_seed(9)
    num_slots, num_tokens = 40, 11
    k_cache = torch.randn(num_slots, num_kv_heads, head_dim, generator=gen).to(case.device, case.dtype)
    v_cache = torch.randn(num_slots, num_kv_heads, head_dim, generator=gen).to(case.device, case.dtype)
    # k, v as strided views of a fused qkv projection output
    qkv = torch.randn(num_tokens, 4 * num_kv_heads, head_dim, generator=gen).to(case.device, case.dtype)
    k, v = qkv[:, num_kv_heads : 2 * num_kv_heads], qkv[:, 2 * num_kv_heads : 3 * num_kv_heads]
    slots = torch.randperm(num_slots, generator=gen)[:num_tokens]
    slots[3] = -1  # padding token
    slots = slots.to(case.device)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv(k_cache, v_cache, k, v, slots)
    store_kv_ref(k_ref, v_ref, k, v, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
