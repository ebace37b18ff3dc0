"""MoE serving on 2 or 4 GPUs: expert parallelism vs tensor parallelism on the same GPUs (Qwen3-30B-A3B
shape, dummy bf16 weights), and the all-to-all of EP dispatch against a plain NCCL all_to_all_single.

    python benchmarks/moe.py --gpus 2            # (or 4); one JSON line -> benchmarks/results/moe-<device>.json

Engines (one after the other, on the same GPUs):
  tp           TP over all GPUs: attention heads, dense and expert intermediate dims split
  ep           EP over all GPUs: attention replicated, whole experts per GPU, combine = one all-reduce
  ep-alltoall  EP with token-shard all-to-all dispatch and combine (no CUDA graphs: host sync per layer)
prefill tok/s: P prompts x L tokens, one new token; decode tok/s: B requests x G new tokens, decode time
= t(G new) - t(1 new) on the same prompts (prefix cache off).

All-to-all (W fresh processes, one MoE layer of the shape, routing from random logits, T tokens): our
dispatch and combine (FusedMoE.dispatch / .combine, incl. the count exchange and host sync) against
all_to_all_single with even splits of the same bytes per rank; GB/s = bytes sent to other ranks per rank
/ time (the slowest rank's median). And the MoE layer's latency with allreduce vs alltoall dispatch.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Timer, record, shape_dir  # noqa: E402

from gyre import Engine, SamplingParams  # noqa: E402

MODES = {
    "tp": lambda w: {"tp_size": w},
    "ep": lambda w: {"ep_size": w},
    "ep-alltoall": lambda w: {"ep_size": w, "ep_dispatch": "alltoall"},
}


def prompts_of(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab - 10, (n, length), generator=g).tolist()


def engine_run(path: str, mode: str, gpus: int, args) -> dict:
    start = time.perf_counter()
    eng = Engine(
        path,
        load_format="dummy",
        max_model_len=4096,
        enable_prefix_cache=False,
        max_running_requests=args.decode_batch,
        cuda_graph_max_bs=args.decode_batch,
        **MODES[mode](gpus),
    )
    out: dict = {"start_s": time.perf_counter() - start}
    try:
        vocab = eng.vocab_size
        eng.generate(
            prompts_of(8, 64, vocab, 0), SamplingParams(max_new_tokens=8, ignore_eos=True)
        )  # warm up
        pre = prompts_of(args.prefill_prompts, args.prefill_len, vocab, 1)
        eng.generate(pre, SamplingParams(max_new_tokens=1, ignore_eos=True))  # kernels for these shapes
        with Timer() as t:
            eng.generate(pre, SamplingParams(max_new_tokens=1, ignore_eos=True))
        out["prefill_tok_s"] = len(pre) * args.prefill_len / t.seconds
        dec = prompts_of(args.decode_batch, args.decode_prompt_len, vocab, 2)
        with Timer() as t1:
            eng.generate(dec, SamplingParams(max_new_tokens=1, ignore_eos=True))
        with Timer() as tg:
            eng.generate(
                dec, SamplingParams(max_new_tokens=args.decode_len, ignore_eos=True, temperature=0.0)
            )
        out["decode_tok_s"] = len(dec) * (args.decode_len - 1) / max(tg.seconds - t1.seconds, 1e-9)
        out["decode_step_ms"] = 1e3 * (tg.seconds - t1.seconds) / (args.decode_len - 1)
    finally:
        eng.shutdown()
        del eng
        gc.collect()  # the next engine needs this one's GPU memory (reference cycles hold it)
        torch.cuda.empty_cache()
    return out


# -- all-to-all microbenchmark (one process per GPU) -------------------------------------------------------
def _timed(fn, group, iters: int) -> float:
    """The slowest rank's median time of fn() (seconds), each run started together."""
    from gyre.engine.parallel import all_reduce

    times = []
    for i in range(iters + 3):
        all_reduce(torch.zeros(1, device="cuda"), group)
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - t)
    worst = torch.tensor([statistics.median(times)], device="cuda")
    import torch.distributed as dist

    opts = dist.AllreduceOptions()
    opts.reduceOp = dist.ReduceOp.MAX
    group.allreduce([worst], opts).wait()
    return worst.item()


def _a2a_rank(rank: int, world: int, port: int, out_path: str, shape: dict, tokens: list[int]) -> None:
    from gyre.engine.layers.moe import FusedMoE
    from gyre.engine.parallel import init_groups, make_store, rank_state, set_parallel_state

    torch.cuda.set_device(rank)
    dev = torch.device(f"cuda:{rank}")
    state = rank_state(rank, 1, world, 0, "alltoall")
    init_groups(state, make_store(port, rank, world, 120.0), dev)
    set_parallel_state(state)
    group = state.world_group
    hidden, experts, k, inter = (
        shape["hidden_size"],
        shape["num_experts"],
        shape["num_experts_per_tok"],
        shape["moe_intermediate_size"],
    )
    with torch.device(dev):
        layer = FusedMoE(experts, k, hidden, inter, True, rank, world, torch.bfloat16)
    torch.manual_seed(rank)
    layer.w13.data.normal_(std=0.02)
    layer.w2.data.normal_(std=0.02)
    with torch.inference_mode():
        results = {str(n): _bench_tokens(layer, group, n, rank, world, dev) for n in tokens}
    if rank == 0:
        Path(out_path).write_text(json.dumps(results))


def _bench_tokens(layer, group, n: int, rank: int, world: int, dev: torch.device) -> dict:
    import torch.distributed as dist

    from gyre.engine.layers.moe import route

    hidden, experts, k = layer.hidden_size, layer.num_experts, layer.top_k
    g = torch.Generator(device=dev).manual_seed(n)  # the same tokens on every rank (replicated)
    x = torch.randn(n, hidden, generator=g, device=dev, dtype=torch.bfloat16)
    weights, ids = route(torch.randn(n, experts, generator=g, device=dev), k, True)
    d = layer.dispatch(x, weights, ids)
    y = layer.expert_rows(d.rows, d.local_ids)
    t_dispatch = _timed(lambda: layer.dispatch(x, weights, ids), group, 20)
    t_combine = _timed(lambda: layer.combine(y, d), group, 20)
    sent = torch.tensor(
        [sum(c for r, c in enumerate(d.send_counts) if r != rank), sum(d.send_counts)],
        device=dev,
        dtype=torch.float64,
    )
    group.allreduce([sent]).wait()
    to_others, total_rows = (sent / world).tolist()  # per rank, averaged over ranks
    nbytes = to_others * hidden * 2
    per_peer = int(total_rows) // world * hidden  # even splits of the same bytes per rank
    buf = torch.randn(per_peer * world, device=dev).to(torch.bfloat16)
    out = torch.empty_like(buf)
    t_plain = _timed(lambda: group.alltoall_base(out, buf, [], [], dist.AllToAllOptions()).wait(), group, 20)
    layer.dispatch_mode = "allreduce"
    t_layer_ar = _timed(lambda: layer(x, weights, ids), group, 20)
    layer.dispatch_mode = "alltoall"
    t_layer_a2a = _timed(lambda: layer(x, weights, ids), group, 20)
    return {
        "dispatch_ms": t_dispatch * 1e3,
        "combine_ms": t_combine * 1e3,
        "dispatch_GBs": nbytes / t_dispatch / 1e9,
        "combine_GBs": nbytes / t_combine / 1e9,
        "plain_all_to_all_ms": t_plain * 1e3,
        "plain_all_to_all_GBs": per_peer * (world - 1) * 2 / t_plain / 1e9,
        "bytes_to_other_ranks": nbytes,
        "layer_allreduce_ms": t_layer_ar * 1e3,
        "layer_alltoall_ms": t_layer_a2a * 1e3,
    }


def alltoall_bench(world: int, shape: dict, tokens: list[int]) -> dict:
    import torch.multiprocessing as mp

    from gyre.engine.parallel import free_port

    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        mp.start_processes(
            _a2a_rank, args=(world, free_port(), f.name, shape, tokens), nprocs=world, start_method="spawn"
        )
        return json.loads(Path(f.name).read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--shape", default="qwen3-30b-a3b")
    ap.add_argument("--modes", default="tp,ep,ep-alltoall")
    ap.add_argument("--prefill-prompts", type=int, default=16)
    ap.add_argument("--prefill-len", type=int, default=2048)
    ap.add_argument("--decode-batch", type=int, default=256)
    ap.add_argument("--decode-prompt-len", type=int, default=128)
    ap.add_argument("--decode-len", type=int, default=64)
    ap.add_argument("--a2a-tokens", default="256,4096")
    args = ap.parse_args()
    if torch.cuda.device_count() < args.gpus:
        sys.exit(f"needs {args.gpus} GPUs, found {torch.cuda.device_count()}")
    path = shape_dir(args.shape)
    shape = json.loads((Path(path) / "config.json").read_text())
    began = time.perf_counter()
    result: dict = {
        "model": args.shape,
        "gpus": args.gpus,
        "dtype": "bfloat16",
        "prefill": f"{args.prefill_prompts}x{args.prefill_len}",
        "decode": f"{args.decode_batch}x{args.decode_len} new after {args.decode_prompt_len}",
    }
    for mode in args.modes.split(","):
        result[mode] = engine_run(path, mode, args.gpus, args)
        print(mode, result[mode], file=sys.stderr, flush=True)
    if "tp" in result and "ep" in result:
        result["ep_vs_tp_decode"] = result["ep"]["decode_tok_s"] / result["tp"]["decode_tok_s"]
        result["ep_vs_tp_prefill"] = result["ep"]["prefill_tok_s"] / result["tp"]["prefill_tok_s"]
    result["all_to_all"] = alltoall_bench(args.gpus, shape, [int(t) for t in args.a2a_tokens.split(",")])
    result["wall_s"] = time.perf_counter() - began
    record("moe", result)


if __name__ == "__main__":
    main()
