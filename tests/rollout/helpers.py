"""Test policies and weight perturbations for the rollout tests."""

from __future__ import annotations

import time

import torch
from safetensors.torch import load_file

from gyre import SamplingParams
from gyre.rollout import Action, Policy


class ScriptedPolicy(Policy):
    """Plays the script: a string is appended as the agent's turn (trainable, like a demonstration),
    None lets the engine generate. Records what each turn produced."""

    def __init__(self, script: list[str | None] | None = None) -> None:
        self.script = list(script or [])
        self.turns: list[tuple[str, object]] = []  # ("generate", Completion) | ("scripted", ids)

    async def act(self, session, new, sampling, tools=None):
        forced = self.script.pop(0) if self.script else None
        if forced is None:
            c = await session.generate(new, sampling, tools)
            self.turns.append(("generate", c))
            return Action(c.text or "", c.output_ids, c.finish_reason)
        if new and isinstance(new[0], dict):
            # a first turn: only generate() renders the prompt with its tools and the assistant header;
            # generate one token and take it back
            await session.generate(new, SamplingParams(max_new_tokens=1), tools)
            await session.rewind(1)
        elif new:
            await session.append(new)
        ids = await session.append([{"role": "assistant", "content": forced}], trainable=True)
        self.turns.append(("scripted", ids))
        return Action(forced, ids, "scripted")

    @property
    def trained_ids(self) -> list[int]:
        return [t for kind, x in self.turns for t in (x.output_ids if kind == "generate" else x)]


def perturbed_weights(model_dir: str, version: int, scale: float = 0.05) -> list[tuple[str, torch.Tensor]]:
    """The model's weights plus seeded noise: version v of the 'trained' policy."""
    base = load_file(f"{model_dir}/model.safetensors")
    g = torch.Generator().manual_seed(1000 + version)
    return [
        (k, v + scale * torch.randn(v.shape, generator=g, dtype=v.dtype)) for k, v in sorted(base.items())
    ]


def freeze_mid_generation(engine, timeout_s: float = 20.0) -> None:
    """Pause the engine (in place) at a step where some request has sampled part of its output."""

    def check() -> bool:
        if any(0 < len(r.output_ids) < r.sampling.max_new_tokens - 2 for r in engine.scheduler.running):
            engine.pause("in_place")
            return True
        return False

    deadline = time.monotonic() + timeout_s
    while not engine.call(check):
        assert time.monotonic() < deadline, "no request was generating"
        time.sleep(0.002)
