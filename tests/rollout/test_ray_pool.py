"""Engine replicas as Ray actors (a local cluster, 2 CPU engine actors): routing, an actor killed
mid-rollout, its restart with the current weights. Skipped without ray."""

from __future__ import annotations

import importlib.util
import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from gyre import Engine, SamplingParams
from gyre.rollout import RolloutConfig, RolloutManager, SingleTurnEnv

from .helpers import perturbed_weights

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs ray (pip install ray)")

GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    import gyre

    root = os.path.dirname(os.path.dirname(gyre.__file__))  # workers import gyre from this checkout
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def _wait(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_killed_engine_actor_mid_rollout(ray_cluster, qwen3_dir):
    from gyre.rollout.ray_pool import RayPool

    ray = ray_cluster
    pool = RayPool(
        qwen3_dir, num_replicas=2, num_threads=1, engine_kwargs={"page_size": 4}, health_check_interval_s=0.5
    )
    tasks = [{"prompt": f"Count to {i}.", "answer": str(i), "id": i} for i in range(8)]
    cfg = RolloutConfig(
        batch_size=4, n_samples_per_prompt=4, sampling=SamplingParams(max_new_tokens=48, ignore_eos=True)
    )
    try:
        with (
            RolloutManager(pool, lambda: SingleTurnEnv(lambda text, task: 0.0), tasks, cfg) as manager,
            ThreadPoolExecutor(1) as ex,
        ):
            manager.update_weights(perturbed_weights(qwen3_dir, 1), version=1)
            future = ex.submit(manager.get_batch, 120)
            # least-loaded routing spreads the 16 episodes' sessions over both replicas
            _wait(lambda: all(r.load >= 4 for r in pool.replicas), 60, "sessions on both replicas")
            victim = pool.replicas[0]
            _wait(lambda: ray.get(victim.actor.stats.remote())["num_generated_tokens"] > 0, 60, "generation")
            ray.kill(victim.actor)
            batch = future.result()

            # the batch is complete: every sample exactly once, whole, from the current weights
            uids = [s.uid for s in batch.samples]
            assert sorted(uids) == sorted(f"g{g}/{k}/policy" for g in range(4) for k in range(4))
            assert all(len(s.response_ids) == 48 and set(s.weight_versions) == {1} for s in batch.samples)
            assert manager.counters["episode_retries"] >= 1 and pool.num_deaths == 1

            # the dead replica is replaced, and the replacement holds the current weights
            _wait(lambda: pool.num_restarts == 1 and len(pool.alive) == 2, 90, "the restarted replica")
            assert pool.replicas[0] is not victim
            versions = ray.get([r.actor.ready.remote() for r in pool.replicas])
            outs = ray.get([r.actor.generate.remote("The weather today", GREEDY) for r in pool.replicas])
            with Engine(qwen3_dir) as ref:
                ref.update_weights(perturbed_weights(qwen3_dir, 1), version=1)
                expect = ref.generate(["The weather today"], GREEDY)[0].output_ids
            assert versions == [1, 1] and [o[0].output_ids for o in outs] == [expect, expect]

            batch2 = manager.get_batch(timeout=120)
            assert {s.group_id for s in batch2.samples} == {f"g{g}" for g in range(4, 8)}
            assert batch2.metrics["episode_retries"] == manager.counters["episode_retries"]

            # an actor that dies while idle is found by the health checks
            idle = pool.replicas[1]
            ray.kill(idle.actor)
            _wait(lambda: not idle.alive and pool.num_deaths == 2, 30, "the health check")
    finally:
        pool.close()
