from __future__ import annotations

import pytest
import torch

from gyre.kernels.attention import store_kv
from gyre.kernels.rotary import (
    apply_rotary,
    apply_rotary_ref,
    rope_cos_sin_cache,
    rotary_store_kv,
    rotary_store_kv_ref,
)

SCALINGS = [
    None,
    {"rope_type": "default"},
    {"rope_type": "linear", "factor": 4.0},
    {"type": "linear", "factor": 2.0},
    {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
]


@pytest.mark.parametrize("rope_scaling", SCALINGS)
def test_cos_sin_cache_matches_transformers(rope_scaling):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    head_dim, max_pos, base = 64, 200, 500000.0
    params = {"rope_theta": base, "rope_type": "default"}
    if rope_scaling is not None:
        params |= {k: v for k, v in rope_scaling.items() if k != "type"}
        params["rope_type"] = rope_scaling.get("rope_type", rope_scaling.get("type"))
    config = LlamaConfig(
        hidden_size=head_dim * 4,
        num_attention_heads=4,
        max_position_embeddings=max_pos,
        rope_parameters=params,
    )
    rope = LlamaRotaryEmbedding(config)
    positions = torch.arange(max_pos)[None]
    cos, sin = rope(torch.zeros(1, dtype=torch.float32), positions)
    cache = rope_cos_sin_cache(head_dim, max_pos, base, rope_scaling)
    assert cache.shape == (max_pos, head_dim) and cache.dtype == torch.float32
    torch.testing.assert_close(cache[:, : head_dim // 2], cos[0, :, : head_dim // 2], atol=0, rtol=0)
    torch.testing.assert_close(cache[:, head_dim // 2 :], sin[0, :, : head_dim // 2], atol=0, rtol=0)


def test_partial_rotary_cache():
    cache = rope_cos_sin_cache(128, 10, 10000.0, None, partial_rotary_factor=0.5)
    assert cache.shape == (10, 64)
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, 64, 2).float() / 64)
    torch.testing.assert_close(cache[3, :32], torch.cos(3 * inv_freq))


@pytest.mark.parametrize(
    "num_tokens,heads,head_dim,partial",
    [
        (1, (1, 1), 16, 1.0),
        (5, (4, 2), 64, 1.0),
        (7, (8, 1), 128, 1.0),
        (4, (3, 3), 64, 0.5),
        (3, (2, 1), 96, 1.0),
    ],
)
def test_apply_rotary(case, num_tokens, heads, head_dim, partial):
    num_q, num_k = heads
    gen = torch.Generator().manual_seed(head_dim + num_tokens)
    cache = rope_cos_sin_cache(head_dim, 512, 10000.0, None, partial).to(case.device)
    # q and k as views of a fused qkv projection output, as the model passes them
    qkv = torch.randn(num_tokens, num_q + 2 * num_k, head_dim, generator=gen).to(case.device, case.dtype)
    q, k = qkv[:, :num_q], qkv[:, num_q : num_q + num_k]
    v_before = qkv[:, num_q + num_k :].clone()
    positions = torch.randint(0, 512, (num_tokens,), generator=gen).to(case.device)
    q_ref, k_ref = apply_rotary_ref(q, k, positions, cache)
    q_out, k_out = apply_rotary(q, k, positions, cache)
    assert q_out.data_ptr() == q.data_ptr() and k_out.data_ptr() == k.data_ptr()  # in place
    case.close(q, q_ref)
    case.close(k, k_ref)
    assert torch.equal(qkv[:, num_q + num_k :], v_before)


def test_apply_rotary_matches_hf(case):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    head_dim = 64
    cache = rope_cos_sin_cache(head_dim, 100, 10000.0).to(case.device)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(6, 4, head_dim, generator=gen).to(case.device, case.dtype)
    k = torch.randn(6, 2, head_dim, generator=gen).to(case.device, case.dtype)
    positions = torch.tensor([0, 1, 2, 50, 98, 99], device=case.device)
    cs = cache[positions]
    cos = torch.cat([cs[:, :32], cs[:, :32]], -1)
    sin = torch.cat([cs[:, 32:], cs[:, 32:]], -1)
    q_hf, k_hf = apply_rotary_pos_emb(q.float(), k.float(), cos, sin, unsqueeze_dim=1)
    apply_rotary(q, k, positions, cache)
    case.close(q, q_hf)
    case.close(k, k_hf)


LLAMA3 = SCALINGS[-1]


@pytest.mark.parametrize(
    "num_tokens,heads,head_dim,partial,scaling",
    [
        (1, (32, 8), 32, 1.0, LLAMA3),  # Llama-3 heads, one decode token
        (6, (8, 1), 64, 1.0, None),
        (5, (4, 2), 64, 0.5, None),  # partial rotary: dims past rotary_dim pass through
        (3, (2, 1), 96, 1.0, LLAMA3),
    ],
)
def test_rotary_store_kv(case, num_tokens, heads, head_dim, partial, scaling):
    num_q, num_kv = heads
    gen = torch.Generator().manual_seed(num_tokens + head_dim)
    cache = rope_cos_sin_cache(head_dim, 256, 500000.0, scaling, partial).to(case.device)
    # q, k, v as views of a fused qkv projection output, as the model passes them
    qkv = torch.randn(num_tokens, num_q + 2 * num_kv, head_dim, generator=gen).to(case.device, case.dtype)
    q, k, v = qkv.split([num_q, num_kv, num_kv], dim=1)
    positions = torch.randint(0, 256, (num_tokens,), generator=gen).to(case.device)
    num_slots = 3 * num_tokens
    slots = torch.randperm(num_slots, generator=gen)[:num_tokens]
    slots[num_tokens // 2] = -1  # a padding token: not stored
    slots = slots.to(case.device)
    k_cache = torch.randn(num_slots, num_kv, head_dim, generator=gen).to(case.device, case.dtype)
    v_cache = torch.randn(num_slots, num_kv, head_dim, generator=gen).to(case.device, case.dtype)
    k_cache_ref, v_cache_ref, q_ref = k_cache.clone(), v_cache.clone(), q.clone()
    k_before, v_before = k.clone(), v.clone()
    rotary_store_kv_ref(q_ref, k, v, positions, cache, k_cache_ref, v_cache_ref, slots)
    assert rotary_store_kv(q, k, v, positions, cache, k_cache, v_cache, slots).data_ptr() == q.data_ptr()
    case.close(q, q_ref)
    case.close(k_cache, k_cache_ref)
    assert torch.equal(v_cache, v_cache_ref)
    assert torch.equal(k, k_before) and torch.equal(v, v_before)  # k, v are only read


def test_rotary_store_kv_matches_unfused(case):
    """The same cache and q bits as apply_rotary then store_kv (the path of non-fusing backends)."""
    gen = torch.Generator().manual_seed(3)
    cache = rope_cos_sin_cache(64, 128, 500000.0, LLAMA3).to(case.device)
    qkv = torch.randn(4, 12, 64, generator=gen).to(case.device, case.dtype)
    positions = torch.tensor([0, 5, 64, 127], device=case.device)
    slots = torch.tensor([7, -1, 0, 3], device=case.device)
    k_cache = torch.zeros(8, 2, 64, device=case.device, dtype=case.dtype)
    v_cache = torch.zeros_like(k_cache)
    k_cache2, v_cache2, qkv2 = k_cache.clone(), v_cache.clone(), qkv.clone()
    q, k, v = qkv.split([8, 2, 2], dim=1)
    rotary_store_kv(q, k, v, positions, cache, k_cache, v_cache, slots)
    q2, k2, v2 = qkv2.split([8, 2, 2], dim=1)
    apply_rotary(q2, k2, positions, cache)
    store_kv(k_cache2, v_cache2, k2, v2, slots)
    assert torch.equal(q, q2) and torch.equal(k_cache, k_cache2) and torch.equal(v_cache, v_cache2)
