"""Deterministic mode: a sequence's tokens and logprobs are bit for bit independent of the batch around
it, of chunked-prefill boundaries, of prefix-cache hits and of CUDA-graph buckets, and equal to the
training forward's (gyre.trainers.training_forward), also after a training step pushed to the engine."""

from __future__ import annotations

import random

import pytest
import torch

from gyre import Engine, SamplingParams
from gyre.kernels import batch_invariant as bi
from gyre.testing import tiny_model
from gyre.trainers.training_forward import build_training_model, hf_named_tensors, sequence_logprobs

from .helpers import hf_model, random_prompts

NEEDLE_SP = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # NOTE: invariance holds for any thread count shared by engine and trainer; one thread keeps these
    # many small CPU ops fast on busy CI cores (OpenMP barriers spin when a core is taken)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _batch_around(needle: list[int], size: int, rng: random.Random) -> tuple[list, list, int]:
    """size prompts with the needle at a random index; the others sample with random settings."""
    prompts, params = [], []
    for _ in range(size - 1):
        prompts.append([rng.randrange(3, 1500) for _ in range(rng.randint(1, 90))])
        params.append(
            SamplingParams(
                max_new_tokens=rng.randint(1, 14),
                temperature=rng.choice([0.0, 0.7, 1.0]),
                seed=rng.randrange(1 << 30),
                ignore_eos=True,
            )
        )
    at = rng.randint(0, size - 1)
    if rng.random() < 0.5 and prompts:  # a neighbour sharing the needle's start: cache hits both ways
        prompts[0] = needle[: rng.randint(8, len(needle))] + prompts[0]
    return prompts[:at] + [needle] + prompts[at:], params[:at] + [NEEDLE_SP] + params[at:], at


# cache: the needle's prompt is cached after the first batch; chunked: its prefill is cut at shifting
# points; chunked-cache: both
@pytest.mark.parametrize(
    "engine_kw",
    [
        dict(page_size=4),
        dict(page_size=16, max_batch_tokens=29, enable_prefix_cache=False),
        dict(page_size=1, max_batch_tokens=61),
    ],
    ids=["cache", "chunked", "chunked-cache"],
)
def test_needle_is_batch_invariant(llama_dir, engine_kw):
    needle = random_prompts([57], seed=5)[0]
    with Engine(llama_dir, deterministic=True, enable_prefix_cache=False) as eng:
        ref = eng.generate([needle], NEEDLE_SP)[0]
    rng = random.Random(str(engine_kw))
    cached = 0
    with Engine(llama_dir, deterministic=True, max_num_tokens=16384, **engine_kw) as eng:
        for size in (1, 3, 12, 64):
            prompts, params, at = _batch_around(needle, size, rng)
            out = eng.generate(prompts, params)[at]
            assert out.output_ids == ref.output_ids, size
            assert out.output_logprobs == ref.output_logprobs, size  # bitwise
            cached += out.num_cached_tokens
    assert (cached > 0) == engine_kw.get("enable_prefix_cache", True)


def test_default_mode_is_not_batch_invariant_on_cpu(llama_dir):
    """What the switch is for: plain torch matmuls give a row different bits for different row counts."""
    needle = random_prompts([57], seed=5)[0]
    with Engine(llama_dir, page_size=4, enable_prefix_cache=False) as eng:
        alone = eng.generate([needle], NEEDLE_SP)[0]
        prompts, params, at = _batch_around(needle, 12, random.Random(0))
        mixed = eng.generate(prompts, params)[at]
    assert mixed.output_logprobs != alone.output_logprobs


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory) -> str:
    return str(tiny_model("qwen3", tmp_path_factory.mktemp("tied") / "m", tie_word_embeddings=True))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "qwen3_moe", "qwen3_tied"])
def test_engine_logprobs_equal_training_forward(model_dirs, tied_dir, arch):
    path = tied_dir if arch == "qwen3_tied" else model_dirs[arch]
    prompts = random_prompts([23, 5, 70, 41], seed=6)
    params = [
        SamplingParams(max_new_tokens=10, temperature=t, seed=i, ignore_eos=True)
        for i, t in enumerate([0.7, 0.0, 1.0, 0.7])
    ]
    with Engine(path, deterministic=True, page_size=8, max_batch_tokens=50) as eng:
        outs = eng.generate(prompts, params)
    model = build_training_model(path)
    for temperature in (0.7, 0.0, 1.0):
        idx = [i for i, sp in enumerate(params) if sp.temperature == temperature]
        seqs = [outs[i].prompt_ids + outs[i].output_ids for i in idx]
        packed = sequence_logprobs(model, seqs, temperature)  # all sequences in one forward
        for i, lp in zip(idx, packed):
            assert lp[len(prompts[i]) - 1 :].tolist() == outs[i].output_logprobs, (arch, i)
    # the trainer's packing does not matter either
    alone = sequence_logprobs(model, [seqs[-1]], temperature)[0]
    assert torch.equal(alone, packed[-1])


def test_policy_gradient_step_then_push_keeps_equality(llama_dir):
    """A GRPO-style step on the training forward: gradients match HF transformers', and after the new
    weights are pushed the engine's logprobs equal the trainer's again, bit for bit."""
    sp = SamplingParams(max_new_tokens=8, temperature=1.0, seed=3, ignore_eos=True)
    prompts = random_prompts([12, 30, 7], seed=7)
    model = build_training_model(llama_dir)
    hf = hf_model(llama_dir)
    hf.zero_grad()
    with Engine(llama_dir, deterministic=True, page_size=4) as eng:
        outs = eng.generate(prompts, sp)
        seqs = [o.prompt_ids + o.output_ids for o in outs]
        logp = sequence_logprobs(model, seqs, 1.0)
        advantages = [1.0, -0.5, 0.25]
        loss = sum(-a * lp[len(p) - 1 :].sum() for a, lp, p in zip(advantages, logp, prompts))
        loss.backward()
        hf_loss = 0.0
        for a, s, p in zip(advantages, seqs, prompts):  # the same loss through HF, float32
            logits = hf(torch.tensor([s])).logits[0, :-1].float()
            lp = torch.log_softmax(logits, -1).gather(1, torch.tensor(s[1:])[:, None])[:, 0]
            hf_loss = hf_loss - a * lp[len(p) - 1 :].sum()
        hf_loss.backward()
        ours = dict(model.named_parameters())
        for name in (
            "model.embed_tokens.weight",
            "model.layers.0.self_attn.o_proj.weight",
            "model.layers.1.mlp.down_proj.weight",
            "model.norm.weight",
            "lm_head.weight",
        ):
            torch.testing.assert_close(ours[name].grad, hf.get_parameter(name).grad, rtol=1e-4, atol=1e-5)
        with torch.no_grad():
            for p in model.parameters():
                p -= 1e-2 * p.grad
        eng.update_weights(hf_named_tensors(model))
        after = eng.generate(prompts, sp)
    hf.zero_grad()
    assert all(o.weight_version == 1 for o in after)
    assert [o.output_logprobs for o in after] != [o.output_logprobs for o in outs]
    new_logp = sequence_logprobs(model, [o.prompt_ids + o.output_ids for o in after], 1.0)
    for o, lp in zip(after, new_logp):
        assert lp[len(o.prompt_ids) - 1 :].tolist() == o.output_logprobs


def test_cpu_ops_are_row_invariant():
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(100, 64, generator=gen), torch.randn(192, 64, generator=gen)
    full = bi.linear(x, w)
    for m in (1, 5, 16, 17, 63):
        assert torch.equal(bi.linear(x[:m], w), full[:m])
        assert torch.equal(bi.linear(x[100 - m :], w), full[100 - m :])
    # NOTE: the VML exp computes a vector's tail like its body: a guard for the CPU attention's exp
    y = torch.randn(1000, 33, generator=gen) * 20
    assert torch.equal(torch.exp(y)[:, :31], torch.exp(y[:, :31]))
    # attention: a row's output does not depend on the KV width past it or on the rows around it
    q, k, v = (torch.randn(n, h, 16, generator=gen) for n, h in ((40, 4), (200, 2), (200, 2)))
    pos = torch.randint(0, 200, (40,), generator=gen)

    def attend(width, rows):
        table = torch.arange(width).clamp(max=199)[None, :]
        return bi.cpu_attention(
            q[rows], k, v, table, torch.zeros(len(rows), dtype=torch.long), pos[rows], 0.25
        )

    ref = attend(256, list(range(40)))
    assert torch.equal(attend(512, [7]), ref[7:8])
    assert torch.equal(attend(256, [3, 30, 7]), ref[[3, 30, 7]])


# -- GPU: the same in bfloat16 on the Triton kernels, with CUDA graphs -----------------------------------

gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_gpu_needle_and_training_forward_bf16(model_dirs, arch):
    path = model_dirs[arch]
    needle = random_prompts([300], seed=5)[0]  # > SPLIT_SIZE: two attention splits
    gpu_kw = dict(device="cuda", dtype="bfloat16", deterministic=True, max_num_tokens=16384)
    with Engine(path, enable_prefix_cache=False, **gpu_kw) as eng:
        ref = eng.generate([needle], NEEDLE_SP)[0]
    rng = random.Random(1)
    for kw in (
        dict(page_size=16),
        dict(page_size=1, max_batch_tokens=77),
        dict(cuda_graph=False, page_size=4),
    ):
        with Engine(path, **gpu_kw, **kw) as eng:
            for size in (1, 3, 12, 64):  # different CUDA-graph buckets
                prompts, params, at = _batch_around(needle, size, rng)
                out = eng.generate(prompts, params)[at]
                assert out.output_ids == ref.output_ids, (kw, size)
                assert out.output_logprobs == ref.output_logprobs, (kw, size)
    model = build_training_model(path, device="cuda", dtype=torch.bfloat16)
    others = random_prompts([40, 7], seed=8)
    lp = sequence_logprobs(model, [others[0], needle + ref.output_ids, others[1]], 1.0)[1]
    assert lp[len(needle) - 1 :].tolist() == ref.output_logprobs


@gpu
def test_gpu_matmul_and_attention_are_row_invariant():
    gen = torch.Generator(device="cuda").manual_seed(0)
    for n, k in ((96, 64), (4096, 512), (20000, 128)):
        x = torch.randn(1000, k, device="cuda", generator=gen).bfloat16()
        w = torch.randn(n, k, device="cuda", generator=gen).bfloat16()
        full = bi.matmul(x, w)
        for m in (1, 7, 128, 129, 999):
            assert torch.equal(bi.matmul(x[-m:], w), full[-m:]), (n, k, m)
    # decode rows == prefill rows == training rows
    hq, hkv, d, n = 8, 2, 64, 600
    q, k, v = (torch.randn(n, h, d, device="cuda", generator=gen).bfloat16() for h in (hq, hkv, hkv))
    cu = torch.tensor([0, n], dtype=torch.int32, device="cuda")
    train = bi.varlen_attention(q, k, v, cu, [n], 0.125)
    table = torch.arange(n, dtype=torch.int32, device="cuda")[None]
    for pos in (0, 255, 256, 599):
        one = torch.tensor([0, 1], dtype=torch.int32, device="cuda")
        lens = torch.tensor([pos + 1], dtype=torch.int32, device="cuda")
        tile = torch.zeros(1, dtype=torch.int32, device="cuda")
        dec = bi.paged_attention(q[pos : pos + 1], k, v, table, one, lens, 1, 0.125, tile, tile, n)
        assert torch.equal(dec, train[pos : pos + 1]), pos


@gpu
@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe"])
def test_gpu_training_forward_float32_matches_engine_and_hf_gradients(model_dirs, arch):
    """float32 on the GPU: engine == training forward bit for bit, and the backward of every Triton op
    (matmul, norm, rotary, SwiGLU, attention, MoE, logprobs) gives HF transformers' gradients."""
    from transformers import AutoModelForCausalLM

    path = model_dirs[arch]
    prompts = random_prompts([30, 17, 45], seed=9)
    sp = SamplingParams(max_new_tokens=6, temperature=0.8, seed=2, ignore_eos=True)
    with Engine(path, device="cuda", dtype="float32", deterministic=True, max_num_tokens=4096) as eng:
        outs = eng.generate(prompts, sp)
    seqs = [o.prompt_ids + o.output_ids for o in outs]
    model = build_training_model(path, device="cuda", dtype=torch.float32)
    logp = sequence_logprobs(model, seqs, 0.8)
    for o, lp in zip(outs, logp):
        assert lp[len(o.prompt_ids) - 1 :].tolist() == o.output_logprobs
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda()
    loss, hf_loss = 0.0, 0.0
    for w, s, lp in zip([1.0, -0.5, 0.3], seqs, logp):
        logits = hf(torch.tensor([s], device="cuda")).logits[0, :-1].float() / 0.8
        ref = torch.log_softmax(logits, -1).gather(1, torch.tensor(s[1:], device="cuda")[:, None])[:, 0]
        torch.testing.assert_close(lp, ref, rtol=0, atol=1e-4)
        loss, hf_loss = loss + w * lp.sum(), hf_loss + w * ref.sum()
    loss.backward()
    hf_loss.backward()
    ours = dict(model.named_parameters())
    names = [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.o_proj.weight",
        "model.norm.weight",
        "lm_head.weight",
        "model.layers.1.self_attn.q_norm.weight",
        "model.layers.0.input_layernorm.weight",
    ]
    names += (
        ["model.layers.0.mlp.gate.weight"] if arch == "qwen3_moe" else ["model.layers.1.mlp.down_proj.weight"]
    )
    for name in names:
        g = hf.get_parameter(name).grad
        torch.testing.assert_close(ours[name].grad, g, rtol=1e-3, atol=1e-4 * g.abs().max().item())
    q_rows = hf.config.num_attention_heads * hf.config.head_dim
    g = hf.get_parameter("model.layers.0.self_attn.q_proj.weight").grad
    torch.testing.assert_close(
        ours["model.layers.0.self_attn.qkv_proj.weight"].grad[:q_rows],
        g,
        rtol=1e-3,
        atol=1e-4 * g.abs().max().item(),
    )
