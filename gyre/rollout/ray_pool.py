"""Engine replicas as Ray actors, behind a router (this module imports ray; gyre.rollout does not).

Routing: a session stays on the replica that opened it (its KV is there); new sessions and stateless
requests go to the replica with the least load (open sessions + requests in flight).
Failure: a replica is dead when a call to it fails with an actor error or it misses a health check
(ping every health_check_interval_s, health_check_timeout_s to answer). A dead replica is killed and
removed from routing; its in-flight stateless requests are retried on another replica, and calls on
its sessions raise EngineFailure, so the RolloutManager reruns those episodes elsewhere. Then a new
actor is started in its place (same placement group) and loaded with the current weights: the last
tensors or checkpoint directory pushed through this pool. Weights pushed by another channel between
begin_update / end_update cannot be replayed: pass `on_restart(actor)` to load them (without it, such
a replica is not put back into routing).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from gyre.engine.request import Completion, SamplingParams
from gyre.rollout.pool import EngineFailure, EnginePool, RolloutSession, merge_stats
from gyre.rollout.ray_actor import EngineActor

log = logging.getLogger("gyre.rollout")

try:  # an actor that cannot be reached (network, restarting) is as good as dead to us
    from ray.exceptions import ActorUnavailableError

    _ACTOR_ERRORS: tuple[type[BaseException], ...] = (RayActorError, ActorUnavailableError)
except ImportError:  # older ray
    _ACTOR_ERRORS = (RayActorError,)


@dataclass
class Replica:
    index: int
    actor: Any
    placement_group: Any = None
    load: int = 0
    alive: bool = True


class RemoteSession(RolloutSession):
    def __init__(self, pool: RayPool, replica: Replica, session_id: str) -> None:
        super().__init__(pool)
        self.replica = replica
        self.session_id = session_id

    async def _call(self, method: str, *args: Any) -> Any:
        if not self.replica.alive:
            raise EngineFailure(f"engine replica {self.replica.index} died")
        ref = getattr(self.replica.actor, method).remote(self.session_id, *args)
        try:
            return await ref
        except asyncio.CancelledError:
            ray.cancel(ref)  # cancels the actor's coroutine, which aborts the engine request
            raise
        except _ACTOR_ERRORS as e:
            self.pool.mark_dead(self.replica, e)
            raise EngineFailure(f"engine replica {self.replica.index} died: {type(e).__name__}") from e

    async def _generate(self, new: Any, sampling: SamplingParams | None, tools: list | None) -> Completion:
        return await self._call("session_generate", new, sampling, tools)

    async def _append(self, new: Any, trainable: bool) -> list[int]:
        return await self._call("session_append", new, trainable)

    async def _rewind(self, num_turns: int) -> int:
        return await self._call("session_rewind", num_turns)

    async def trajectory(self) -> Any:
        return await self._call("session_trajectory")

    async def close(self) -> None:
        self.replica.load -= 1
        if self.replica.alive:
            try:
                await self.replica.actor.session_close.remote(self.session_id)
            except _ACTOR_ERRORS as e:
                self.pool.mark_dead(self.replica, e)


class RayPool(EnginePool):
    def __init__(
        self,
        model_path: str,
        num_replicas: int = 2,
        engine_kwargs: dict[str, Any] | None = None,
        num_cpus_per_engine: float = 1,
        num_gpus_per_engine: int = 0,
        num_threads: int | None = None,
        health_check_interval_s: float = 2.0,
        health_check_timeout_s: float = 30.0,
        restart: bool = True,
        max_request_retries: int = 3,
        wait_for_replica_s: float = 120.0,
        on_restart: Callable[[Any], Awaitable[None]] | None = None,
    ) -> None:
        from transformers import AutoTokenizer

        if not ray.is_initialized():
            ray.init()
        tokenizer = None
        if any(
            os.path.exists(os.path.join(model_path, f)) for f in ("tokenizer.json", "tokenizer_config.json")
        ):
            tokenizer = AutoTokenizer.from_pretrained(model_path)
        super().__init__(tokenizer)
        self.model_path = str(model_path)
        self.engine_kwargs = dict(engine_kwargs or {})
        self.num_cpus_per_engine = num_cpus_per_engine
        self.num_gpus_per_engine = num_gpus_per_engine
        self.num_threads = num_threads
        self.health_check_interval_s = health_check_interval_s
        self.health_check_timeout_s = health_check_timeout_s
        self.restart = restart
        self.max_request_retries = max_request_retries
        self.wait_for_replica_s = wait_for_replica_s
        self.on_restart = on_restart
        self.num_deaths = 0
        self.num_restarts = 0
        self._weights: tuple[str, Any, int] | None = None  # the last (kind, ObjectRef | path, version)
        self._health_task: asyncio.Task | None = None
        self._restarts: set[asyncio.Task] = set()
        self.replicas = [self._spawn(i) for i in range(num_replicas)]
        try:
            versions = ray.get([r.actor.ready.remote() for r in self.replicas], timeout=wait_for_replica_s)
        except GetTimeoutError:
            self.close()
            raise
        self.weight_version = versions[0]

    # -- replicas -----------------------------------------------------------------------------------
    def _spawn(self, index: int, placement_group: Any = None) -> Replica:
        opts: dict[str, Any] = {"num_cpus": self.num_cpus_per_engine}
        if self.num_gpus_per_engine:
            from ray.util.placement_group import placement_group as make_pg
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            if placement_group is None:  # one bundle per engine: its GPU set on one node
                placement_group = make_pg(
                    [{"GPU": self.num_gpus_per_engine, "CPU": self.num_cpus_per_engine}],
                    strategy="STRICT_PACK",
                )
                ray.get(placement_group.ready(), timeout=self.wait_for_replica_s)
            opts.update(
                num_gpus=self.num_gpus_per_engine,
                scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group),
            )
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env_path = os.environ.get("PYTHONPATH", "")
        if root not in env_path.split(os.pathsep) and not _installed("gyre"):  # workers must import gyre
            opts["runtime_env"] = {
                "env_vars": {"PYTHONPATH": os.pathsep.join(p for p in (root, env_path) if p)}
            }
        actor = (
            ray.remote(EngineActor)
            .options(**opts)
            .remote(self.model_path, self.engine_kwargs, self.num_threads)
        )
        return Replica(index, actor, placement_group)

    @property
    def alive(self) -> list[Replica]:
        return [r for r in self.replicas if r.alive]

    def mark_dead(self, replica: Replica, reason: Any = None) -> None:
        """Remove a replica from routing, kill it, and start its replacement."""
        if not replica.alive:
            return
        replica.alive = False
        self.num_deaths += 1
        log.warning(
            "engine replica %d is dead (%s); %s",
            replica.index,
            reason,
            "restarting it" if self.restart else "not restarting it",
        )
        try:
            ray.kill(replica.actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        if self.restart:
            self._schedule_restart(replica)

    def _schedule_restart(self, replica: Replica) -> None:
        task = asyncio.get_running_loop().create_task(self._restart(replica))
        task.replica = replica  # type: ignore[attr-defined]
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)

    async def _restart(self, dead: Replica) -> None:
        while True:
            new = self._spawn(dead.index, dead.placement_group)
            try:
                await asyncio.wait_for(new.actor.ready.remote(), self.wait_for_replica_s)
                if not await self._bring_up_to_date(new):
                    log.error(
                        "engine replica %d restarted but cannot load weights version %d (pushed by "
                        "another channel: pass RayPool(on_restart=...)); it stays out of routing",
                        dead.index,
                        self.weight_version,
                    )
                    ray.kill(new.actor, no_restart=True)
                    return
            except (asyncio.TimeoutError, *_ACTOR_ERRORS) as e:
                log.warning("restarting engine replica %d failed (%s); trying again", dead.index, e)
                ray.kill(new.actor, no_restart=True)
                continue
            except BaseException:  # cancelled (the loop is closing): leave no orphan actor
                ray.kill(new.actor, no_restart=True)
                raise
            self.replicas[dead.index] = new
            self.num_restarts += 1
            return

    async def _bring_up_to_date(self, replica: Replica) -> bool:
        """Load the current weights into a new actor; False if this pool cannot (an update may land
        meanwhile: loop until the versions agree)."""
        for _ in range(10):
            if await replica.actor.ready.remote() == self.weight_version:
                return True
            version = self.weight_version
            if self._weights is not None and self._weights[2] == version:
                kind, what, _ = self._weights
                method = (
                    replica.actor.update_weights
                    if kind == "tensors"
                    else replica.actor.update_weights_from_disk
                )
                await method.remote(what, version)
            elif self.on_restart is not None:
                await self.on_restart(replica.actor)
            else:
                return False
        return False

    async def _pick(self) -> Replica:
        self._ensure_health_checks()
        waited = 0.0
        while not self.alive:
            if waited >= self.wait_for_replica_s or not (self.restart and self._restarts):
                raise EngineFailure("no live engine replica")
            await asyncio.sleep(0.1)
            waited += 0.1
        return min(self.alive, key=lambda r: r.load)

    def _ensure_health_checks(self) -> None:
        """Health checks run on the loop the pool is used from (the RolloutManager's)."""
        loop = asyncio.get_running_loop()
        task = self._health_task
        if task is None or task.done() or task.get_loop() is not loop:
            if task is not None and not task.done():
                task.get_loop().call_soon_threadsafe(task.cancel)
            self._health_task = loop.create_task(self._health_loop())
            restarting = {t.replica.index for t in self._restarts if not t.done()}
            for r in self.replicas:  # restarts cut short when the previous loop closed
                if not r.alive and self.restart and r.index not in restarting:
                    self._schedule_restart(r)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_check_interval_s)
            replicas = self.alive
            results = await asyncio.gather(
                *(asyncio.wait_for(r.actor.ready.remote(), self.health_check_timeout_s) for r in replicas),
                return_exceptions=True,
            )
            for r, res in zip(replicas, results):
                if isinstance(res, (asyncio.TimeoutError, *_ACTOR_ERRORS)):
                    self.mark_dead(r, res)

    async def wait_for_replicas(self, timeout_s: float = 120.0) -> None:
        """Until every replica is alive again (restarts done)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while len(self.alive) < len(self.replicas) or self._restarts:
            if loop.time() > deadline:
                raise TimeoutError(
                    f"{len(self.alive)}/{len(self.replicas)} replicas alive after {timeout_s} s"
                )
            await asyncio.sleep(0.1)

    # -- EnginePool ---------------------------------------------------------------------------------
    async def open_session(self) -> RolloutSession:
        for _ in range(self.max_request_retries + 1):
            r = await self._pick()
            r.load += 1  # before the await: concurrent opens must see it
            try:
                sid = await r.actor.open_session.remote()
            except _ACTOR_ERRORS as e:
                r.load -= 1
                self.mark_dead(r, e)
                continue
            except BaseException:
                r.load -= 1
                raise
            return RemoteSession(self, r, sid)
        raise EngineFailure("could not open a session on any replica")

    async def generate(self, prompt: Any, sampling: SamplingParams | None = None) -> list[Completion]:
        """One prompt (n completions); retried on another replica if its replica dies."""
        last: BaseException | None = None
        for _ in range(self.max_request_retries + 1):
            r = await self._pick()
            r.load += 1
            try:
                return await r.actor.generate.remote(prompt, sampling)
            except _ACTOR_ERRORS as e:
                self.mark_dead(r, e)
                last = e
            finally:
                r.load -= 1
        raise EngineFailure(f"request failed on {self.max_request_retries + 1} replicas") from last

    async def _each(self, method: str, *args: Any) -> list[Any]:
        replicas = self.alive
        results = await asyncio.gather(
            *(getattr(r.actor, method).remote(*args) for r in replicas), return_exceptions=True
        )
        for r, res in zip(replicas, results):
            if isinstance(res, _ACTOR_ERRORS):
                self.mark_dead(r, res)
            elif isinstance(res, BaseException):
                raise res
        return [res for res in results if not isinstance(res, BaseException)]

    async def _pause(self, mode: str) -> None:
        await self._each("pause", mode)

    async def _resume(self) -> None:
        await self._each("resume")

    async def _load(self, source: tuple[str, Any], version: int) -> None:
        kind, what = source
        if kind == "tensors":
            what = ray.put(what)  # once into the object store; kept for restarts
            await self._each("update_weights", what, version)
        else:
            await self._each("update_weights_from_disk", what, version)
        self._weights = (kind, what, version)

    async def stats(self) -> dict[str, float]:
        out = merge_stats(await self._each("stats"))
        out.update(
            num_alive=float(len(self.alive)),
            num_deaths=float(self.num_deaths),
            num_restarts=float(self.num_restarts),
        )
        return out

    def close(self) -> None:
        for t in [self._health_task, *self._restarts]:
            if t is not None:  # tasks of the loop the pool ran on, maybe another thread's
                try:
                    t.get_loop().call_soon_threadsafe(t.cancel)
                except RuntimeError:  # that loop is closed
                    pass
        for r in self.replicas:
            try:
                ray.kill(r.actor, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
            if r.placement_group is not None:
                ray.util.remove_placement_group(r.placement_group)


def _installed(dist: str) -> bool:
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution(dist)
    except PackageNotFoundError:
        return False
    return True
