"""End to end on 2 gloo ranks: an optimizer step on an FSDP2 model -> WeightSyncHook -> an in-process
gyre Engine on rank 0. The engine then generates what HF transformers generates with the new weights,
and the trainer's recomputed logprobs of the engine's samples match the engine's (float32)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM

from gyre import Engine, SamplingParams
from gyre.trainers.adapters.fsdp import FSDPAdapter
from gyre.trainers.hook import WeightSyncHook
from gyre.trainers.mismatch import rollout_mismatch

from .helpers import quiet_transformers, spawn

PROMPTS = [[5, 17, 300, 41], [900, 12, 8], [77, 78, 79, 80, 81, 82]]
GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
SAMPLED = SamplingParams(max_new_tokens=12, temperature=1.0, ignore_eos=True, seed=7)


class LocalSender:
    """Stand-in for gyre.weight_sync.WeightSender(engine, mode="tensors"), used only while that does not
    exist: pause, load, resume."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def push(self, named_tensors, version: int) -> None:
        self.engine.pause("in_place")
        try:
            self.engine.update_weights(named_tensors, version=version)
        finally:
            self.engine.resume()


def make_sender(engine: Engine):
    try:
        from gyre.weight_sync.sender import WeightSender
    except ImportError:
        return LocalSender(engine)
    return WeightSender(engine, mode="tensors")


def _hf_greedy(model, prompt: list[int]) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=12,
        min_new_tokens=12,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


def _train_and_sync(rank: int, world_size: int, path: str) -> None:
    quiet_transformers()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    engine = Engine(path, device="cpu", max_num_tokens=1024) if rank == 0 else None
    try:
        if rank == 0:
            before = [o.output_ids for o in engine.generate(PROMPTS, GREEDY)]
            stale = engine.generate(PROMPTS, SAMPLED)  # sampled by the weights before the step

        # one training step; each rank its own data
        opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
        batch = torch.randint(3, 1500, (2, 16), generator=torch.Generator().manual_seed(rank))
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()

        sender = make_sender(engine) if rank == 0 else None  # only the sending rank needs one
        hook = WeightSyncHook(sender, FSDPAdapter(model, bucket_bytes=64 << 10))
        hook.after_step(1)  # every rank: the gathers are collectives

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        samples = [engine.generate(PROMPTS, SAMPLED), stale] if rank == 0 else [None, None]
        dist.broadcast_object_list(samples, src=0)
        fresh = rollout_mismatch(model, samples[0])  # FSDP forward: every rank, same sequences
        old = rollout_mismatch(model, samples[1])
        if rank == 0:
            assert engine.weight_version == 1
            assert all(o.weight_version == 1 for o in samples[0])
            reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            reference.load_state_dict(full)  # the updated weights, via torch's own full state dict
            after = [o.output_ids for o in engine.generate(PROMPTS, GREEDY)]
            assert after == [_hf_greedy(reference, p) for p in PROMPTS]
            assert after != before  # the step changed what the model says
            assert fresh.num_tokens == 3 * 12
            assert fresh.mean_abs_diff < 1e-5 and fresh.max_abs_diff < 1e-4 and abs(fresh.kl_k3) < 1e-8, fresh
            # the metric sees an engine that still runs the weights from before the step
            assert old.mean_abs_diff > 100 * fresh.mean_abs_diff and old.kl_k3 > 1e-4, old
    finally:
        if engine is not None:
            engine.shutdown()


def test_fsdp_step_hook_engine_matches_hf(model_dirs):
    spawn(_train_and_sync, 2, model_dirs["qwen3"])
