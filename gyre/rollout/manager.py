"""RolloutManager: prompts -> n episodes per prompt -> rewards -> groups -> batches for a trainer.

    manager = RolloutManager(pool, lambda: SingleTurnEnv(math_reward), dataset, RolloutConfig(...))
    for step in range(num_steps):
        batch = manager.get_batch()                 # blocks until batch_size groups are ready
        trainer.train(batch.to_tensors())
        manager.update_weights(trainer.named_tensors())   # or: with manager.weight_update(v): push

The manager runs its episodes on an asyncio loop in a thread of its own; get_batch / update_weights
are called from the trainer's thread (aget_batch from a coroutine).

mode="sync": a batch is generated when asked for; groups still in flight when it is full are cancelled
and their prompts requeued. mode="async": generation runs ahead while the trainer trains, bounded so
that policy_version - (oldest weight version of any token of a delivered sample) <= max_staleness:
a group starts only while fewer than (trainer updates so far + max_staleness + 1) batches' worth are
delivered, buffered or in flight, and a buffered group that grew too stale is dropped at delivery.

Exactly-once: every group id is delivered at most once, and a group is either delivered, dropped by
dynamic sampling / the staleness bound (counted in the metrics), or its prompt is requeued. An episode
whose engine fails is rerun from scratch (on another engine when the pool has one); its partial
trajectory is discarded, so a sample never mixes attempts.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import itertools
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from gyre.rollout.config import RolloutConfig
from gyre.rollout.data import Batch, Group
from gyre.rollout.env import Env
from gyre.rollout.episode import Agent, Episode, run_episode
from gyre.rollout.metrics import batch_metrics
from gyre.rollout.pool import EngineFailure, EnginePool, RestartEpisode


class RolloutManager:
    def __init__(
        self,
        pool: EnginePool,
        env_fn: Callable[[], Env],
        dataset: Iterable[dict[str, Any]],
        config: RolloutConfig | None = None,
        agents: dict[str, Agent] | None = None,
        logger: Any = None,
    ) -> None:
        self.pool = pool
        self.env_fn = env_fn
        self.config = config or RolloutConfig()
        self.agents = agents or {}
        self.logger = logger  # anything with .log(metrics: dict, step: int), e.g. metrics.WandbLogger
        self.policy_version = pool.weight_version
        self._base_version = self.policy_version
        self._dataset: Iterator[dict[str, Any]] = iter(dataset)
        self._peeked: tuple[str, dict] | None = None
        self._requeued: collections.deque[tuple[str, dict]] = collections.deque()
        self._ids = itertools.count()
        self._inflight: dict[str, asyncio.Task] = {}
        self._buffer: collections.deque[Group] = collections.deque()
        self._delivered: set[str] = set()
        self._num_batches = 0
        self._demand = False
        self._error: BaseException | None = None
        self._closed = False
        self.counters = collections.Counter(
            dict.fromkeys(("dropped_degenerate", "dropped_stale", "episode_retries", "episode_restarts"), 0)
        )
        self._consecutive_drops = 0
        self._last_delivery = time.perf_counter()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="gyre-rollout", daemon=True)
        self._thread.start()
        self._call(self._start())

    # -- trainer-facing -----------------------------------------------------------------------------
    def get_batch(self, timeout: float | None = None) -> Batch | None:
        """The next batch (the last one may be smaller); None when the dataset is used up. On timeout
        nothing is taken: the groups ready so far stay for the next call."""
        future = asyncio.run_coroutine_threadsafe(self._next_batch(), self._loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    async def aget_batch(self) -> Batch | None:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._next_batch(), self._loop))

    def update_weights(self, named_tensors: Iterable[tuple[str, Any]], version: int | None = None) -> int:
        """Push new weights to every engine (config.update_mode decides what in-flight rollouts do)."""
        return self._set_version(
            self._call(self.pool.update_weights(named_tensors, version, self.config.update_mode))
        )

    def update_weights_from_disk(self, path: str, version: int | None = None) -> int:
        return self._set_version(
            self._call(self.pool.update_weights_from_disk(path, version, self.config.update_mode))
        )

    @contextlib.contextmanager
    def weight_update(self, version: int):
        """For weights pushed by another channel (gyre.weight_sync): in-flight rollouts are handled by
        config.update_mode around the push, and `version` becomes the policy version."""
        old = self.pool.weight_version
        self._call(self.pool.begin_update(self.config.update_mode))
        try:
            yield
        except BaseException:
            self._call(self.pool.end_update(old))
            raise
        self._call(self.pool.end_update(version))
        self._set_version(version)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self._call(self._stop(), timeout=60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if self.logger is not None and hasattr(self.logger, "finish"):
            self.logger.finish()

    def __enter__(self) -> RolloutManager:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- loop thread --------------------------------------------------------------------------------
    def _call(self, coro: Any, timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _set_version(self, version: int) -> int:
        self.policy_version = version
        self._loop.call_soon_threadsafe(self._changed.fire)  # the async gate may open
        return version

    async def _start(self) -> None:
        self._changed = _Signal()
        self._producer = asyncio.create_task(self._produce())

    async def _stop(self) -> None:
        self._producer.cancel()
        tasks = list(self._inflight.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(self._producer, *tasks, return_exceptions=True)
        # then whatever else runs on this loop (the pool's health checks, restarts)
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in others:
            t.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    def _has_task(self) -> bool:
        if self._requeued or self._peeked is not None:
            return True
        task = next(self._dataset, None)
        if task is None:
            return False
        self._peeked = (f"g{next(self._ids)}", task)
        return True

    def _take_task(self) -> tuple[str, dict]:
        if self._requeued:
            return self._requeued.popleft()
        item, self._peeked = self._peeked, None
        return item

    def _can_start(self) -> bool:
        cfg = self.config
        if self._closed or self._error is not None or not self._has_task():
            return False
        if cfg.max_inflight_groups is not None and len(self._inflight) >= cfg.max_inflight_groups:
            return False
        pending = len(self._buffer) + len(self._inflight) / cfg.oversample
        if self._demand and pending < cfg.batch_size:
            return True  # a get_batch is waiting: fill its batch (also when the trainer has not updated)
        if cfg.mode == "sync":
            return False
        updates = self.policy_version - self._base_version
        return (
            self._num_batches * cfg.batch_size + pending < (updates + cfg.max_staleness + 1) * cfg.batch_size
        )

    async def _produce(self) -> None:
        try:
            while True:
                while not self._can_start():
                    await self._changed.wait()
                group_id, task = self._take_task()
                t = self._inflight[group_id] = asyncio.create_task(self._run_group(group_id, task))
                t.add_done_callback(functools.partial(self._group_done, group_id, task))
        except Exception as e:  # noqa: BLE001 - e.g. the dataset iterator raised: surfaces in get_batch
            self._error = e
            self._changed.fire()

    def _group_done(self, group_id: str, task: dict, t: asyncio.Task) -> None:
        if self._inflight.get(group_id) is t:  # cancelled before its first step: its body never ran
            del self._inflight[group_id]
            if not self._closed:
                self._requeued.appendleft((group_id, task))
            self._changed.fire()

    async def _run_group(self, group_id: str, task: dict) -> None:
        n = self.config.n_samples_per_prompt
        episodes = [asyncio.create_task(self._run_episode(task)) for _ in range(n)]
        try:
            await asyncio.wait(episodes, return_when=asyncio.FIRST_EXCEPTION)
            failed = next((t for t in episodes if t.done() and t.exception() is not None), None)
            if failed is not None:
                await _cancel(episodes)
                raise failed.exception()
            samples = []
            for k, t in enumerate(episodes):
                for s in t.result().samples:
                    s.uid, s.group_id = f"{group_id}/{k}/{s.agent}", group_id
                    samples.append(s)
            self._accept(Group(group_id, task, samples))
        except asyncio.CancelledError:
            await _cancel(episodes)
            if not self._closed:  # never delivered: its prompt runs again (after this task is gone)
                self._requeued.appendleft((group_id, task))
            raise
        except Exception as e:  # noqa: BLE001 - surfaces in get_batch
            self._error = e
        finally:
            if self._inflight.get(group_id) is asyncio.current_task():
                del self._inflight[group_id]
            self._changed.fire()

    async def _run_episode(self, task: dict) -> Episode:
        failures = 0
        while True:
            try:
                return await run_episode(self.env_fn(), task, self.pool, self.config.sampling, self.agents)
            except RestartEpisode:
                self.counters["episode_restarts"] += 1
            except EngineFailure as e:
                failures += 1
                self.counters["episode_retries"] += 1
                if failures > self.config.max_retries:
                    raise EngineFailure(f"episode failed {failures} times; last: {e}") from e

    def _accept(self, group: Group) -> None:
        if self.config.dynamic_sampling and group.is_degenerate:
            self.counters["dropped_degenerate"] += 1
            self._consecutive_drops += 1
            if self._consecutive_drops > self.config.max_consecutive_drops:
                self._error = RuntimeError(
                    f"dynamic sampling dropped {self._consecutive_drops} groups in a row (all rewards equal); "
                    "the task may be too easy or too hard for the policy"
                )
            return
        self._consecutive_drops = 0
        self._buffer.append(group)

    def _drop_stale(self) -> None:
        bound = self.config.staleness_bound
        keep = collections.deque()
        for g in self._buffer:
            v = g.min_version
            if v is not None and self.policy_version - v > bound:
                self.counters["dropped_stale"] += 1
            else:
                keep.append(g)
        self._buffer = keep

    async def _next_batch(self) -> Batch | None:
        cfg = self.config
        self._demand = True
        self._changed.fire()
        try:
            while True:
                if self._error is not None:
                    raise self._error
                self._drop_stale()
                if len(self._buffer) >= cfg.batch_size:
                    break
                if not self._inflight and not self._has_task():
                    break  # the dataset is used up
                await self._changed.wait()
        finally:
            self._demand = False
        pool_stats = await self.pool.stats()
        # NOTE: no await from here on: a cancelled get_batch must not have taken groups out of the buffer
        groups = [self._buffer.popleft() for _ in range(min(cfg.batch_size, len(self._buffer)))]
        if cfg.mode == "sync":
            for t in list(self._inflight.values()):
                t.cancel()
        if not groups:
            return None
        for g in groups:
            assert g.group_id not in self._delivered, f"group {g.group_id} delivered twice"
            self._delivered.add(g.group_id)
        now = time.perf_counter()
        batch = Batch(groups, policy_version=self.policy_version)
        batch.metrics = batch_metrics(
            batch,
            elapsed_s=now - self._last_delivery,
            pool_stats=pool_stats,
            weight_sync_s=self.pool.last_update_s,
            counters=self.counters,
        )
        self._last_delivery = now
        self._num_batches += 1
        if self.logger is not None:
            self.logger.log(batch.metrics, step=self._num_batches)
        return batch

    @property
    def num_inflight_groups(self) -> int:
        return len(self._inflight)

    @property
    def num_buffered_groups(self) -> int:
        return len(self._buffer)


async def _cancel(tasks: list[asyncio.Task]) -> None:
    """Cancel once and wait: a second cancel would cut short the episodes closing their sessions."""
    pending = [t for t in tasks if not t.done()]
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.wait(pending)


class _Signal:
    """Wakes every coroutine waiting on it; fire() is synchronous (safe in finally blocks)."""

    def __init__(self) -> None:
        self._waiters: list[asyncio.Future] = []

    def fire(self) -> None:
        for f in self._waiters:
            if not f.done():
                f.set_result(None)
        self._waiters.clear()

    async def wait(self) -> None:
        f = asyncio.get_running_loop().create_future()
        self._waiters.append(f)
        await f
