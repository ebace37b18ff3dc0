"""The FlashInfer attention backend against the torch reference backend (GPU, flashinfer installed):
decode, extend over a cached prefix, GQA, page sizes 1 and 16, CUDA-graph decode, and an Engine's greedy
tokens against the Triton backend. On the CPU: asking for it without flashinfer says how to install it."""

from __future__ import annotations

import importlib.util
from itertools import accumulate

import pytest
import torch

from gyre import Engine, SamplingParams
from gyre.engine.kv_pool import KVPool
from gyre.engine.layers.attention import AttentionMetadata, TorchBackend, make_backend
from gyre.testing import tiny_model

HAS_FLASHINFER = importlib.util.find_spec("flashinfer") is not None
needs_flashinfer = pytest.mark.skipif(not (HAS_FLASHINFER and torch.cuda.is_available()),
                                      reason="needs a CUDA GPU and flashinfer")
DTYPE = torch.bfloat16


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual.float(), expected.float(), atol=2e-2, rtol=2e-2)


def _random_pool(num_pages: int, page_size: int, num_kv_heads: int, head_dim: int, gen) -> KVPool:
    pool = KVPool(num_pages, page_size, 1, num_kv_heads, head_dim, DTYPE, torch.device("cuda"))
    for cache in (pool.k_cache[0], pool.v_cache[0]):
        cache.copy_(torch.randn(cache.shape, generator=gen))
    return pool


def _step(page_size, heads, head_dim, prefix_lens, q_lens, seed):
    """A pool of random KV (every sequence in shuffled pages, page 0 unused) and one step of new tokens
    after each cached prefix -> (pool, AttentionMetadata fields, q, k, v)."""
    gen = torch.Generator().manual_seed(seed)
    num_q_heads, num_kv_heads = heads
    seq_lens = [p + n for p, n in zip(prefix_lens, q_lens)]
    pages = [-(-s // page_size) for s in seq_lens]
    pool = _random_pool(sum(pages) + 2, page_size, num_kv_heads, head_dim, gen)
    free = (torch.randperm(pool.num_pages - 1, generator=gen) + 1).tolist()
    tables = [[free.pop() for _ in range(n)] for n in pages]
    width = max(pages)
    slots = [t[i // page_size] * page_size + i % page_size
             for t, p, s in zip(tables, prefix_lens, seq_lens) for i in range(p, s)]  # fmt: skip
    num_tokens = sum(q_lens)
    q, k, v = (torch.randn(num_tokens, h, head_dim, generator=gen).to("cuda", DTYPE)
               for h in (num_q_heads, num_kv_heads, num_kv_heads))  # fmt: skip
    i32 = dict(dtype=torch.int32, device="cuda")
    fields = dict(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device="cuda"),
        page_table=torch.tensor([t + [0] * (width - len(t)) for t in tables], **i32),
        seq_lens=torch.tensor(seq_lens, **i32), cu_seqlens_q=torch.tensor([0, *accumulate(q_lens)], **i32),
        max_q_len=max(q_lens), seq_lens_cpu=seq_lens, q_lens_cpu=q_lens,
        is_decode=all(n == 1 for n in q_lens))
    return pool, fields, q, k, v


def _reference(pool: KVPool, fields: dict, q, k, v) -> tuple[torch.Tensor, KVPool]:
    """TorchBackend in float32 over a copy of the pool -> (output, the copy after the step's store)."""
    ref = KVPool(pool.num_pages, pool.page_size, 1, pool.num_kv_heads, pool.head_dim, torch.float32,
                 pool.device)
    ref.k_cache[0].copy_(pool.k_cache[0])
    ref.v_cache[0].copy_(pool.v_cache[0])
    backend, meta = TorchBackend(ref), AttentionMetadata(**fields)
    backend.prepare(meta)
    out = backend.forward(q.float(), k.float(), v.float(), 0, pool.head_dim**-0.5, meta)
    return out, ref


def _assert_same_kv(pool: KVPool, ref: KVPool) -> None:
    assert torch.equal(pool.k_cache[0].float(), ref.k_cache[0])
    assert torch.equal(pool.v_cache[0].float(), ref.v_cache[0])


def _check_step(pool, fields, q, k, v) -> None:
    expected, ref = _reference(pool, fields, q, k, v)
    backend = make_backend("flashinfer", pool)
    for _ in range(2):  # a fresh backend plans at its first forward, then in prepare (the store repeats)
        meta = AttentionMetadata(**fields)
        backend.prepare(meta)
        _close(backend.forward(q, k, v, 0, pool.head_dim**-0.5, meta), expected)
        _assert_same_kv(pool, ref)


DECODE_CASES = [
    # page_size, head_dim, (Hq, Hkv), prefix_lens (each sequence decodes one token)
    (1, 64, (4, 4), [0, 6, 39]),
    (16, 128, (8, 2), [16, 0, 100, 300]),
    (16, 64, (8, 1), [15, 33]),
    (1, 128, (32, 8), [200, 1]),
    (5, 64, (6, 2), [10, 44, 3]),
]


@pytest.mark.gpu
@needs_flashinfer
@pytest.mark.parametrize("page_size,head_dim,heads,prefix_lens", DECODE_CASES)
def test_decode_matches_reference(page_size, head_dim, heads, prefix_lens):
    _check_step(*_step(page_size, heads, head_dim, prefix_lens, [1] * len(prefix_lens), seed=1))


EXTEND_CASES = [
    # page_size, head_dim, (Hq, Hkv), q_lens, prefix_lens
    (1, 64, (4, 2), [5, 1, 9], [0, 7, 3]),
    (16, 128, (8, 2), [20, 17], [33, 0]),
    (16, 64, (8, 8), [70, 4, 1], [0, 11, 40]),
    (1, 128, (8, 1), [40, 3], [100, 64]),
]


@pytest.mark.gpu
@needs_flashinfer
@pytest.mark.parametrize("page_size,head_dim,heads,q_lens,prefix_lens", EXTEND_CASES)
def test_extend_matches_reference(page_size, head_dim, heads, q_lens, prefix_lens):
    _check_step(*_step(page_size, heads, head_dim, prefix_lens, q_lens, seed=2))


@pytest.mark.gpu
@needs_flashinfer
def test_decode_in_cuda_graph_is_planned_before_each_replay():
    """CudaGraphRunner's protocol: prepare_graph, warm up, capture; then per step new inputs in the static
    buffers, prepare_graph with the real lengths, replay. Padding rows (slot -1, length 0) store nothing."""
    bucket, width, page_size, (num_q_heads, num_kv_heads), head_dim = 4, 8, 16, (8, 2), 64
    gen = torch.Generator().manual_seed(3)
    pool = _random_pool(bucket * width + 1, page_size, num_kv_heads, head_dim, gen)
    slot_mapping = torch.full((bucket,), -1, dtype=torch.int64, device="cuda")
    page_table = torch.zeros(bucket, width, dtype=torch.int32, device="cuda")
    seq_lens = torch.zeros(bucket, dtype=torch.int32, device="cuda")
    cu = torch.arange(bucket + 1, dtype=torch.int32, device="cuda")
    q = torch.zeros(bucket, num_q_heads, head_dim, dtype=DTYPE, device="cuda")
    k, v = torch.zeros(2, bucket, num_kv_heads, head_dim, dtype=DTYPE, device="cuda")

    def meta(lens: list[int]) -> AttentionMetadata:
        return AttentionMetadata(slot_mapping=slot_mapping, page_table=page_table, seq_lens=seq_lens,
                                 cu_seqlens_q=cu, max_q_len=1, seq_lens_cpu=lens, q_lens_cpu=[1] * bucket,
                                 is_decode=True)

    backend, scale = make_backend("flashinfer", pool), head_dim**-0.5
    captured = meta([1] * bucket)
    backend.prepare_graph(captured)
    backend.forward(q, k, v, 0, scale, captured)  # warm up: learns the query heads, plans outside the graph
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.forward(q, k, v, 0, scale, captured)
    for lens in ([5, 17, 100], [128, 1, 64], [33]):
        bs = len(lens)
        free = (torch.randperm(pool.num_pages - 1, generator=gen) + 1).tolist()
        tables = [[free.pop() for _ in range(-(-n // page_size))] for n in lens]
        for b, t in enumerate(tables):
            page_table[b, : len(t)] = torch.tensor(t, dtype=torch.int32)
        seq_lens.copy_(torch.tensor(lens + [0] * (bucket - bs), dtype=torch.int32))
        slots = [t[(n - 1) // page_size] * page_size + (n - 1) % page_size for t, n in zip(tables, lens)]
        slot_mapping.copy_(torch.tensor(slots + [-1] * (bucket - bs)))
        for x in (q, k, v):
            x.copy_(torch.randn(x.shape, generator=gen))
        fields = dict(slot_mapping=slot_mapping[:bs], page_table=page_table[:bs], seq_lens=seq_lens[:bs],
                      cu_seqlens_q=cu[: bs + 1], max_q_len=1, seq_lens_cpu=lens, q_lens_cpu=[1] * bs,
                      is_decode=True)
        expected, ref = _reference(pool, fields, q[:bs], k[:bs], v[:bs])
        backend.prepare_graph(meta(lens + [0] * (bucket - bs)))
        graph.replay()
        _close(out[:bs], expected)
        _assert_same_kv(pool, ref)


@pytest.mark.gpu
@needs_flashinfer
def test_float32_is_refused():
    pool = KVPool(4, 16, 1, 2, 64, torch.float32, torch.device("cuda"))
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        make_backend("flashinfer", pool)


# -- through an Engine -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama64(tmp_path_factory) -> str:
    return str(tiny_model("llama", tmp_path_factory.mktemp("flashinfer") / "llama", head_dim=64))


def _assert_greedy_agrees(a, b, tol: float = 0.05) -> None:
    """Greedy tokens of two bf16 attention backends: equal, with close logprobs, except that they may part
    at a near-tie (b's token within `tol` of a's under a), after which they continue differently."""
    for i, (x, y) in enumerate(zip(a.output_ids, b.output_ids)):
        if x != y:
            top = a.top_logprobs[i]
            assert y in top and top[x] - top[y] < tol, (i, x, y, top)
            return
        assert abs(a.output_logprobs[i] - b.output_logprobs[i]) < tol, (i, a.output_logprobs,
                                                                         b.output_logprobs)


@pytest.mark.gpu
@needs_flashinfer
@pytest.mark.parametrize("page_size", [1, 16])
def test_engine_greedy_matches_triton(llama64, page_size):
    """Chunked prefills (extend over a cached prefix, mixed with decodes) run eagerly; decode steps of 6
    sequences replay the CUDA graph of bucket 8 (2 padding rows)."""
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 1500, (n,), generator=gen).tolist() for n in (3, 17, 40, 9, 33, 70)]
    sp = SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True, top_logprobs=2)
    outs = {}
    for backend in ("triton", "flashinfer"):
        with Engine(llama64, device="cuda", dtype="bfloat16", attention_backend=backend, page_size=page_size,
                    max_num_tokens=8192, max_batch_tokens=48, cuda_graph_max_bs=16) as eng:
            outs[backend] = eng.generate(prompts, sp)
            if backend == "flashinfer":  # decode steps replay graphs captured over FlashInfer's wrappers
                assert eng.runner.graphs is not None and eng.runner.backend.graph_decode
    for a, b in zip(outs["triton"], outs["flashinfer"]):
        _assert_greedy_agrees(a, b)


@pytest.mark.skipif(HAS_FLASHINFER, reason="flashinfer is installed")
def test_engine_without_flashinfer_says_how_to_install(tmp_path):
    import gyre.engine.layers.flashinfer_attention  # noqa: F401  (importable without flashinfer)

    path = tiny_model("llama", tmp_path / "llama")
    with pytest.raises(ImportError, match="pip install flashinfer-python"):
        Engine(path, device="cpu", attention_backend="flashinfer")
