"""A trainer that dies or goes silent mid-broadcast: the engines fail the update within their timeout,
keep serving the old weights, and a new group can be set up."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch.multiprocessing as mp

from gyre import SamplingParams
from gyre.weight_sync import WeightSender, WeightSyncError
from tests.weight_sync.conftest import TIMEOUT_S
from tests.weight_sync.helpers import (
    PROMPTS,
    checksum,
    drop_weight_group,
    free_port,
    partial_trainer,
    trainer_tensors,
)

GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("how", ["kill", "hang"])
def test_trainer_dies_mid_broadcast(engine_procs, llama_dir, how):
    sums = [h.run(checksum) for h in engine_procs]
    versions = [h.weight_version() for h in engine_procs]
    outs = [h.generate(PROMPTS, GREEDY) for h in engine_procs]
    ctx = mp.get_context("forkserver")
    ready, port = ctx.Event(), free_port()
    trainer = ctx.Process(
        target=partial_trainer, args=(llama_dir, port, 3, how, ready, 16 << 10), daemon=True
    )
    trainer.start()
    try:
        assert ready.wait(60)
        with ThreadPoolExecutor(2) as pool:
            list(
                pool.map(
                    lambda i: engine_procs[i].init_weight_group(
                        "127.0.0.1", port, 1 + i, 3, "gloo", "gyre-weights"
                    ),
                    range(2),
                )
            )
            named = trainer_tensors(llama_dir, seed=123)
            names, dtypes, shapes = (
                [n for n, _ in named],
                ["float32"] * len(named),
                [t.shape for _, t in named],
            )
            t0 = time.monotonic()
            futures = [
                pool.submit(h.update_weights_from_group, names, dtypes, shapes, 10**6) for h in engine_procs
            ]
            for f in futures:
                with pytest.raises(WeightSyncError) as info:
                    f.result(timeout=60)
                assert "keeps weight version" in str(info.value)
                if how == "hang":  # its own timeout, or the peer rank's timeout that aborted the group first
                    assert "did not complete within" in str(info.value) or "timed out" in str(info.value)
            elapsed = time.monotonic() - t0
        # a dead peer is seen at once; a silent one after the timeout (but not much later)
        assert elapsed < (3.0 if how == "kill" else TIMEOUT_S + 3.0), elapsed
        if how == "hang":
            assert elapsed >= TIMEOUT_S - 0.5
    finally:
        trainer.kill()
        trainer.join()
    assert [h.run(checksum) for h in engine_procs] == sums
    assert [h.weight_version() for h in engine_procs] == versions
    after = [h.generate(PROMPTS, GREEDY) for h in engine_procs]
    assert [[o.output_ids for o in out] for out in after] == [[o.output_ids for o in out] for out in outs]
    with pytest.raises(RuntimeError, match="init_weight_group must be called"):
        engine_procs[0].update_weights_from_group(names, dtypes, shapes)
    # the group can be set up again, and an update goes through
    named = trainer_tensors(llama_dir, seed=11)
    with WeightSender(
        engine_procs, mode="group", backend="gloo", bucket_bytes=64 << 10, timeout_s=10
    ) as sender:
        v = sender.push(named)
    assert [h.weight_version() for h in engine_procs] == [v, v]


def test_a_failing_engine_does_not_hang_the_trainer(llama_dir):
    """An engine that cannot take part (its group is gone, or it died): the trainer's push fails at once,
    not after the timeout, names the engine, and leaves the other engine serving, unpaused, unchanged."""
    from gyre.weight_sync import EngineProcess

    engines = [EngineProcess(llama_dir, max_num_tokens=1024, weight_update_timeout_s=30) for _ in range(2)]
    alive, failing = engines
    try:
        named = trainer_tensors(llama_dir, seed=12)
        before = alive.run(checksum)
        with WeightSender(
            engines, mode="group", backend="gloo", bucket_bytes=16 << 10, timeout_s=30
        ) as sender:
            sender.init_group()
            failing.run(drop_weight_group)
            t0 = time.monotonic()
            with pytest.raises(
                WeightSyncError, match="engine 1: RuntimeError: init_weight_group must be called"
            ):
                sender.push(named, version=1)
            assert time.monotonic() - t0 < 10
            failing.kill()
            t0 = time.monotonic()
            with pytest.raises(WeightSyncError, match="engine 1: EngineProcessError"):
                sender.push(named, version=1)
            assert time.monotonic() - t0 < 10
        assert alive.weight_version() == 0 and alive.run(checksum) == before
        assert not alive.call("__getattr__", "is_paused")
        assert alive.generate(PROMPTS[:1], GREEDY)[0].weight_version == 0
    finally:
        for e in engines:
            e.close()
