"""Expert-parallel load balancing: the placement plan (replicas of hot experts, balanced ranks, experts
that stay keep their slots), and engines on 2 gloo ranks whose outputs do not change when experts are
replicated and moved, on demand or every N steps, and whose replicas all take weight updates."""

from __future__ import annotations

import os
from collections import Counter

import pytest
from safetensors.torch import load_file

from gyre import Engine
from gyre.engine.eplb import imbalance, plan_layer
from gyre.testing import tiny_model

from .test_parallel import GREEDY, KW, PROMPTS, check_against_hf, check_same


def test_plan_replicates_hot_experts_and_balances_ranks():
    load = [400, 10, 10, 10, 10, 10, 10, 200]
    current = [0, 1, 2, 3, 4, 5, 6, 7, 0, 1]  # 2 ranks x 5 slots, replicas of 0 and 1
    plan = plan_layer(load, 2, 5, current)
    assert sorted(set(plan)) == list(range(8))
    assert Counter(plan)[0] == 2 and Counter(plan)[7] == 2  # the two hot experts get the replicas
    for r in range(2):
        assert len(set(plan[r * 5 : (r + 1) * 5])) == 5  # never two replicas on one rank
    assert imbalance(load, plan, 2) < imbalance(load, current, 2)
    assert imbalance(load, plan, 2) < 1.05
    for p, e in enumerate(current[:5]):  # an expert that stays on rank 0 keeps its slot
        if e in plan[:5]:
            assert plan[p] == e
    assert plan_layer([0] * 8, 2, 5, current) == current  # no traffic: nothing moves


def test_plan_without_redundancy_is_a_permutation():
    load = [50, 40, 30, 20, 10, 5, 3, 1]
    plan = plan_layer(load, 4, 2, list(range(8)))
    assert sorted(plan) == list(range(8))
    assert imbalance(load, plan, 4) <= imbalance(load, list(range(8)), 4)


@pytest.fixture(scope="module")
def moe_dir(model_dirs) -> str:
    return model_dirs["qwen3_moe"]


@pytest.fixture(scope="module")
def reference(moe_dir):
    with Engine(moe_dir, **KW) as eng:
        return eng.generate(PROMPTS, GREEDY)


def test_rebalance_keeps_outputs_and_replicas_take_updates(moe_dir, reference, tmp_path):
    new_dir = str(tiny_model("qwen3_moe", tmp_path / "new", seed=1))
    with Engine(moe_dir, ep_size=2, ep_num_redundant_experts=2, **KW) as eng:
        check_same(eng.generate(PROMPTS, GREEDY), reference)  # initial replicas of experts 0 and 1
        before = eng.stats()["expert_placement"]
        result = eng.rebalance_experts()
        stats = eng.stats()
        assert stats["num_expert_rebalances"] == 1 and stats["expert_placement"] != before
        # some expert now on rank 1 was not there before: its weights came over from rank 0
        assert any(set(now[5:]) - set(old[5:]) for now, old in zip(stats["expert_placement"], before))
        assert result["imbalance_after"] <= result["imbalance_before"]
        check_same(eng.generate(PROMPTS, GREEDY), reference)
        eng.update_weights(load_file(os.path.join(new_dir, "model.safetensors")).items())
        check_against_hf(new_dir, eng.generate(PROMPTS, GREEDY))


def test_periodic_rebalance(moe_dir, reference):
    with Engine(moe_dir, ep_size=2, ep_num_redundant_experts=4, eplb_interval=3, **KW) as eng:
        outs = eng.generate(PROMPTS, GREEDY)
        stats = eng.stats()
    assert stats["num_expert_rebalances"] >= 3
    check_same(outs, reference)
