"""`gyre train`: recipes (strict keys, overrides), the GRPO loop's reward rising, kill + resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gyre.recipe import load_recipe
from gyre.recipe_loader import RecipeError
from gyre.trainers.grpo import train
from gyre.trainers.grpo_loss import policy_loss

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "tiny_arith_grpo.yaml"


def test_every_shipped_recipe_loads():
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        load_recipe(str(path))


@pytest.mark.parametrize("override,msg", [
    ("rollout.n_sampels=4", "rollout.n_sampels"),
    ("trainer.lr=fast", "trainer.lr"),
    ("engine.page_sise=4", "engine.page_sise"),
    ("rollout.sampling.temprature=1", "temprature"),
    ("model.tiny=null", "exactly one of model.path and model.tiny"),
    ("trainerlr=1", "trainerlr"),
])
def test_bad_recipe_keys_are_named(override, msg):
    with pytest.raises(RecipeError, match=msg):
        load_recipe(str(RECIPE), [override])


def test_bad_yaml_file(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("trainer:\n  steps: [1\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(str(p))
    p.write_text("rollout:\n  n_sampels: 3\n")
    with pytest.raises(RecipeError, match="did you mean 'n_samples_per_prompt'"):
        load_recipe(str(p))


def test_overrides_apply():
    r = load_recipe(str(RECIPE), ["trainer.lr=1e-5", "rollout.sampling.max_new_tokens=7", "engine.page_size=8"])
    assert r.trainer.lr == 1e-5 and r.rollout.sampling.max_new_tokens == 7 and r.engine["page_size"] == 8


def test_policy_loss_pushes_up_rewarded_tokens():
    logp = torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.5]])).requires_grad_(True)
    out = policy_loss(logp, logp.detach(), torch.tensor([1.0, -1.0]), torch.ones(2, 2))
    out.loss.backward()
    assert (logp.grad[0] < 0).all() and (logp.grad[1] > 0).all()  # descent raises row 0, lowers row 1


def test_tiny_arith_reward_rises(tmp_path):
    recipe = load_recipe(str(RECIPE), [f"logging.run_dir={tmp_path}", "trainer.steps=40", "logging.plot=true"])
    history = train(recipe)
    rewards = [m["reward_mean"] for m in history]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.1, rewards
    run = tmp_path / recipe.logging.name
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, 41))
    for key in ("reward_mean", "weight_version", "sync_seconds", "rollout_tokens_per_s"):
        assert key in lines[0]
    assert lines[-1]["weight_version"] == 41  # the warm-up push, then one per step
    assert max(m["mismatch_mean_abs"] for m in lines) < 1e-3  # engine logprobs == trainer's (fp32)
    assert (run / "reward.png").stat().st_size > 1000


def test_kill_and_resume(tmp_path):
    args = [sys.executable, "-m", "gyre.cli", "train", str(RECIPE), f"logging.run_dir={tmp_path}",
            "trainer.steps=8", "warmup.steps=2", "rollout.batch_size=4", "logging.plot=false"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    metrics = tmp_path / "tiny_arith_grpo" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        if proc.poll() is not None:
            pytest.fail("the run ended before it could be killed")
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert 3 <= len(done) < 8
    out = subprocess.run(args + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, 9))  # no step lost, none twice
    assert [m["weight_version"] for m in lines] == list(range(2, 10))
    assert json.loads(out.stdout.strip().splitlines()[-1])["steps"] == 8


@pytest.mark.parametrize("recipe,extra", [
    ("gsm8k_grpo.yaml", ["model.path=null", "model.tiny=qwen3", "rollout.sampling.max_new_tokens=12",
                         "rollout.batch_size=2", "rollout.n_samples_per_prompt=2", "rollout.mode=sync",
                         "rollout.dynamic_sampling=false", "engine.mem_fraction=0.85", "logging.wandb=false"]),
    ("multiturn_tool.yaml", ["rollout.batch_size=2", "rollout.sampling.max_new_tokens=12"]),
    ("multiagent.yaml", ["rollout.batch_size=2", "rollout.sampling.max_new_tokens=12"]),
])
def test_shipped_recipes_run_two_steps(tmp_path, recipe, extra):
    overrides = [f"logging.run_dir={tmp_path}", "trainer.steps=2", "logging.plot=false", *extra]
    if recipe == "gsm8k_grpo.yaml":
        data = tmp_path / "gsm8k.jsonl"
        data.write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "answer": f"{i}+{i}={2 * i}\n#### {2 * i}"})
                                + "\n" for i in range(20)))
        overrides.append(f"data.path={data}")
    history = train(load_recipe(str(ROOT / "recipes" / recipe), overrides))
    assert [m["step"] for m in history] == [1, 2]
    assert all(m["num_samples"] > 0 for m in history)
