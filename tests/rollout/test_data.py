"""Samples from trajectories, groups, and batch -> padded trainer tensors."""

from __future__ import annotations

import pytest
import torch

from gyre import Trajectory
from gyre.rollout import Batch, Group, Sample, batch_metrics


def _sample(prompt, response, reward, agent="policy", versions=None, mask=None):
    mask = mask or [1] * len(response)
    versions = versions or [0 if m else None for m in mask]
    return Sample(
        prompt,
        response,
        [-0.5 if v is not None else None for v in versions],
        mask,
        versions,
        reward=reward,
        agent=agent,
    )


def test_sample_from_trajectory_splits_at_first_trained_token():
    traj = Trajectory(
        token_ids=[5, 6, 7, 8, 9, 10, 11, 12],
        logprobs=[None, None, -1.0, -2.0, None, None, -3.0, None],
        loss_mask=[0, 0, 1, 1, 0, 0, 1, 0],
        weight_versions=[None, None, 3, 3, None, None, 4, None],
        turns=[(0, 2, "append"), (2, 4, "generate"), (4, 6, "append"), (6, 7, "generate"), (7, 8, "append")],
    )
    s = Sample.from_trajectory(traj, reward=1.5, agent="solver")
    assert s.prompt_ids == [5, 6] and s.response_ids == [7, 8, 9, 10, 11, 12]
    assert s.loss_mask == [1, 1, 0, 0, 1, 0] and s.logprobs == [-1.0, -2.0, None, None, -3.0, None]
    assert s.turns == [(0, 2, "generate"), (2, 4, "append"), (4, 5, "generate"), (5, 6, "append")]
    assert (s.min_version, s.max_version, s.num_generated) == (3, 4, 3)
    assert s.token_ids == traj.token_ids and s.reward == 1.5 and s.agent == "solver"


def test_sample_rejects_ragged_fields():
    with pytest.raises(ValueError, match="per-token"):
        Sample([1], [2, 3], [None], [0, 0], [None, None])


def test_group_degenerate_per_agent():
    same = Group("g", {}, [_sample([1], [2], 1.0), _sample([1], [3], 1.0)])
    mixed = Group("g", {}, [_sample([1], [2], 1.0), _sample([1], [3], 0.0)])
    # two agents, each constant within itself: degenerate; one agent varying: not
    agents_const = Group(
        "g",
        {},
        [
            _sample([1], [2], 1.0, "a"),
            _sample([1], [2], 0.0, "b"),
            _sample([1], [2], 1.0, "a"),
            _sample([1], [2], 0.0, "b"),
        ],
    )
    agents_vary = Group(
        "g",
        {},
        [
            _sample([1], [2], 1.0, "a"),
            _sample([1], [2], 0.0, "b"),
            _sample([1], [2], 0.0, "a"),
            _sample([1], [2], 0.0, "b"),
        ],
    )
    assert same.is_degenerate and not mixed.is_degenerate
    assert agents_const.is_degenerate and not agents_vary.is_degenerate


def test_batch_to_tensors_pads_and_aligns():
    a = _sample([1, 2, 3], [4, 5], 1.0, versions=[2, 3])
    b = _sample([1, 2], [6, 7, 8, 9], 0.0, mask=[1, 0, 0, 1])
    c = _sample([7], [8], 0.5)
    d = _sample([7], [9], 0.5)
    batch = Batch([Group("g0", {}, [a, b]), Group("g1", {}, [c, d])], policy_version=3)
    t = batch.to_tensors(pad_id=0)
    assert t["input_ids"].tolist() == [
        [1, 2, 3, 4, 5, 0],
        [1, 2, 6, 7, 8, 9],
        [7, 8, 0, 0, 0, 0],
        [7, 9, 0, 0, 0, 0],
    ]
    assert t["attention_mask"].tolist()[0] == [1, 1, 1, 1, 1, 0]
    assert t["loss_mask"].tolist() == [
        [0, 0, 0, 1, 1, 0],
        [0, 0, 1, 0, 0, 1],
        [0, 1, 0, 0, 0, 0],
        [0, 1, 0, 0, 0, 0],
    ]
    assert t["weight_versions"].tolist()[0] == [-1, -1, -1, 2, 3, -1]
    assert t["weight_versions"].tolist()[1] == [-1, -1, 0, -1, -1, 0]
    assert t["logprobs"][1].tolist() == [0, 0, -0.5, 0, 0, -0.5]
    assert t["prompt_lengths"].tolist() == [3, 2, 1, 1] and t["response_lengths"].tolist() == [2, 4, 1, 1]
    assert t["group_index"].tolist() == [0, 0, 1, 1]
    # GRPO advantages within each group: (r - mean) / std; a constant group gets 0
    adv = t["advantages"]
    assert adv[0] > 0 > adv[1] and torch.allclose(adv[0], -adv[1])
    assert adv[2:].tolist() == [0.0, 0.0]
    assert torch.allclose(batch.to_tensors(normalize_std=False)["advantages"][:2], torch.tensor([0.5, -0.5]))
    m = batch_metrics(batch)
    assert m["num_samples"] == 4 and m["reward/mean"] == 0.5 and m["staleness/max"] == 3


def test_empty_batch_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        Batch([]).to_tensors()


def test_rollout_config_from_recipe():
    from gyre.rollout import RolloutConfig

    cfg = RolloutConfig.from_dict({"batch_size": 2, "sampling": {"max_new_tokens": 7, "temperature": 0.5}})
    assert cfg.sampling.max_new_tokens == 7 and cfg.staleness_bound == 0
    with pytest.raises(ValueError, match="unknown RolloutConfig field.*batchsize"):
        RolloutConfig.from_dict({"batchsize": 2})
    with pytest.raises(ValueError, match="n_samples_per_prompt"):
        RolloutConfig(sampling={"n": 2})
    with pytest.raises(ValueError, match="update_mode"):
        RolloutConfig(update_mode="pause")
    with pytest.raises(ValueError, match="dynamic_sampling"):
        RolloutConfig(dynamic_sampling=True, n_samples_per_prompt=1)
