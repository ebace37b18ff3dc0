"""Weight-sync benchmark: WeightSender.push end to end (pause -> transfer -> version -> resume) against a
plain broadcast of the same bytes over the same group, with a bucket-size sweep. Prints one JSON line
(and appends it to benchmarks/results/weight_sync-<device>.json).

    python benchmarks/weight_sync.py          # CPU: a small Llama shape, trainer -> engine process, gloo
    python benchmarks/weight_sync.py --gpu    # Llama-3.1-8B shape, bf16 dummy weights (16 GB):
                                              #   trainer cuda:0 -> engine cuda:1 over NCCL, bucket sweep
                                              #   64 MiB - 2 GiB; then colocated CUDA IPC on cuda:0
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import SHAPES, record, shape_dir  # noqa: E402
from gyre.weight_sync import EngineProcess, WeightSender  # noqa: E402

CPU_SHAPE = {
    **SHAPES["llama3-8b"],
    "vocab_size": 32000,
    "hidden_size": 768,
    "intermediate_size": 2048,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "max_position_embeddings": 4096,
    "rope_scaling": None,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}


def hf_specs(config_dir: str) -> list[tuple[str, tuple[int, ...]]]:
    """HF parameter names and shapes of the model, without allocating it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(config_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()]


def trainer_weights(specs, dtype: torch.dtype, device: str) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator(device=device).manual_seed(0)
    return [
        (n, torch.empty(s, dtype=dtype, device=device).uniform_(-0.02, 0.02, generator=g)) for n, s in specs
    ]


def receive_raw(engine, sizes: list[int]) -> None:  # runs in the engine process
    engine.weights.group.receive_raw(sizes)


def time_push(sender: WeightSender, named, reps: int) -> dict:
    sender.push(named)  # warm-up: the engine's staging memory, NCCL channels
    totals, transfers = [], []
    for _ in range(reps):
        sender.push(named)
        totals.append(sender.last_timings["total_s"])
        transfers.append(sender.last_timings["transfer_s"])
    return {
        "update_s": statistics.median(totals),
        "update_min_s": min(totals),
        "transfer_s": statistics.median(transfers),
    }


def time_raw(sender: WeightSender, engine: EngineProcess, nbytes: int, chunk: int, reps: int) -> float:
    sizes = [chunk] * (nbytes // chunk) + ([nbytes % chunk] if nbytes % chunk else [])
    times = []
    for _ in range(reps + 1):
        fut = engine.submit("__run__", receive_raw, sizes)
        times.append(sender.broadcast_raw(sizes))
        fut.result()
    return statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--buckets-mib", type=int, nargs="*", default=None)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-ipc", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    group = not (args.gpu and torch.cuda.device_count() < 2)  # one GPU: the colocated IPC part only
    if args.gpu:
        config_dir, shape, dtype, backend = shape_dir("llama3-8b"), "llama3-8b", torch.bfloat16, "nccl"
        trainer_dev, engine_dev = "cuda:0", "cuda:1"
        buckets = args.buckets_mib or [64, 128, 256, 512, 1024, 2048]
        engine_kw = dict(device=engine_dev, dtype="bfloat16", cuda_graph=False)
    else:
        config_dir = tempfile.mkdtemp(prefix="gyre-ws-")
        Path(config_dir, "config.json").write_text(json.dumps(CPU_SHAPE))
        shape, dtype, backend, trainer_dev, engine_dev = "llama-small", torch.float32, "gloo", "cpu", "cpu"
        buckets = args.buckets_mib or [16, 64, 256]
        engine_kw = dict(device="cpu", dtype="float32")
    engine_kw.update(load_format="dummy", max_num_tokens=8192, weight_update_timeout_s=300)

    named = trainer_weights(hf_specs(config_dir), dtype, trainer_dev)
    nbytes = sum(t.numel() * t.element_size() for _, t in named)
    result: dict = {
        "shape": shape,
        "dtype": str(dtype).removeprefix("torch."),
        "bytes": nbytes,
        "num_tensors": len(named),
        "backend": backend,
        "trainer": trainer_dev,
        "engine": engine_dev,
    }
    if group:
        result.update(
            bench_group(config_dir, engine_kw, named, nbytes, backend, trainer_dev, buckets, args.reps)
        )
        result["target_update_s"] = 0.3 if args.gpu else None
    if args.gpu and not args.skip_ipc:  # colocated: engine and trainer share cuda:0
        with EngineProcess(config_dir, **{**engine_kw, "device": trainer_dev}) as engine:
            with WeightSender([engine], mode="ipc") as sender:
                r = time_push(sender, named, args.reps)
        result.update(
            {"ipc_update_s": r["update_s"], "ipc_GBps": nbytes / r["update_s"] / 1e9, "target_ipc_s": 0.1}
        )
    record("weight_sync", result)


def bench_group(config_dir, engine_kw, named, nbytes, backend, trainer_dev, buckets, reps) -> dict:
    with EngineProcess(config_dir, **engine_kw) as engine:
        sender = WeightSender([engine], mode="group", backend=backend, device=trainer_dev, timeout_s=300)
        sweep = []
        for mib in buckets:
            sender.bucket_bytes = mib << 20
            r = time_push(sender, named, reps)
            sweep.append({"bucket_mib": mib, **r, "GBps": nbytes / r["update_s"] / 1e9})
        best = min(sweep, key=lambda r: r["update_s"])
        raw_s = time_raw(sender, engine, nbytes, 1 << 30, reps)
        sender.push(iter(named))  # a generator (FSDP/Megatron adapters): streamed, no control metadata
        streamed_s = sender.last_timings["total_s"]
        sender.close()
    return {
        "sweep": sweep,
        "best_bucket_mib": best["bucket_mib"],
        "update_s": best["update_s"],
        "update_GBps": nbytes / best["update_s"] / 1e9,
        "streamed_update_s": streamed_s,
        f"{backend}_broadcast_s": raw_s,
        f"{backend}_broadcast_GBps": nbytes / raw_s / 1e9,
        "fraction_of_broadcast": raw_s / best["update_s"],
    }


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"# {time.time() - t0:.0f} s", file=sys.stderr)
