"""Engine core against HF transformers: greedy tokens, logprobs, batching, seeds, retraction, loading."""

from __future__ import annotations

import asyncio
import shutil

import pytest
import torch

from gyre import Engine, SamplingParams
from gyre.testing import save_sharded, tiny_model

from .helpers import hf_greedy, hf_logprobs, random_prompts

GREEDY = SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "qwen3_moe"])
def test_batched_greedy_matches_hf(model_dirs, arch):
    path = model_dirs[arch]
    prompts = random_prompts([3, 17, 40, 9])
    with Engine(path, page_size=4, max_num_tokens=4096, max_batch_tokens=32) as eng:  # chunked prefill
        outs = eng.generate(prompts, GREEDY)
        singles = [eng.generate([p], GREEDY)[0] for p in prompts]
    for p, o, s in zip(prompts, outs, singles):
        assert o.output_ids == hf_greedy(path, p, 10)
        ref = hf_logprobs(path, p, o.output_ids)
        assert torch.allclose(torch.tensor(o.output_logprobs), ref, atol=1e-4)
        assert s.output_ids == o.output_ids
        assert o.finish_reason == "length" and o.prompt_ids == p and o.weight_version == 0


@pytest.mark.parametrize("overrides", [
    {"tie_word_embeddings": True},
    {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64}},
])
def test_llama_variants_match_hf(tmp_path, overrides):
    path = str(tiny_model("llama", tmp_path / "m", **overrides))
    prompts = random_prompts([90, 7], seed=1)  # past original_max_position_embeddings
    with Engine(path, page_size=16, max_num_tokens=2048) as eng:
        outs = eng.generate(prompts, GREEDY)
    for p, o in zip(prompts, outs):
        assert o.output_ids == hf_greedy(path, p, 10)


def test_seeded_sampling_is_batch_invariant(llama_dir):
    sp = SamplingParams(max_new_tokens=12, temperature=0.9, top_k=50, top_p=0.95, seed=1234, ignore_eos=True)
    prompt = random_prompts([11], seed=3)[0]
    others = random_prompts([5, 30, 8, 21], seed=4)
    with Engine(llama_dir, page_size=4, max_num_tokens=4096) as eng:
        alone = eng.generate([prompt], sp)[0]
        again = eng.generate([prompt], sp)[0]
        mixed = eng.generate(others[:2] + [prompt] + others[2:],
                             [SamplingParams(max_new_tokens=7, temperature=1.0)] * 2 + [sp]
                             + [SamplingParams(max_new_tokens=9, temperature=0.5)] * 2)[2]
        other_seed = eng.generate([prompt], SamplingParams(**{**sp.__dict__, "seed": 99}))[0]
    assert alone.output_ids == again.output_ids == mixed.output_ids
    assert alone.output_ids != other_seed.output_ids
    for a, b in zip(alone.output_logprobs, mixed.output_logprobs):
        assert abs(a - b) < 1e-4


def test_sampled_logprobs_are_temperature_scaled(llama_dir):
    prompt = random_prompts([6], seed=5)[0]
    with Engine(llama_dir) as eng:
        o = eng.generate([prompt], SamplingParams(max_new_tokens=5, temperature=0.7, seed=1, ignore_eos=True,
                                                  top_logprobs=3))[0]
    from .helpers import hf_model

    with torch.no_grad():
        logits = hf_model(llama_dir)(torch.tensor([prompt + o.output_ids])).logits[0].float()
    logp = torch.log_softmax(logits / 0.7, -1)[len(prompt) - 1:-1]
    ref = logp.gather(1, torch.tensor(o.output_ids)[:, None]).squeeze(1)
    assert torch.allclose(torch.tensor(o.output_logprobs), ref, atol=1e-4)
    assert len(o.top_logprobs) == 5 and all(len(t) == 3 for t in o.top_logprobs)
    top_ids = logp[0].topk(3).indices.tolist()
    assert list(o.top_logprobs[0]) == top_ids


@pytest.mark.parametrize("enable_prefix_cache,overlap", [(False, True), (True, True), (True, False)])
def test_retraction_keeps_outputs(llama_dir, enable_prefix_cache, overlap):
    prompts = random_prompts([20, 25, 30, 18, 22, 27], seed=6)
    sp = [SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True),
          SamplingParams(max_new_tokens=40, temperature=1.0, seed=7, ignore_eos=True)] * 3
    with Engine(llama_dir, page_size=4, max_num_tokens=4096, enable_prefix_cache=enable_prefix_cache) as eng:
        ref = eng.generate(prompts, sp)
    with Engine(llama_dir, page_size=4, max_num_tokens=160, enable_prefix_cache=enable_prefix_cache,
                overlap_schedule=overlap) as eng:
        outs = eng.generate(prompts, sp)
        stats = eng.stats()
        eng.call(eng.check_integrity)
        if eng.cache is not None:
            eng.flush_cache()
        assert eng.stats()["kv_free_pages"] == eng.stats()["kv_total_pages"]
    assert stats["num_retractions"] > 0
    for r, o in zip(ref, outs):
        assert o.output_ids == r.output_ids
        assert o.finish_reason == "length"
        assert max(abs(a - b) for a, b in zip(o.output_logprobs, r.output_logprobs)) < 1e-4


def test_sharded_checkpoint_and_dummy_load(tmp_path, llama_dir):
    sharded = tmp_path / "sharded"
    shutil.copytree(llama_dir, sharded)
    save_sharded(sharded, max_shard_bytes=200_000)
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    prompt = random_prompts([12])[0]
    with Engine(str(sharded)) as eng:
        assert eng.generate([prompt], GREEDY)[0].output_ids == hf_greedy(llama_dir, prompt, 10)
    with Engine(llama_dir, load_format="dummy") as eng:
        out = eng.generate([prompt], GREEDY)[0]
        assert len(out.output_ids) == 10


def test_missing_tensor_in_checkpoint_is_reported(tmp_path, llama_dir):
    broken = tmp_path / "broken"
    shutil.copytree(llama_dir, broken)
    from safetensors.torch import load_file, save_file

    tensors = load_file(broken / "model.safetensors")
    tensors.pop("model.layers.1.mlp.down_proj.weight")
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(ValueError, match="down_proj"):
        Engine(str(broken))


def test_text_prompts_stops_and_n(qwen3_dir):
    with Engine(qwen3_dir) as eng:
        tok = eng.tokenizer
        outs = eng.generate(["Hello there", "12 + 35 ="], SamplingParams(max_new_tokens=8, temperature=1.0, n=3,
                                                                         seed=5, ignore_eos=True))
        assert len(outs) == 6
        assert outs[0].prompt_ids == tok.encode("Hello there", add_special_tokens=False)
        assert len({tuple(o.output_ids) for o in outs[:3]}) > 1  # n samples differ
        assert all(o.text == tok.decode(o.output_ids, skip_special_tokens=True) for o in outs)
        # stop token ids: stop at the first generated token
        first = outs[0].output_ids[0]
        o = eng.generate(["Hello there"], SamplingParams(max_new_tokens=8, temperature=1.0, seed=5,
                                                         stop_token_ids=[first]))[0]
        assert o.output_ids == [first] and o.finish_reason == "stop"
        # stop strings: the text ends before the stop string; tokens stay as generated
        full = outs[0]
        stop = full.text[2:5] if len(full.text) >= 5 else None
        if stop and stop.strip():
            o = eng.generate(["Hello there"], SamplingParams(max_new_tokens=8, temperature=1.0, seed=5,
                                                             ignore_eos=True, stop=stop))[0]
            assert o.finish_reason == "stop" and stop not in o.text and full.text.startswith(o.text)


@pytest.mark.parametrize("overlap", [True, False])
def test_eos_stops_unless_ignored(llama_dir, overlap):
    prompt = random_prompts([8], seed=9)[0]
    with Engine(llama_dir, overlap_schedule=overlap) as eng:
        ref = eng.generate([prompt], GREEDY)[0]
        eos = ref.output_ids[3]
        eng.tokens.eos_ids = {eos}
        o = eng.generate([prompt], SamplingParams(max_new_tokens=10, temperature=0.0))[0]
        assert o.finish_reason == "stop" and o.output_ids == ref.output_ids[: ref.output_ids.index(eos) + 1]
        o = eng.generate([prompt], GREEDY)[0]
        assert o.output_ids == ref.output_ids


def test_agenerate_many_concurrent_and_abort(llama_dir):
    prompts = random_prompts([5, 9, 13, 7, 11, 6, 8, 10], seed=10)
    with Engine(llama_dir, page_size=4) as eng:
        ref = eng.generate(prompts, GREEDY)

        async def main():
            outs = await asyncio.gather(*(eng.agenerate(p, GREEDY) for p in prompts))
            long = asyncio.ensure_future(eng.agenerate(prompts[0], SamplingParams(max_new_tokens=500, temperature=0,
                                                                                   ignore_eos=True)))
            await asyncio.sleep(0.2)
            eng.abort()
            return outs, await long

        outs, aborted = asyncio.run(main())
        assert [o.output_ids for o in outs] == [r.output_ids for r in ref]
        assert aborted.finish_reason == "abort" and 0 < len(aborted.output_ids) < 500
        assert len(aborted.output_logprobs) == len(aborted.output_ids)
        assert eng.generate(prompts[:1], GREEDY)[0].output_ids == ref[0].output_ids  # still serving


BAD = [
    ([[]], {}, "empty"),
    ([[1, 2, 99999]], {}, "outside the vocabulary"),
    ([[1, 2, -1]], {}, "outside the vocabulary"),
    ([[1] * 1000], {"max_new_tokens": 100}, "context length"),
    ([[1, 2]], {"temperature": -0.5}, "temperature"),
    ([[1, 2]], {"top_p": 0.0}, "top_p"),
    ([[1, 2]], {"top_p": 1.5}, "top_p"),
    ([[1, 2]], {"n": 0}, "n "),
    ([[1, 2]], {"max_new_tokens": 0}, "max_new_tokens"),
    ([[1, 2]], {"top_k": -3}, "top_k"),
    ([[1, 2]], {"min_p": 2.0}, "min_p"),
    ([[1, 2]], {"temperature": float("nan")}, "temperature"),
    ([[1, 2]], {"max_tokenz": 5}, "max_tokenz"),
]


@pytest.mark.parametrize("prompts,kwargs,msg", BAD)
def test_bad_input_raises_and_engine_keeps_serving(llama_dir, prompts, kwargs, msg):
    with Engine(llama_dir, max_num_tokens=4096) as eng:
        with pytest.raises(ValueError, match=msg):
            eng.generate(prompts, SamplingParams(**kwargs))
        assert eng.stats()["num_waiting"] == 0
        assert len(eng.generate([[5, 6, 7]], GREEDY)[0].output_ids) == 10


def test_bad_config_and_paths(tmp_path, llama_dir):
    with pytest.raises(ValueError, match="page_size"):
        Engine(llama_dir, page_size=0)
    with pytest.raises(ValueError, match="attention_backend"):
        Engine(llama_dir, attention_backend="cuda-magic")
    with pytest.raises(ValueError, match="unknown EngineConfig"):
        Engine(llama_dir, page_sise=4)
    with pytest.raises(FileNotFoundError):
        Engine(str(tmp_path / "nope"))


def test_over_capacity_prompt_is_rejected(llama_dir):
    with Engine(llama_dir, page_size=4, max_num_tokens=64) as eng:
        with pytest.raises(ValueError, match="KV cache capacity"):
            eng.generate([[5] * 60], SamplingParams(max_new_tokens=10))


def test_calls_after_shutdown_fail_cleanly(llama_dir):
    eng = Engine(llama_dir)
    eng.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        eng.flush_cache()
    with pytest.raises(RuntimeError, match="shut down"):
        eng.generate([[1, 2, 3]], GREEDY)
