"""A trainer (this process) updates two engine processes: group broadcast over gloo, tensors, disk."""

from __future__ import annotations

import pytest

from gyre import SamplingParams
from gyre.weight_sync import WeightSender, WeightSyncError, write_checkpoint
from tests.weight_sync.helpers import (
    PROMPTS,
    checksum,
    hf_greedy,
    hf_model,
    live_tensors,
    rss_bytes,
    trainer_tensors,
)

GREEDY = SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True)


def sender_for(engines, mode, tmp_path, **kw) -> WeightSender:
    # 64 KiB buckets: the 384 KiB embedding is a bucket of its own, small tensors share buckets
    return WeightSender(
        engines,
        mode=mode,
        backend="gloo",
        bucket_bytes=64 << 10,
        disk_dir=tmp_path / "ckpt",
        timeout_s=10,
        **kw,
    )


@pytest.mark.parametrize("mode", ["group", "tensors", "disk"])
def test_update_matches_hf_with_the_new_weights(engine_procs, llama_dir, tmp_path, mode):
    seed = {"group": 1, "tensors": 2, "disk": 3}[mode]
    named = trainer_tensors(llama_dir, seed)
    refs = [hf_greedy(hf_model(llama_dir, named), p, GREEDY.max_new_tokens) for p in PROMPTS]
    before = [h.weight_version() for h in engine_procs]
    with sender_for(engine_procs, mode, tmp_path) as sender:
        version = sender.push(named)
    assert version == max(before) + 1
    for h in engine_procs:
        assert h.weight_version() == version
        outs = h.generate(PROMPTS, GREEDY)
        assert [o.output_ids for o in outs] == refs
        assert all(o.weight_version == version and set(o.output_weight_versions) == {version} for o in outs)
    original = hf_model(llama_dir, trainer_tensors(llama_dir, None))
    assert refs != [hf_greedy(original, p, GREEDY.max_new_tokens) for p in PROMPTS]  # the update shows


def _bad_updates(named):
    """(what the error must name, a bad update) for each kind of bad tensor."""
    q = "model.layers.1.self_attn.q_proj.weight"
    shapes = dict(named)
    return {
        "unknown name": (
            "model.layers.1.mlp.gate.weight",
            named + [("model.layers.1.mlp.gate.weight", shapes[q])],
        ),
        "wrong shape": (q, [(n, t[:, :32] if n == q else t) for n, t in named]),
        "wrong dtype": (q, [(n, t.half() if n == q else t) for n, t in named]),
    }


@pytest.mark.parametrize("mode", ["group", "tensors", "disk"])
def test_bad_updates_change_nothing(engine_procs, llama_dir, tmp_path, mode):
    named = trainer_tensors(llama_dir, seed={"group": 4, "tensors": 8, "disk": 9}[mode])
    sums = [h.run(checksum) for h in engine_procs]
    versions = [h.weight_version() for h in engine_procs]
    outs = [h.generate(PROMPTS, GREEDY) for h in engine_procs]
    with sender_for(engine_procs, mode, tmp_path) as sender:
        for what, (culprit, bad) in _bad_updates(named).items():
            with pytest.raises(WeightSyncError, match=culprit.replace(".", r"\.")) as info:
                sender.push(bad)
            assert "2/2 engines" in str(info.value), what
            assert [h.run(checksum) for h in engine_procs] == sums, what
            assert [h.weight_version() for h in engine_procs] == versions, what
            assert [h.generate(PROMPTS, GREEDY) for h in engine_procs][0][0].output_ids == outs[0][
                0
            ].output_ids
        with pytest.raises(WeightSyncError, match="must be greater than the current"):
            sender.push(named, version=max(versions))  # a reused version would let stale KV match
        assert [h.run(checksum) for h in engine_procs] == sums
        # the group (and every engine) is still usable: a good update goes through
        v = sender.push(named)
    assert [h.weight_version() for h in engine_procs] == [v, v]
    assert all(h.run(checksum) != s for h, s in zip(engine_procs, sums))
    for h in engine_procs:
        assert not h.call("__getattr__", "is_paused")


def test_truncated_checkpoint_changes_nothing(engine_procs, llama_dir, tmp_path):
    named = trainer_tensors(llama_dir, seed=5)
    path = write_checkpoint(named, tmp_path / "ckpt", max_shard_bytes=128 << 10)
    shards = sorted(path.glob("*.safetensors"))
    assert len(shards) > 2
    last = shards[-1]
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    h = engine_procs[0]
    before, version = h.run(checksum), h.weight_version()
    with pytest.raises(ValueError, match="safetensors"):
        h.update_weights_from_disk(str(path))
    assert h.run(checksum) == before and h.weight_version() == version
    assert h.generate(PROMPTS[:1], GREEDY)[0].weight_version == version


def test_twenty_updates_do_not_grow_memory(engine_procs, llama_dir, tmp_path):
    candidates = [trainer_tensors(llama_dir, seed=s) for s in (6, 7)]
    with sender_for(engine_procs, "group", tmp_path) as sender:
        samples = []
        for i in range(20):
            sender.push(candidates[i % 2])
            if i in (4, 19):
                samples.append(
                    (
                        [h.run(live_tensors) for h in engine_procs],
                        [rss_bytes(h.process.pid) for h in engine_procs],
                        live_tensors(),
                    )
                )
    (tensors_a, rss_a, mine_a), (tensors_b, rss_b, mine_b) = samples
    assert tensors_b == tensors_a, "an engine keeps tensors of past updates"
    assert mine_b == mine_a, "the sender keeps tensors of past updates"
    for a, b in zip(rss_a, rss_b):
        assert b - a < 8 << 20, f"engine RSS grew by {(b - a) / 2**20:.1f} MiB over 15 updates"
