"""The update protocol on an engine in this process: pause modes during generation, memory release."""

from __future__ import annotations

import asyncio
import copy
import threading

import pytest

from gyre import Engine, SamplingParams
from gyre.weight_sync import WeightSender
from tests.weight_sync.helpers import PROMPTS, checksum, hf_greedy, hf_model, live_tensors, trainer_tensors

LONG = SamplingParams(max_new_tokens=300, temperature=0.0, ignore_eos=True)
SWAP_AFTER = 8  # tokens generated before the trainer pushes


@pytest.fixture(scope="module")
def engine(llama_dir):
    with Engine(llama_dir, max_num_tokens=4096) as e:
        yield e


def generate_and_push(engine, sender, named, pause_mode):
    """Start a long greedy generation, push new weights once it has SWAP_AFTER tokens; its Completion."""
    reached = threading.Event()
    result = {}

    def on_token(req):
        if len(req.output_ids) >= SWAP_AFTER:
            reached.set()

    def run():
        result["out"] = asyncio.run(engine.agenerate(PROMPTS[0], LONG, on_token=on_token))

    thread = threading.Thread(target=run)
    thread.start()
    assert reached.wait(60)
    version = sender.push(named, pause_mode=pause_mode)
    thread.join(120)
    return result["out"], version


@pytest.mark.parametrize("pause_mode", ["in_place", "retract", "abort"])
def test_update_during_generation(engine, llama_dir, pause_mode):
    original = trainer_tensors(llama_dir, None)
    named = trainer_tensors(llama_dir, seed={"in_place": 21, "retract": 22, "abort": 23}[pause_mode])
    with WeightSender([engine], mode="tensors") as reset:  # every case starts from the checkpoint
        reset.push(original)
    old = engine.weight_version
    with WeightSender([engine], mode="group", backend="gloo", bucket_bytes=64 << 10, timeout_s=10) as sender:
        out, new = generate_and_push(engine, sender, named, pause_mode)

    versions = out.output_weight_versions
    k = versions.count(old)  # tokens produced before the swap
    assert SWAP_AFTER <= k < LONG.max_new_tokens
    old_model = copy.deepcopy(hf_model(llama_dir, original))
    new_model = hf_model(llama_dir, named)
    assert out.output_ids[:k] == hf_greedy(old_model, PROMPTS[0], k)
    if pause_mode == "abort":  # ends at once with its partial output
        assert out.finish_reason == "abort" and versions == [old] * k and len(out.output_ids) == k
        return
    n = LONG.max_new_tokens - k
    assert versions == [old] * k + [new] * n
    assert out.weight_version == new and out.finish_reason == "length"
    if pause_mode == "retract":  # requeued, everything recomputed under the new weights
        want = hf_greedy(new_model, PROMPTS[0], n, past=out.output_ids[:k])
    else:  # in_place: the KV of the tokens before the swap stays, computed by the old weights
        want = hf_greedy(new_model, PROMPTS[0], n, past=out.output_ids[:k], prefix_model=old_model)
    assert out.output_ids[k:] == want


def test_release_and_resume_memory(engine):
    greedy = SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True)
    before = [o.output_ids for o in engine.generate(PROMPTS, greedy)]
    weights = checksum(engine)
    counts = []
    for i in range(20):
        engine.release_memory(("kv_cache", "weights") if i % 2 else ("kv_cache",))
        assert engine.runner.pool.is_released
        engine.resume_memory()
        if i in (1, 19):
            counts.append(live_tensors())
    assert checksum(engine) == weights
    assert [o.output_ids for o in engine.generate(PROMPTS, greedy)] == before
    assert counts[0] == counts[1], "release/resume cycles leak tensors"
    engine.release_memory(("weights",))
    with pytest.raises(ValueError, match="released"):
        engine.update_weights([("model.norm.weight", engine.runner.model.model.norm.weight)])
    engine.resume_memory(("weights",))
    with pytest.raises(ValueError, match="unknown tags"):
        engine.release_memory(("kv",))
