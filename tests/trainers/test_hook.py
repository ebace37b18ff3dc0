"""WeightSyncHook: version = step, every-N, and a failing push still finishes the adapter's gathers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from gyre import Engine
from gyre.trainers.adapters.hf import HFAdapter
from gyre.trainers.hook import WeightSyncHook


class EngineSender:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.versions: list[int] = []

    def push(self, named_tensors, version: int) -> None:
        self.engine.update_weights(named_tensors, version=version)
        self.versions.append(version)


class CountingAdapter(HFAdapter):
    """Counts how far named_tensors() was iterated (a gather per tensor in the distributed adapters)."""

    def named_tensors(self):
        self.consumed = 0
        for pair in super().named_tensors():
            self.consumed += 1
            yield pair


class FailingSender:
    def push(self, named_tensors, version: int) -> None:
        next(iter(named_tensors))
        raise ConnectionError("engine went away")


def test_hook_pushes_version_step(model_dirs):
    path = model_dirs["qwen2"]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with Engine(path, device="cpu", max_num_tokens=256) as eng:
        sender = EngineSender(eng)
        hook = WeightSyncHook(sender, HFAdapter(model), every=2)
        norms = {}
        for step in range(1, 6):
            with torch.no_grad():
                model.model.norm.weight.mul_(1.01)
            norms[step] = model.model.norm.weight.detach().clone()
            hook.after_step(step)
        assert sender.versions == [2, 4] and eng.weight_version == 4 and hook.last_version == 4
        assert torch.equal(eng.runner.model.model.norm.weight, norms[4])  # step 4's weights, not step 5's


def test_failed_push_raises_after_finishing_the_gathers(model_dirs):
    model = AutoModelForCausalLM.from_pretrained(model_dirs["llama"], dtype=torch.float32)
    adapter = CountingAdapter(model)
    with pytest.raises(ConnectionError):
        WeightSyncHook(FailingSender(), adapter).after_step(1)
    assert adapter.consumed == len(list(HFAdapter(model).named_tensors()))
