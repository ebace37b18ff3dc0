"""EngineActor: one Engine in its own Ray actor process (a GPU set, or CPUs). Its methods mirror the
Engine and Session APIs; RayPool (ray_pool.py) routes to it. No ray import here: the pool wraps the
class with ray.remote."""

from __future__ import annotations

import asyncio
from typing import Any

from gyre.engine.request import Completion, SamplingParams


class EngineActor:
    """One Engine in its own process (a GPU set, or CPUs). Methods mirror Engine and Session."""

    def __init__(
        self, model_path: str, engine_kwargs: dict[str, Any], num_threads: int | None = None
    ) -> None:
        if num_threads:
            import torch

            torch.set_num_threads(num_threads)
        from gyre.engine.engine import Engine

        self.engine = Engine(model_path, **engine_kwargs)
        self.sessions: dict[str, Any] = {}

    async def ready(self) -> int:
        return self.engine.weight_version

    async def generate(self, prompt: Any, sampling: SamplingParams | None) -> list[Completion]:
        out = await self.engine.agenerate(prompt, sampling)
        return out if isinstance(out, list) else [out]

    async def open_session(self) -> str:
        s = self.engine.open_session()
        self.sessions[s.session_id] = s
        return s.session_id

    async def session_generate(
        self, sid: str, new: Any, sampling: SamplingParams | None, tools: list | None
    ) -> Completion:
        return await self.sessions[sid].agenerate(new, sampling, tools)

    async def session_append(self, sid: str, new: Any, trainable: bool) -> list[int]:
        return self.sessions[sid].append(new, trainable)

    async def session_rewind(self, sid: str, num_turns: int) -> int:
        self.sessions[sid].rewind(num_turns)
        return len(self.sessions[sid].token_ids)

    async def session_trajectory(self, sid: str) -> Any:
        return self.sessions[sid].trajectory()

    async def session_close(self, sid: str) -> None:
        s = self.sessions.pop(sid, None)
        if s is not None:
            await asyncio.to_thread(s.close)

    async def pause(self, mode: str) -> None:
        await asyncio.to_thread(self.engine.pause, mode)

    async def resume(self) -> None:
        await asyncio.to_thread(self.engine.resume)

    async def update_weights(self, named_tensors: list, version: int) -> int:
        return await asyncio.to_thread(self.engine.update_weights, named_tensors, version)

    async def update_weights_from_disk(self, path: str, version: int) -> int:
        return await asyncio.to_thread(self.engine.update_weights_from_disk, path, version)

    async def stats(self) -> dict[str, Any]:
        return self.engine.stats()
