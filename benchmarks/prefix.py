"""Prefix cache: prefill saved and throughput with the cache on vs off, in one run.

(a) GRPO: P prompts x n samples (default 16) with 1k-token prompts;
(b) a 10-turn agent conversation through a session (every turn re-sends the whole history);
(c) unique prompts (0% hits): the cache's overhead.
GPU:  python benchmarks/prefix.py --shape llama3-8b       CPU:  python benchmarks/prefix.py --tiny llama
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


def prompts_of(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab - 10, (n, length), generator=g).tolist()


def run_grpo(engine: Engine, prompts, n: int, out_len: int) -> dict:
    sp = SamplingParams(max_new_tokens=out_len, temperature=1.0, n=n, seed=0, ignore_eos=True)
    engine.flush_cache()
    before = engine.stats()["num_prefill_tokens"]
    with Timer() as t:
        outs = engine.generate(prompts, sp)
    tokens = sum(len(o.output_ids) for o in outs)
    return {"prefill_tokens": engine.stats()["num_prefill_tokens"] - before, "tok_s": tokens / t.seconds}


def run_agent(engine: Engine, turns: int, first_len: int, turn_len: int, out_len: int, vocab: int) -> dict:
    engine.flush_cache()
    before = engine.stats()["num_prefill_tokens"]
    chunks = prompts_of(turns, turn_len, vocab, seed=7)
    chunks[0] = prompts_of(1, first_len, vocab, seed=8)[0]
    s = engine.open_session()
    sp = SamplingParams(max_new_tokens=out_len, temperature=0.0, ignore_eos=True)
    with Timer() as t:
        for c in chunks:
            s.generate(c, sp)
    total = len(s.token_ids)
    s.close()
    return {"prefill_tokens": engine.stats()["num_prefill_tokens"] - before, "seconds": t.seconds,
            "history_tokens": total}


def main() -> None:
    ap = argparse.ArgumentParser()
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--shape")
    src.add_argument("--tiny")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--turns", type=int, default=10)
    args = ap.parse_args()
    if args.shape:
        path, load = shape_dir(args.shape), "dummy"
    else:
        from gyre.testing import tiny_model

        path, load = str(tiny_model(args.tiny, f"/tmp/gyre-bench/{args.tiny}")), "auto"
    result: dict = {"model": args.shape or f"tiny-{args.tiny}", "prompts": args.prompts, "n": args.n,
                    "prompt_len": args.prompt_len, "output_len": args.output_len}
    max_len = args.prompt_len + args.turns * (256 + args.output_len) + 512
    per = {}
    for cache in (True, False):
        engine = Engine(path, load_format=load, enable_prefix_cache=cache, max_model_len=max_len)
        vocab = engine.vocab_size
        engine.generate(prompts_of(4, 64, vocab, 9), SamplingParams(max_new_tokens=4, ignore_eos=True))  # warm up
        grpo = run_grpo(engine, prompts_of(args.prompts, args.prompt_len, vocab, 0), args.n, args.output_len)
        agent = run_agent(engine, args.turns, args.prompt_len, 64, args.output_len, vocab)
        unique = run_grpo(engine, prompts_of(args.prompts * args.n, args.prompt_len, vocab, 1), 1, args.output_len)
        per[cache] = {"grpo": grpo, "agent": agent, "unique": unique}
        engine.shutdown()
        del engine  # its weights and KV pool must be freed before the next engine sizes its pool
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    on, off = per[True], per[False]
    ideal_grpo = args.prompts * args.prompt_len  # one prefill per prompt
    result.update({
        "grpo_prefill_tokens_on": on["grpo"]["prefill_tokens"], "grpo_prefill_tokens_off": off["grpo"]["prefill_tokens"],
        "grpo_prefill_saving_vs_ideal": (off["grpo"]["prefill_tokens"] - on["grpo"]["prefill_tokens"])
        / max(off["grpo"]["prefill_tokens"] - ideal_grpo, 1),
        "grpo_throughput_ratio_on_off": on["grpo"]["tok_s"] / off["grpo"]["tok_s"],
        "agent_prefill_tokens_on": on["agent"]["prefill_tokens"], "agent_prefill_tokens_off": off["agent"]["prefill_tokens"],
        "agent_speedup_on_off": off["agent"]["seconds"] / on["agent"]["seconds"],
        "zero_hit_throughput_ratio_on_off": on["unique"]["tok_s"] / off["unique"]["tok_s"],
    })
    record("prefix", result)


if __name__ == "__main__":
    main()
