"""Decode attention and rotary + KV store kernels at Llama-3-8B heads (32/8, head_dim 128, page 16), timed
the way the decode step runs them: LAYERS launches (each on its own KV cache) captured in one CUDA graph.

GPU:  python benchmarks/attention_kernels.py
Prints one JSON line (microseconds per launch, i.e. per layer); appends it to
benchmarks/results/attention_kernels-<device>.json.

decode: "fixed" is the fixed 256-token split kernel plus its merge kernel (the path before flash-decoding,
still used for large batches), "split" the flash-decoding layout (decode_num_splits splits, merged in the
same launch), "chosen" what TritonBackend runs at that batch. The page table is max_seq_len wide, as in a
CUDA-graph bucket. rotary_store: apply_rotary + store_kv (two launches) against rotary_store_kv (one).
shared_prefix: GRPO-shaped batches (groups of rows sharing a prompt's KV pages), the fixed-split decode with
and without the shared-prefix read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import record  # noqa: E402

from gyre.kernels.attention import (  # noqa: E402
    decode_num_splits,
    paged_decode_attention,
    shared_prefix_groups,
    shared_prefix_max_rows,
    store_kv,
)
from gyre.kernels.rotary import apply_rotary, rope_cos_sin_cache, rotary_store_kv  # noqa: E402

HQ, HKV, DIM, PAGE = 32, 8, 128, 16


def graph_time_us(fn, layers: int, iters: int = 20) -> float:
    """fn(layer) captured `layers` times in one CUDA graph; median replay time per fn call."""
    for layer in range(layers):
        fn(layer)  # compile, warm up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for layer in range(layers):
            fn(layer)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / layers)
    times.sort()
    return times[len(times) // 2]


def decode_case(batch: int, seq_len: int, max_seq_len: int, layers: int, num_sms: int) -> dict:
    dev, dt = "cuda", torch.bfloat16
    pages = -(-seq_len // PAGE)
    width = max(-(-max_seq_len // PAGE), pages)
    caches = [(torch.randn(batch * pages * PAGE, HKV, DIM, device=dev, dtype=dt),
               torch.randn(batch * pages * PAGE, HKV, DIM, device=dev, dtype=dt)) for _ in range(layers)]  # fmt: skip
    page_table = torch.zeros(batch, width, dtype=torch.int32, device=dev)
    page_table[:, :pages] = torch.randperm(batch * pages, device=dev).to(torch.int32).view(batch, pages)
    seq_lens = torch.full((batch,), seq_len, dtype=torch.int32, device=dev)
    q = torch.randn(batch, HQ, DIM, device=dev, dtype=dt)
    out = torch.empty_like(q)
    locks = torch.zeros(batch * HKV, dtype=torch.int32, device=dev)
    num_splits = decode_num_splits(batch, HKV, width * PAGE, num_sms)

    def fixed(layer):
        paged_decode_attention(q, *caches[layer], page_table, seq_lens, PAGE, DIM**-0.5, out=out)

    def split(layer):
        paged_decode_attention(q, *caches[layer], page_table, seq_lens, PAGE, DIM**-0.5, num_splits=num_splits,
                               locks=locks, out=out)  # fmt: skip

    res = {"fixed_us": graph_time_us(fixed, layers), "split_us": graph_time_us(split, layers),
           "num_splits": num_splits}  # fmt: skip
    res["chosen"] = "split" if batch * HKV < 2 * num_sms else "fixed"
    kv_bytes = 2 * batch * seq_len * HKV * DIM * 2
    res["split_GBs"] = kv_bytes / res["split_us"] / 1e3
    return res


def shared_prefix_case(groups: int, rows: int, prefix: int, tail: int, max_seq_len: int, layers: int) -> dict:
    """GRPO decode: `groups` prompts x `rows` samples; each group's rows share `prefix` tokens of KV pages and
    own `tail` more. Plain fixed-split decode vs the shared-prefix read (shared_prefix_groups' grouping)."""
    dev, dt = "cuda", torch.bfloat16
    batch, pre_pages, tail_pages = groups * rows, prefix // PAGE, -(-tail // PAGE)
    total = groups * pre_pages + batch * tail_pages
    width = max(-(-max_seq_len // PAGE), pre_pages + tail_pages)
    caches = [(torch.randn(total * PAGE, HKV, DIM, device=dev, dtype=dt),
               torch.randn(total * PAGE, HKV, DIM, device=dev, dtype=dt)) for _ in range(layers)]  # fmt: skip
    perm = torch.randperm(total).to(torch.int32)
    table = torch.zeros(batch, width, dtype=torch.int32)
    for b in range(batch):
        g = b // rows
        table[b, :pre_pages] = perm[g * pre_pages:(g + 1) * pre_pages]
        own = groups * pre_pages + b * tail_pages
        table[b, pre_pages:pre_pages + tail_pages] = perm[own:own + tail_pages]
    seq_list = [prefix + tail] * batch
    grouped = shared_prefix_groups(table, seq_list, PAGE, shared_prefix_max_rows(HQ // HKV))
    assert grouped is not None
    prefix_lens, group_lens = (t.to(dev) for t in grouped)
    page_table, seq_lens = table.to(dev), torch.tensor(seq_list, dtype=torch.int32, device=dev)
    q = torch.randn(batch, HQ, DIM, device=dev, dtype=dt)
    out_plain, out_shared = torch.empty_like(q), torch.empty_like(q)

    def plain(layer):
        paged_decode_attention(q, *caches[layer], page_table, seq_lens, PAGE, DIM**-0.5, out=out_plain)

    def shared(layer):
        paged_decode_attention(q, *caches[layer], page_table, seq_lens, PAGE, DIM**-0.5, out=out_shared,
                               prefix_lens=prefix_lens, group_lens=group_lens)

    res = {"plain_us": graph_time_us(plain, layers), "shared_us": graph_time_us(shared, layers)}
    res["max_abs_diff"] = (out_plain.float() - out_shared.float()).abs().max().item()
    res["speedup"] = res["plain_us"] / res["shared_us"]
    kv_read = 2 * HKV * DIM * 2 * (groups * prefix + batch * tail)  # what the shared read must load at least
    res["shared_GBs_unique_kv"] = kv_read / res["shared_us"] / 1e3
    return res


def rotary_case(batch: int, layers: int) -> dict:
    dev, dt = "cuda", torch.bfloat16
    cache = rope_cos_sin_cache(DIM, 8192, 500000.0, None, device=dev)
    qkv = torch.randn(batch, HQ + 2 * HKV, DIM, device=dev, dtype=dt)
    q, k, v = qkv.split([HQ, HKV, HKV], dim=1)
    positions = torch.randint(0, 8192, (batch,), device=dev)
    slots = torch.randperm(4 * batch, device=dev)[:batch]
    kv = [(torch.zeros(4 * batch, HKV, DIM, device=dev, dtype=dt), torch.zeros(4 * batch, HKV, DIM, device=dev,
                                                                                dtype=dt)) for _ in range(layers)]  # fmt: skip

    def unfused(layer):
        apply_rotary(q, k, positions, cache)
        store_kv(*kv[layer], k, v, slots)

    def fused(layer):
        rotary_store_kv(q, k, v, positions, cache, *kv[layer], slots)

    return {"unfused_us": graph_time_us(unfused, layers), "fused_us": graph_time_us(fused, layers)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[512, 4096])
    ap.add_argument("--max-seq-len", type=int, default=8192, help="page-table width (cuda_graph_max_seq_len)")
    ap.add_argument("--layers", type=int, default=8)
    args = ap.parse_args()
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    decode = {f"b{b}_s{s}": decode_case(b, s, args.max_seq_len, args.layers, num_sms)
              for b in args.batches for s in args.seq_lens}  # fmt: skip
    rotary = {f"b{b}": rotary_case(b, args.layers) for b in args.batches}
    shared = {f"g{g}x{r}_p{p}_t{t}": shared_prefix_case(g, r, p, t, args.max_seq_len, args.layers)
              for g, r, p, t in ((16, 16, 1024, 64), (16, 16, 1024, 128), (4, 8, 2048, 256))}  # fmt: skip
    record("attention_kernels", {"heads": [HQ, HKV, DIM], "page_size": PAGE, "max_seq_len": args.max_seq_len,
                                 "layers": args.layers, "num_sms": num_sms, "decode": decode,
                                 "rotary_store": rotary, "shared_prefix": shared})  # fmt: skip


if __name__ == "__main__":
    main()
