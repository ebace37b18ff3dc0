"""Recipes' spec: section, and the GRPO loop's EAGLE head refresh (gyre.trainers.run.DraftRefresher)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gyre.engine.engine import Engine
from gyre.engine.spec.eagle import load_eagle
from gyre.recipe import SpecSection, load_recipe
from gyre.recipe_loader import RecipeError
from gyre.rollout.data import Batch, Group, Sample
from gyre.testing import tiny_model
from gyre.trainers.adapters.hf import HFAdapter
from gyre.trainers.grpo import train
from gyre.trainers.run import DraftRefresher

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "tiny_arith_grpo_spec.yaml"
SMALL = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
             num_hidden_layers=1)


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory) -> str:
    return str(tiny_model("qwen3", tmp_path_factory.mktemp("spec_refresh") / "qwen3", **SMALL))


# -- the recipe section ---------------------------------------------------------------------------------


def test_spec_section_maps_onto_engine_fields():
    r = load_recipe(str(RECIPE))
    spec = r.spec
    assert (spec.method, spec.num_tokens, spec.draft_path, spec.refresh_every) == ("eagle", 2, None, 10)
    assert spec.refreshes
    assert spec.engine_fields("/heads/h") == {"spec_method": "eagle", "spec_num_tokens": 2,
                                              "spec_draft_path": "/heads/h", "spec_on_weight_update": "keep"}
    r = load_recipe(str(RECIPE), ["spec.method=ngram", "spec.refresh_every=0", "spec.on_weight_update=null"])
    assert r.spec.engine_fields(None) == {"spec_method": "ngram", "spec_num_tokens": 2,
                                          "spec_draft_path": None}
    assert not r.spec.refreshes
    assert SpecSection().engine_fields(None) == {}  # no spec: section, no speculative decoding


@pytest.mark.parametrize("override,msg", [
    ("spec.metod=eagle", "unknown key 'spec.metod' \\(did you mean 'method'\\?\\)"),
    ("spec.method=medusa", "spec.method must be ngram | draft | eagle"),
    ("spec.num_tokens=0", "spec.num_tokens and spec.refresh_steps must be >= 1"),
    ("spec.refresh_steps=0", "spec.num_tokens and spec.refresh_steps must be >= 1"),
    ("spec.refresh_every=-1", "spec.refresh_every must be >= 0"),
    ("spec.refresh_every=two", "spec.refresh_every: expected an integer"),
    ("spec.method=ngram", "spec.refresh_every needs spec.method eagle"),
    ("spec.on_weight_update=drop", "spec.on_weight_update must be disable | keep"),
    ("spec.refresh_every=0", "spec.method eagle needs spec.draft_path"),
    ("engine.spec_num_tokens=3", "set in spec: and in engine.spec_num_tokens"),
])
def test_spec_section_errors_are_named(override, msg):
    with pytest.raises(RecipeError, match=msg):
        load_recipe(str(RECIPE), [override])


def test_spec_section_other_errors():
    with pytest.raises(ValueError, match="spec.method draft needs spec.draft_path"):
        SpecSection(method="draft")
    with pytest.raises(ValueError, match="spec.draft_path needs spec.method"):
        SpecSection(draft_path="/x")


# -- the refresh ----------------------------------------------------------------------------------------


def _batch(seed: int, n: int = 4) -> Batch:
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n):
        ids = torch.randint(3, 1400, (12,), generator=g).tolist()
        samples.append(Sample(ids[:6], ids[6:], [0.0] * 6, [1] * 6, [1] * 6, uid=f"g/{i}/policy"))
    return Batch([Group("g", {}, samples)])


def test_refresher_bootstraps_retrains_and_cleans_up(small_dir, tmp_path):
    recipe = load_recipe(str(RECIPE), ["spec.refresh_steps=2", "spec.refresh_every=2"])
    drafts = DraftRefresher(recipe.spec, tmp_path, seed=0, device="cpu")
    assert drafts.path is None
    drafts.bootstrap(small_dir, recipe, num_tasks=16)  # a first head from the task's reference answers
    assert drafts.path == str(tmp_path / "draft" / "step-0")
    load_eagle(drafts.path, torch.float32, "cpu")

    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(small_dir, dtype=torch.float32)
    batches = [_batch(1), _batch(2)]
    for b in batches:
        drafts.tokens.extend(s.token_ids for s in b.samples)
    assert len(drafts.tokens) == 8 and drafts.tokens[0] == batches[0].samples[0].token_ids
    metrics = drafts.retrain(policy, drafts.tokens, step=2)
    assert set(metrics) == {"spec_refresh_loss_first", "spec_refresh_loss", "spec_refresh_accuracy",
                            "spec_refresh_tokens", "spec_refresh_seconds"}
    assert metrics["spec_refresh_tokens"] == 2 * 8 * 11  # refresh_steps x batch_size x positions
    assert drafts.path == str(tmp_path / "draft" / "step-2") and not (tmp_path / "draft" / "step-0").exists()
    load_eagle(drafts.path, torch.float32, "cpu")
    # a resumed run starts from the newest head written
    assert DraftRefresher(recipe.spec, tmp_path, seed=0).path == drafts.path


def test_refresher_keeps_a_given_head_and_writes_a_policy_dir(small_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from gyre.engine.spec.train import train_eagle

    given = tmp_path / "given"
    train_eagle(small_dir, [[5, 6, 7, 8]], given, steps=1)
    recipe = load_recipe(str(RECIPE), [f"spec.draft_path={given}", "spec.refresh_steps=1"])
    drafts = DraftRefresher(recipe.spec, tmp_path / "run", seed=0, device="cpu")
    assert drafts.bootstrap(small_dir, recipe) == {} and drafts.path == str(given)
    policy = AutoModelForCausalLM.from_pretrained(small_dir, dtype=torch.float32)
    path = drafts.write_policy(small_dir, HFAdapter(policy, dtype=torch.float32).named_tensors())
    drafts.retrain(path, [[5, 6, 7, 8, 9]], step=3)  # a policy that is not an HF model goes through a dir
    assert given.exists()  # the user's head is never removed


@pytest.mark.skipif(not hasattr(Engine, "load_draft"), reason="needs Engine.load_draft")
def test_grpo_loop_refreshes_the_head(tmp_path):
    recipe = load_recipe(str(RECIPE), [
        f"logging.run_dir={tmp_path}", "trainer.steps=4", "warmup.steps=0", "rollout.batch_size=2",
        "rollout.n_samples_per_prompt=2", "spec.refresh_every=2", "spec.refresh_steps=2",
        "logging.plot=false", "logging.wandb=false", "logging.progress=false",
        "model.tiny_overrides={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1}"])
    history = train(recipe)
    assert [m["step"] for m in history] == [1, 2, 3, 4]
    refreshed = [m["step"] for m in history if "spec_refresh_loss" in m]
    assert refreshed == [2, 4]
    run = tmp_path / recipe.logging.name
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[1]["spec_refresh_tokens"] > 0 and 0.0 <= lines[3]["spec_refresh_accuracy"] <= 1.0
    assert sorted(p.name for p in (run / "draft").iterdir()) == ["step-4"]
