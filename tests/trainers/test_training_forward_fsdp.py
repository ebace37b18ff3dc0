"""Issue 13: gyre's training forward in a user's own FSDP2 loop (2 gloo ranks on the CPU, float32).

The user builds the model with build_training_model, shards every decoder layer and then the root with
`fully_shard`, and computes token_logprobs: they equal the unsharded model's and a deterministic engine's
bit for bit. After one optimizer step hf_named_tensors gathers the full weights under their HF names
and rank 0 pushes them to the engine, whose next generation's logprobs again equal the
sharded model's bit for bit.

The ranks are launched with torchrun (this file is their script), not forked from pytest: a fork of a
process whose MKL has already run threaded GEMMs can spin forever in MKL's allocator."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
import torch.distributed as dist

TEMPERATURE = 0.8
NEW_TOKENS = 6


def _generate(engine, prompts: list[list[int]], seed: int) -> list[tuple[list[int], int, list[float]]]:
    from gyre import SamplingParams

    sampling = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=TEMPERATURE, ignore_eos=True, seed=seed)
    return [
        (o.prompt_ids + o.output_ids, len(o.prompt_ids), list(o.output_logprobs))
        for o in engine.generate(prompts, sampling)
    ]


def _rollouts(engine, prompts, seed: int):
    """Rank 0 generates, every rank gets the same [(sequence, prompt length, engine logprobs)]."""
    box = [_generate(engine, prompts, seed) if engine is not None else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _packed(rollouts) -> tuple[torch.Tensor, list[int]]:
    cu = [0]
    for seq, _, _ in rollouts:
        cu.append(cu[-1] + len(seq))
    return torch.tensor([t for seq, _, _ in rollouts for t in seq], dtype=torch.int64), cu


def _check_equals_engine(logp: torch.Tensor, cu: list[int], rollouts, what: str) -> None:
    for b, (_, n_prompt, engine_logp) in enumerate(rollouts):
        ours = logp[cu[b] + n_prompt : cu[b + 1]]  # entry i: logprob of token i given tokens < i
        theirs = torch.tensor(engine_logp, dtype=torch.float32)
        assert ours.shape == theirs.shape and torch.equal(ours, theirs), (what, b, ours, theirs)


def run_rank(path: str) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from gyre import Engine
    from gyre.trainers.training_forward import build_training_model, hf_named_tensors, token_logprobs

    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)

    # the user's loop: gyre's training model, FSDP2 on each decoder layer, then the root
    single = build_training_model(path, device="cpu", dtype=torch.float32)
    model = build_training_model(path, device="cpu", dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    assert all(isinstance(p, DTensor) for p in model.parameters())

    engine = Engine(path, device="cpu", max_num_tokens=512, deterministic=True) if rank == 0 else None
    try:
        prompts = [[5, 17, 300, 41], [900, 12, 8], [77, 78, 79, 80, 81, 82], [3, 1000]]
        rollouts = _rollouts(engine, prompts, seed=3)
        ids, cu = _packed(rollouts)

        # 1. sharded == unsharded == engine, bit for bit (full sequences, every rank the whole batch)
        logp = token_logprobs(model, ids, cu, TEMPERATURE)
        with torch.no_grad():
            ref = token_logprobs(single, ids, cu, TEMPERATURE)
        assert torch.equal(logp.detach(), ref), (logp - ref).abs().max()
        if rank == 0:
            _check_equals_engine(logp.detach(), cu, rollouts, "before the step")

        # 2. one step of a policy-gradient loss on this rank's share of the sequences
        advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
        mask = torch.zeros(len(ids))
        for b, (_, n_prompt, _) in enumerate(rollouts):
            if b % world_size == rank:
                mask[cu[b] + n_prompt : cu[b + 1]] = advantages[b]
        loss = -(logp * mask).sum() / NEW_TOKENS
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        loss.backward()
        assert all(p.grad is not None for p in model.parameters())
        optimizer.step()
        optimizer.zero_grad()

        # 3. gather the full weights under their HF names (every rank iterates in step) and push on rank 0
        named = list(hf_named_tensors(model))
        expected = list(hf_named_tensors(single))
        assert [(n, t.shape) for n, t in named] == [(n, t.shape) for n, t in expected]
        assert all(not isinstance(t, DTensor) for _, t in named)
        if rank == 0:
            engine.update_weights(named)
        del named

        # 4. the engine samples with the updated weights; the sharded model's logprobs are its own
        rollouts = _rollouts(engine, prompts, seed=4)
        ids, cu = _packed(rollouts)
        with torch.no_grad():
            logp = token_logprobs(model, ids, cu, TEMPERATURE)
            before = token_logprobs(single, ids, cu, TEMPERATURE)
        assert not torch.equal(logp, before)  # the step changed the weights
        if rank == 0:
            _check_equals_engine(logp, cu, rollouts, "after the step")
    finally:
        if engine is not None:
            engine.shutdown()
    dist.destroy_process_group()


def test_fsdp2_training_forward_matches_engine(model_dirs):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    out = subprocess.run(
        [*cmd, __file__, model_dirs["qwen3"]], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]


if __name__ == "__main__":  # a torchrun rank
    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    run_rank(sys.argv[1])
