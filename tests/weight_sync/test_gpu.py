"""GPU transports: colocated CUDA IPC, NCCL between two GPUs (and a trainer dying on it), memory release."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.multiprocessing as mp

from gyre import Engine, SamplingParams
from gyre.weight_sync import EngineProcess, WeightSender, WeightSyncError
from tests.weight_sync.helpers import (
    PROMPTS,
    checksum,
    cuda_allocated,
    free_port,
    partial_trainer,
    trainer_tensors,
)

pytestmark = pytest.mark.gpu
GREEDY = SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True)
two_gpus = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs"
)


def bf16(named, device):
    return [(n, t.to(device, torch.bfloat16)) for n, t in named]


def test_ipc_colocated(llama_dir, tmp_path):
    named = bf16(trainer_tensors(llama_dir, 31), "cuda:0")
    # CUDA graphs on: an in-place update must reach the captured decode graphs
    with EngineProcess(
        llama_dir, device="cuda:0", dtype="bfloat16", max_num_tokens=4096, cuda_graph_max_bs=8
    ) as engine:
        original = engine.run(checksum)
        with WeightSender([engine], mode="ipc") as sender:
            v = sender.push(named)
        via_ipc = engine.run(checksum)
        assert via_ipc != original and engine.weight_version() == v
        outs = engine.generate(PROMPTS, GREEDY)
        assert {o.weight_version for o in outs} == {v}
        with Engine(
            llama_dir, device="cuda:0", dtype="bfloat16", max_num_tokens=4096, cuda_graph=False
        ) as eager:
            eager.update_weights(named)
            assert [o.output_ids for o in eager.generate(PROMPTS, GREEDY)] == [o.output_ids for o in outs]
        with WeightSender([engine], mode="disk", disk_dir=tmp_path) as sender:
            sender.push(named)
        assert engine.run(checksum) == via_ipc  # the same bytes as through a checkpoint
        memory = []
        with WeightSender([engine], mode="ipc") as sender:
            for i in range(20):
                sender.push(named)
                if i in (4, 19):
                    memory.append(engine.run(cuda_allocated))
        assert memory[1] == memory[0], "IPC updates leak engine memory"


@two_gpus
def test_nccl_group_two_gpus(llama_dir, tmp_path):
    named = bf16(trainer_tensors(llama_dir, 32), "cuda:0")
    with EngineProcess(
        llama_dir,
        device="cuda:1",
        dtype="bfloat16",
        max_num_tokens=4096,
        weight_update_timeout_s=5,
        cuda_graph=False,
    ) as engine:
        with WeightSender(
            [engine], mode="group", backend="nccl", device="cuda:0", bucket_bytes=64 << 10, timeout_s=10
        ) as sender:
            sender.push(named)  # a list: metadata on the control path too
            via_nccl = engine.run(checksum)
            sender.push(iter(named))  # a generator: streamed
            assert engine.run(checksum) == via_nccl
            memory = []
            for i in range(20):
                sender.push(named)
                if i in (4, 19):
                    memory.append(engine.run(cuda_allocated))
            assert memory[1] == memory[0], "NCCL updates leak engine memory"
        with WeightSender([engine], mode="disk", disk_dir=tmp_path) as sender:
            sender.push(named)
        assert engine.run(checksum) == via_nccl

        # a trainer that goes silent (or dies) mid-broadcast: the engine fails within its timeout,
        # its NCCL group is aborted, it keeps serving, and a new group works
        for how in ("hang", "kill"):
            before, version = engine.run(checksum), engine.weight_version()
            ctx = mp.get_context("forkserver")
            ready, port = ctx.Event(), free_port()
            trainer = ctx.Process(
                target=partial_trainer,
                daemon=True,
                args=(llama_dir, port, 2, how, ready, 16 << 10, "nccl", "cuda:0", torch.bfloat16),
            )
            trainer.start()
            try:
                assert ready.wait(120)
                with ThreadPoolExecutor(1) as pool:
                    pool.submit(
                        engine.init_weight_group, "127.0.0.1", port, 1, 2, "nccl", "gyre-weights"
                    ).result(120)
                    t0 = time.monotonic()
                    with pytest.raises(WeightSyncError):
                        engine.update_weights_from_group([], [], [], 10**6)
                    assert time.monotonic() - t0 < 5 + 5
            finally:
                trainer.kill()
                trainer.join()
            assert engine.run(checksum) == before and engine.weight_version() == version
            assert {o.weight_version for o in engine.generate(PROMPTS, GREEDY)} == {version}
            with WeightSender(
                [engine], mode="group", backend="nccl", device="cuda:0", timeout_s=10
            ) as sender:
                sender.push(named)
            assert engine.run(checksum) == via_nccl


def _release_cycles(llama_dir: str, out) -> None:
    """In a fresh process (memory_allocated is process-wide): 20 release/resume cycles of one engine."""
    with Engine(
        llama_dir, device="cuda", dtype="bfloat16", max_num_tokens=65536, cuda_graph_max_bs=8
    ) as engine:
        before = [o.output_ids for o in engine.generate(PROMPTS, GREEDY)]
        dev = engine.runner.device
        pool, model = engine.runner.pool, engine.runner.model
        owned = sum(t.numel() * t.element_size() for t in [*pool.k_cache, *pool.v_cache])
        owned += sum(p.numel() * p.element_size() for p in model.parameters())
        torch.cuda.synchronize(dev)
        baseline = torch.cuda.memory_allocated(dev)
        freed, resumed = [], []
        for _ in range(20):
            torch.cuda.synchronize(dev)
            base = torch.cuda.memory_allocated(dev)
            engine.release_memory()
            torch.cuda.synchronize(dev)
            freed.append(base - torch.cuda.memory_allocated(dev))
            engine.resume_memory()
            torch.cuda.synchronize(dev)
            resumed.append(torch.cuda.memory_allocated(dev))
        same = [o.output_ids for o in engine.generate(PROMPTS, GREEDY)] == before
    out.put((owned, freed, resumed, same, baseline))


@pytest.fixture(scope="module")
def release_cycles(llama_dir):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_release_cycles, args=(llama_dir, q))
    proc.start()
    result = q.get(timeout=300)
    proc.join(timeout=60)
    return result


def test_release_memory_gpu(release_cycles):
    owned, freed, resumed, same, baseline = release_cycles
    assert min(freed) >= 0.95 * owned, f"release_memory freed {freed} of {owned} bytes of weights and KV"
    assert same, "outputs changed across release/resume"
    # NOTE: recaptured CUDA graphs reuse one capture stream (gyre.engine.cuda_graph.capture_stream): a new
    # stream per capture left torch's 32 MiB cuBLAS workspace behind every cycle
    assert max(resumed) - min(resumed) <= 1 << 20, f"device memory grows over cycles: {resumed}"
    # the first recapture keeps one more 32 MiB cuBLAS workspace (H200: baseline + 32 MiB, then flat): 40%
    # of this tiny model's footprint, < 0.1% of a real model's, where "within 1% of the baseline" holds
    assert resumed[0] - baseline <= 0.01 * baseline + (32 << 20), f"resumed {resumed[0]} vs baseline {baseline}"
