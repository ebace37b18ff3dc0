"""Deterministic (batch-invariant) mode: its throughput over the default mode on an offline workload, and
the train-inference mismatch each mode leaves against the training forward.

GPU:  python benchmarks/deterministic.py --shape llama3-8b        (dummy bf16 weights)
CPU:  python benchmarks/deterministic.py --tiny llama --num-prompts 32 --prompt-len 64 --output-len 16
Prints one JSON line; appends it to benchmarks/results/deterministic-<device>.json.

mismatch_default: mean |engine logprob - training-forward logprob| over the sampled tokens, engine in
its default mode (cuBLAS, split-KV decode vs flash prefill); mismatch_deterministic: the same with
deterministic=True, which should be exactly 0. The training forward runs on the deterministic engine's
own model (gyre.trainers.training_forward.token_logprobs; no second copy of the weights).
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Timer, record, shape_dir  # noqa: E402

from gyre import Engine, SamplingParams  # noqa: E402
from gyre.trainers.training_forward import sequence_logprobs  # noqa: E402


def offline(engine: Engine, prompts: list[list[int]], sp: SamplingParams) -> tuple[float, list]:
    engine.generate(
        prompts[:8], SamplingParams(max_new_tokens=4, ignore_eos=True)
    )  # warm up (Triton compiles)
    engine.flush_cache()
    with Timer() as t:
        outs = engine.generate(prompts, sp)
    return sum(len(o.output_ids) for o in outs) / t.seconds, outs


@torch.no_grad()
def mismatch(model, outs, temperature: float, batch: int) -> tuple[float, float, float]:
    """(mean |diff|, max |diff|, seconds) of the training forward's logprobs vs the engine's."""
    diffs = []
    with Timer() as t:
        for i in range(0, len(outs), batch):
            chunk = outs[i : i + batch]
            lps = sequence_logprobs(model, [o.prompt_ids + o.output_ids for o in chunk], temperature)
            for o, lp in zip(chunk, lps):
                ours = lp[len(o.prompt_ids) - 1 :].double().cpu()
                diffs.append((ours - torch.tensor(o.output_logprobs, dtype=torch.float64)).abs())
    d = torch.cat(diffs)
    return d.mean().item(), d.max().item(), t.seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--shape", help="a named shape in benchmarks/common.py (dummy weights)")
    src.add_argument("--tiny", help="a gyre.testing architecture")
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument(
        "--mismatch-seqs", type=int, default=64, help="sequences recomputed by the training forward"
    )
    ap.add_argument("--train-batch", type=int, default=8, help="sequences per training forward")
    ap.add_argument("--engine", action="append", default=[], help="FIELD=VALUE EngineConfig overrides")
    args = ap.parse_args()

    if args.shape:
        path, load = shape_dir(args.shape), "dummy"
    else:
        from gyre.testing import tiny_model

        path, load = str(tiny_model(args.tiny, f"/tmp/gyre-bench/{args.tiny}")), "auto"
    overrides = {k: int(v) if v.isdigit() else v for k, _, v in (kv.partition("=") for kv in args.engine)}
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(path).vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(10, vocab - 10, (args.num_prompts, args.prompt_len), generator=g).tolist()
    sp = SamplingParams(max_new_tokens=args.output_len, temperature=args.temperature, seed=0, ignore_eos=True)
    max_len = args.prompt_len + args.output_len + 8
    result: dict = {
        "model": args.shape or f"tiny-{args.tiny}",
        "num_prompts": args.num_prompts,
        "prompt_len": args.prompt_len,
        "output_len": args.output_len,
        "temperature": args.temperature,
    }

    runs = {}
    for det in (False, True):
        engine = Engine(path, load_format=load, max_model_len=max_len, deterministic=det, **overrides)
        tok_s, outs = offline(engine, prompts, sp)
        name = "deterministic" if det else "default"
        result[f"{name}_tok_s"] = tok_s
        runs[name] = outs[: args.mismatch_seqs]
        if det:
            model = engine.runner.model  # already batch-invariant: the training forward's own ops
            for which, o in runs.items():
                mean, worst, seconds = mismatch(model, o, args.temperature, args.train_batch)
                result[f"mismatch_{which}"] = mean
                result[f"mismatch_{which}_max"] = worst
            tokens = sum(len(o.prompt_ids) + len(o.output_ids) for o in runs["deterministic"])
            result["training_forward_tok_s"] = tokens / seconds
        engine.shutdown()
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    result["throughput_ratio"] = result["deterministic_tok_s"] / result["default_tok_s"]
    result["same_tokens_as_default"] = sum(
        a.output_ids == b.output_ids for a, b in zip(runs["default"], runs["deterministic"])
    ) / len(runs["default"])
    record("deterministic", result)


if __name__ == "__main__":
    main()
