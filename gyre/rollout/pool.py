"""Engine pools: where the rollout layer's generations run. One interface, two implementations:
`LocalPool` (engines in this process: small loops and tests) and `RayPool` (engine replicas as Ray
actors, in ray_pool.py). Everything here is async and runs on the caller's event loop.

Weight updates go through the pool so that in-flight rollouts are handled by one policy (`mode`):
  continue   - requests keep running; tokens sampled after the update carry the new version while the
               KV of earlier tokens (computed by the old weights) is kept (engine.pause("in_place"));
  recompute  - abort-and-resume: running requests are requeued with their partial output and continue
               after their KV is recomputed by the new weights (engine.pause("retract"));
  restart    - running requests are aborted; their episodes start again from scratch under the new
               weights, so no sample mixes versions (engine.pause("abort") + RestartEpisode).
Every token records the version that sampled it in all three modes.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any

from gyre.engine.request import Completion, SamplingParams

UPDATE_MODES = ("continue", "recompute", "restart")
_PAUSE_FOR = {"continue": "in_place", "recompute": "retract", "restart": "abort"}


async def blocking(fn: Callable[..., Any], *args: Any) -> Any:
    """Run a blocking engine call (pause, update, session close) off the event loop, in a daemon
    thread: a call to an engine that was shut down meanwhile never returns, and must not keep the
    interpreter alive at exit (a ThreadPoolExecutor worker would)."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if not future.done():
            future.set_exception(error) if error is not None else future.set_result(result)

    def run() -> None:
        try:
            result, error = fn(*args), None
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
            result, error = None, e
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop is closed: nobody is waiting
            pass

    threading.Thread(target=run, name="gyre-engine-call", daemon=True).start()
    return await future


class EngineFailure(RuntimeError):
    """An engine died or failed a request; the episode that used it is retried elsewhere."""


class RestartEpisode(RuntimeError):
    """A weight update in mode "restart" aborted this episode's turn; run the episode again."""


class RolloutSession:
    """A multi-turn conversation on one engine (session affinity): the async face of engine.Session.
    Tracks its length so that episodes can budget tokens without fetching the trajectory."""

    def __init__(self, pool: EnginePool) -> None:
        self.pool = pool
        self.num_tokens = 0
        self.response_start: int | None = None  # index of the first trained token

    async def generate(
        self, new: Any = None, sampling: SamplingParams | None = None, tools: list | None = None
    ) -> Completion:
        epoch = self.pool.update_epoch
        c = await self._generate(new, sampling, tools)
        if self.response_start is None:
            self.response_start = len(c.prompt_ids)
        self.num_tokens = len(c.prompt_ids) + len(c.output_ids)
        if c.finish_reason == "abort":
            if self.pool.update_epoch != epoch and self.pool.update_mode == "restart":
                raise RestartEpisode("a weight update aborted the turn")
            raise EngineFailure(f"turn aborted: {c.abort_reason}")
        return c

    async def append(self, new: Any, trainable: bool = False) -> list[int]:
        ids = await self._append(new, trainable)
        if trainable and self.response_start is None:
            self.response_start = self.num_tokens
        self.num_tokens += len(ids)
        return ids

    async def rewind(self, num_turns: int = 1) -> None:
        self.num_tokens = await self._rewind(num_turns)
        if self.response_start is not None and self.response_start >= self.num_tokens:
            self.response_start = None

    @property
    def num_response_tokens(self) -> int:
        return 0 if self.response_start is None else self.num_tokens - self.response_start

    async def trajectory(self) -> Any:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def _generate(self, new: Any, sampling: SamplingParams | None, tools: list | None) -> Completion:
        raise NotImplementedError

    async def _append(self, new: Any, trainable: bool) -> list[int]:
        raise NotImplementedError

    async def _rewind(self, num_turns: int) -> int:
        """Drop turns; returns the new length."""
        raise NotImplementedError


class EnginePool:
    """Shared by LocalPool and RayPool: versions, the update protocol, chat generation prompts."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.weight_version = 0
        self.update_epoch = 0  # bumped when an update starts: turns that span it know it
        self.update_mode = "continue"
        self.last_update_s = 0.0
        self._generation_prompt: list[int] | None = None

    # -- implemented by each pool -------------------------------------------------------------------
    async def open_session(self) -> RolloutSession:
        raise NotImplementedError

    async def generate(self, prompt: Any, sampling: SamplingParams | None = None) -> list[Completion]:
        raise NotImplementedError

    async def stats(self) -> dict[str, float]:
        raise NotImplementedError

    async def _pause(self, mode: str) -> None:
        raise NotImplementedError

    async def _resume(self) -> None:
        raise NotImplementedError

    async def _load(self, source: tuple[str, Any], version: int) -> None:
        """Load ("tensors", list of (name, tensor)) or ("disk", path) into every engine."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    # -- weight updates -----------------------------------------------------------------------------
    async def update_weights(
        self, named_tensors: Iterable[tuple[str, Any]], version: int | None = None, mode: str = "continue"
    ) -> int:
        return await self._update(("tensors", list(named_tensors)), version, mode)

    async def update_weights_from_disk(
        self, path: str, version: int | None = None, mode: str = "continue"
    ) -> int:
        return await self._update(("disk", str(path)), version, mode)

    async def begin_update(self, mode: str = "continue") -> None:
        """For weights pushed by another channel (gyre.weight_sync): call before the push..."""
        if mode not in UPDATE_MODES:
            raise ValueError(f"update mode must be one of {UPDATE_MODES}, got {mode!r}")
        self.update_mode = mode
        self.update_epoch += 1
        await self._pause(_PAUSE_FOR[mode])

    async def end_update(self, version: int) -> None:
        """...and this after it, with the version the engines now hold."""
        self.weight_version = version
        await self._resume()

    async def _update(self, source: tuple[str, Any], version: int | None, mode: str) -> int:
        version = self.weight_version + 1 if version is None else int(version)
        t0 = time.perf_counter()
        old = self.weight_version
        await self.begin_update(mode)
        try:
            await self._load(source, version)
        except BaseException:  # the engines validate before writing: they still hold the old weights
            await self.end_update(old)
            raise
        await self.end_update(version)
        self.last_update_s = time.perf_counter() - t0
        return version

    # -- chat ---------------------------------------------------------------------------------------
    @property
    def generation_prompt_ids(self) -> list[int]:
        """Tokens the chat template adds to open an assistant turn ("<|im_start|>assistant\\n")."""
        if self._generation_prompt is None:
            if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
                raise ValueError("chat observations need a tokenizer with a chat template")
            msgs = [{"role": "user", "content": "x"}]
            bare = self.tokenizer.apply_chat_template(msgs, tokenize=False)
            full = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            if not full.startswith(bare):
                raise ValueError("the chat template's generation prompt is not a suffix of the conversation")
            self._generation_prompt = self.tokenizer.encode(full[len(bare) :], add_special_tokens=False)
        return list(self._generation_prompt)


# -- in-process ---------------------------------------------------------------------------------------
class LocalSession(RolloutSession):
    def __init__(self, pool: LocalPool, engine: Any) -> None:
        super().__init__(pool)
        self.engine = engine
        self.session = engine.open_session()

    async def _generate(self, new: Any, sampling: SamplingParams | None, tools: list | None) -> Completion:
        return await self.session.agenerate(new, sampling, tools)

    async def _append(self, new: Any, trainable: bool) -> list[int]:
        return self.session.append(new, trainable)

    async def _rewind(self, num_turns: int) -> int:
        self.session.rewind(num_turns)
        return len(self.session.token_ids)

    async def trajectory(self) -> Any:
        return self.session.trajectory()

    async def close(self) -> None:
        self.pool.load[id(self.engine)] -= 1
        await blocking(self.session.close)


class LocalPool(EnginePool):
    """Engines in this process; new sessions and requests go to the least-loaded one."""

    def __init__(self, engines: Any | Sequence[Any]) -> None:
        self.engines = list(engines) if isinstance(engines, Sequence) else [engines]
        if not self.engines:
            raise ValueError("LocalPool needs at least one engine")
        super().__init__(self.engines[0].tokenizer)
        self.weight_version = self.engines[0].weight_version
        self.load = {id(e): 0 for e in self.engines}  # open sessions + requests in flight

    def _pick(self) -> Any:
        return min(self.engines, key=lambda e: self.load[id(e)])

    async def open_session(self) -> RolloutSession:
        engine = self._pick()
        self.load[id(engine)] += 1
        return LocalSession(self, engine)

    async def generate(self, prompt: Any, sampling: SamplingParams | None = None) -> list[Completion]:
        engine = self._pick()
        self.load[id(engine)] += 1
        try:
            out = await engine.agenerate(prompt, sampling)
        finally:
            self.load[id(engine)] -= 1
        return out if isinstance(out, list) else [out]

    async def _pause(self, mode: str) -> None:
        for e in self.engines:
            await blocking(e.pause, mode)

    async def _resume(self) -> None:
        for e in self.engines:
            await blocking(e.resume)

    async def _load(self, source: tuple[str, Any], version: int) -> None:
        kind, what = source
        for e in self.engines:
            if kind == "tensors":
                await blocking(e.update_weights, what, version)
            else:
                await blocking(e.update_weights_from_disk, what, version)

    async def stats(self) -> dict[str, float]:
        return merge_stats([e.stats() for e in self.engines])


def merge_stats(per_engine: list[dict[str, Any]]) -> dict[str, float]:
    keys = (
        "num_generated_tokens",
        "num_prompt_tokens",
        "num_cached_prompt_tokens",
        "num_running",
        "num_waiting",
        "spec_num_verifies",
        "spec_num_draft_tokens",
        "spec_num_accepted_tokens",
    )
    out = {k: float(sum(s.get(k, 0) for s in per_engine)) for k in keys}
    out["cache_hit_rate"] = (
        out["num_cached_prompt_tokens"] / out["num_prompt_tokens"] if out["num_prompt_tokens"] else 0.0
    )
    if out["spec_num_verifies"]:  # speculative decoding, since the engines started
        out["spec_acceptance_rate"] = out["spec_num_accepted_tokens"] / out["spec_num_draft_tokens"]
        out["spec_mean_accept_len"] = 1.0 + out["spec_num_accepted_tokens"] / out["spec_num_verifies"]
    out["num_engines"] = float(len(per_engine))
    return out


def capped(sampling: SamplingParams, max_new_tokens: int) -> SamplingParams:
    if max_new_tokens >= sampling.max_new_tokens:
        return sampling
    return replace(sampling, max_new_tokens=max(1, max_new_tokens))
