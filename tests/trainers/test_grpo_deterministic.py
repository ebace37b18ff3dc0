"""trainer.forward = gyre: with a deterministic engine the trainer's logprobs are the engine's, bit for bit,
so the mismatch GRPO logs is exactly 0; with the HF forward it is measured (small, not 0)."""

from __future__ import annotations

from pathlib import Path

from gyre import Engine, SamplingParams
from gyre.recipe import load_recipe
from gyre.trainers.grpo import train
from gyre.trainers.mismatch import rollout_mismatch
from gyre.trainers.training_forward import build_training_model

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "tiny_arith_grpo.yaml"
SMALL = [
    "trainer.steps=3",
    "warmup.steps=8",
    "warmup.batch_size=32",
    "rollout.batch_size=4",
    "logging.plot=false",
    "logging.wandb=false",
    "logging.progress=false",
]


def test_gyre_forward_with_deterministic_engine_has_zero_mismatch(tmp_path):
    recipe = load_recipe(
        str(RECIPE),
        [f"logging.run_dir={tmp_path}", *SMALL, "engine.deterministic=true", "trainer.forward=gyre"],
    )
    history = train(recipe)
    assert [m["step"] for m in history] == [1, 2, 3]
    assert [m["weight_version"] for m in history] == [2, 3, 4]  # the warm-up push, then one per step
    for m in history:  # every step trains on what the engine sampled with the weights the trainer pushed
        assert m["mismatch_max_abs"] == 0.0 and m["mismatch_mean_abs"] == 0.0, m
    assert any(m["grad_norm"] > 0 for m in history[:-1])  # a later step ran on updated weights


def test_default_forward_mismatch_is_measured(tmp_path):
    history = train(load_recipe(str(RECIPE), [f"logging.run_dir={tmp_path}", *SMALL, "warmup.steps=0"]))
    peaks = [m["mismatch_max_abs"] for m in history]
    assert max(peaks) > 0.0 and max(peaks) < 1e-3, peaks  # float32 HF vs the engine's kernels


def test_rollout_mismatch_of_a_training_model(model_dirs):
    path = model_dirs["qwen3"]
    model = build_training_model(path, device="cpu")
    sampling = SamplingParams(max_new_tokens=8, temperature=0.8, ignore_eos=True, seed=3)
    prompts = [[5, 17, 300, 41], [900, 12, 8], [77, 78, 79, 80, 81, 82]]
    stats = {}
    for deterministic in (True, False):
        engine = Engine(path, device="cpu", max_num_tokens=512, deterministic=deterministic)
        try:
            stats[deterministic] = rollout_mismatch(
                model, engine.generate(prompts, sampling), temperature=0.8
            )
        finally:
            engine.shutdown()
    assert stats[True].num_tokens == 3 * 8
    assert stats[True].max_abs_diff == 0.0 and stats[True].kl_k3 == 0.0, stats[True]
    assert 0.0 < stats[False].max_abs_diff < 1e-3, stats[False]  # measured, not assumed
