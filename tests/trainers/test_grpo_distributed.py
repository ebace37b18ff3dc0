"""`gyre train` under torchrun (2 gloo ranks on the CPU): FSDP2 policy, rank 0 owns the engine and the
rollouts, every rank trains on its share of the batch, weights are pushed every step, resume works.

The ranks are launched with torchrun (this file is their script), not forked from pytest: a fork of a
process whose MKL has already run threaded GEMMs (earlier in-process tests) can spin forever in MKL's
allocator. It also exercises train()'s own process-group set-up from the torchrun env."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "tiny_arith_grpo.yaml"


def _batch(num_rows: int, width: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(width // 2, width + 1, (num_rows,), generator=g)
    attn = (torch.arange(width)[None] < lens[:, None]).long()
    loss_mask = attn.clone()
    loss_mask[:, :3] = 0  # the prompt
    return {
        "input_ids": torch.randint(3, 1500, (num_rows, width), generator=g) * attn,
        "attention_mask": attn,
        "loss_mask": loss_mask,
        "logprobs": -torch.rand(num_rows, width, generator=g) * loss_mask,
        "advantages": torch.randn(num_rows, generator=g),
    }


def check_update_equals_single_process(path: str) -> None:
    """On every rank: grpo_update of the FSDP2 policy on its share == grpo_update of the whole batch."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM

    from gyre.recipe import TrainerSection
    from gyre.trainers.grpo import grpo_update

    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    single = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    sharded = copy.deepcopy(single)
    for layer in sharded.model.layers:
        fully_shard(layer)
    fully_shard(sharded)
    t = _batch(5, 12)  # 5 rows on 2 ranks: one padding row
    for agg in ("seq-mean-token-mean", "token-mean"):
        cfg = TrainerSection(lr=1.0, micro_batch_size=2, loss_agg=agg, max_grad_norm=1e9)
        # SGD: the step is the gradient (Adam's first step is sign(grad), which flips on rounding-level noise)
        ones = grpo_update(single, None, torch.optim.SGD(single.parameters(), lr=cfg.lr), t, cfg, 1.0, "cpu")
        dp = grpo_update(sharded, None, torch.optim.SGD(sharded.parameters(), lr=cfg.lr), t, cfg, 1.0, "cpu",
                         rank=rank, world_size=world_size)  # fmt: skip
        # NOTE: under seq-mean the logged loss metrics weigh each micro-batch by its rows: they depend on the split
        keys = ("grad_norm", "mismatch_mean_abs", "mismatch_max_abs")
        for key in keys + (("pg_loss", "ratio_mean", "clip_fraction") if agg == "token-mean" else ()):
            assert abs(ones[key] - dp[key]) < 1e-5 * max(1.0, abs(ones[key])), (agg, key, ones[key], dp[key])
        for (name, a), b in zip(single.named_parameters(), sharded.parameters()):
            full = b.full_tensor() if isinstance(b, DTensor) else b
            torch.testing.assert_close(full, a, atol=1e-6, rtol=1e-5, msg=f"{agg}: {name}")
    dist.destroy_process_group()


def run_train(run_dir: str, resume: bool, stop_after: int | None) -> None:
    from gyre.recipe import load_recipe
    from gyre.trainers.grpo import train

    recipe = load_recipe(str(RECIPE), [
        f"logging.run_dir={run_dir}", "trainer.steps=4", "warmup.steps=4", "warmup.batch_size=32",
        "rollout.batch_size=3", "rollout.n_samples_per_prompt=5",  # 15 rows: ranks get 8 and 7 (+1 padding)
        "logging.plot=false", "logging.wandb=false", "logging.progress=false",
    ])  # fmt: skip
    history = train(recipe, resume=resume, stop_after=stop_after)  # train() joins the group from the env
    rank = os.environ["RANK"]
    Path(run_dir, f"history-{int(resume)}-{rank}.json").write_text(json.dumps(history))


def _torchrun(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        __file__,
        *args,
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]


def test_data_parallel_update_equals_single_process(model_dirs):
    _torchrun("update", model_dirs["qwen3"])


def test_two_rank_fsdp_train_and_resume(tmp_path):
    _torchrun("train", str(tmp_path))  # a simulated kill after 2 of 4 steps
    _torchrun("resume", str(tmp_path))
    lines = [json.loads(x) for x in (tmp_path / "tiny_arith_grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]  # rank 0 alone writes; no step lost, none twice
    assert [m["weight_version"] for m in lines] == [2, 3, 4, 5]  # the warm-up push, then one per step
    assert all(m["num_samples"] == 15 for m in lines)
    assert max(m["mismatch_mean_abs"] for m in lines) < 1e-3, lines  # the engine runs what the trainer has
    assert max(m["mismatch_max_abs"] for m in lines) < 1e-2, lines
    state = torch.load(tmp_path / "tiny_arith_grpo" / "checkpoint.pt", weights_only=False)
    assert (state["step"], state["version"]) == (4, 5)  # full state dicts, the optimizer's keyed by name
    assert (
        int(state["optimizer"]["state"]["model.embed_tokens.weight"]["step"]) == 4
    )  # resumed, not restarted
    for resume in (0, 1):  # every rank ran the same steps and agrees on the global statistics
        h0, h1 = (json.loads((tmp_path / f"history-{resume}-{r}.json").read_text()) for r in (0, 1))
        assert [m["step"] for m in h0] == [m["step"] for m in h1] == ([1, 2] if resume == 0 else [3, 4])
        for a, b in zip(h0, h1):
            for key in ("grad_norm", "pg_loss", "mismatch_mean_abs", "weight_version"):
                assert a[key] == b[key], (key, a[key], b[key])


if __name__ == "__main__":  # a torchrun rank
    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    mode, arg = sys.argv[1], sys.argv[2]
    if mode == "update":
        check_update_equals_single_process(arg)
    else:
        run_train(arg, resume=mode == "resume", stop_after=2 if mode == "train" else None)
