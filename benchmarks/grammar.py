"""Grammar overhead: time per output token with a JSON schema over without, at batch 1 and batch 128.

GPU:  python benchmarks/grammar.py --shape llama3-8b            (dummy bf16 weights, vocabulary 128256)
CPU:  python benchmarks/grammar.py --tiny qwen3 --new-tokens 32  (tiny model and its tokenizer)
Prints one JSON line; appends it to benchmarks/results/grammar-<device>.json.

Dummy weights come without a tokenizer, so xgrammar gets a synthetic byte-level vocabulary of the real
size (`synthetic_vocab`): the 256 bytes, numbers up to 999, whitespace runs, JSON punctuation, then
pseudo-random words (letter frequencies of English, 60% with a leading space), punctuation clusters and
CJK pieces; the last 256 ids are special, like Llama 3's reserved tokens (id 128001 is the eos). Masks
cost what they cost on such a vocabulary; a real tokenizer's differ in detail.

Random weights pick any allowed token, so the schema (an array of at least 1000 records) cannot complete
within --new-tokens: both runs produce exactly new_tokens per request, and the ratio compares equal work.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Timer, record, shape_dir  # noqa: E402

import gyre.engine.scheduler as scheduler_module  # noqa: E402
from gyre import Engine, SamplingParams  # noqa: E402

RECORD = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 100000},
        "name": {"type": "string"},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "score": {"type": "number"},
        "active": {"type": "boolean"},
        "parent": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
    },
    "required": ["id", "name", "tags", "score", "active", "parent"],
}
SCHEMA = {
    "type": "object",
    "properties": {"records": {"type": "array", "items": RECORD, "minItems": 1000}},
    "required": ["records"],
}


def synthetic_vocab(vocab_size: int, num_special: int = 256, seed: int = 0) -> list[bytes]:
    """A byte-level vocabulary of vocab_size tokens (see the module docstring); specials are b""."""
    rng = random.Random(seed)
    size = vocab_size - num_special
    tokens = [bytes([b]) for b in range(256)]
    seen = set(tokens)

    def add(s: str) -> None:
        b = s.encode()
        if b not in seen and len(tokens) < size:
            seen.add(b)
            tokens.append(b)

    for i in range(1000):
        add(str(i))
        add(" " + str(i))
    for k in range(1, 17):
        add(" " * k)
        add("\n" + " " * k)
        add("\t" * min(k, 4))
    for s in (
        "\n\n",
        "\r\n",
        ",\n",
        "{\n",
        "}\n",
        "[\n",
        "]\n",
        '":',
        '": ',
        '",',
        '", "',
        '"}',
        '"]',
        "},",
        "],",
        "{}",
        "[]",
        "null",
        "true",
        "false",
    ):
        add(s)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    weights = [
        12,
        9,
        8,
        7.5,
        7,
        6.7,
        6.3,
        6,
        6,
        4.3,
        4,
        2.8,
        2.8,
        2.4,
        2.4,
        2,
        2,
        2,
        1.5,
        1,
        0.8,
        0.2,
        0.2,
        0.1,
        0.1,
        0.1,
    ]
    punct = list("{}[]():;,.\"'=<>/\\-_+*&|!?#@$%^~`")
    while len(tokens) < size:
        r = rng.random()
        if r < 0.70:
            word = "".join(rng.choices(letters, weights, k=rng.randint(2, 9)))
            add((" " if rng.random() < 0.6 else "") + (word.capitalize() if rng.random() < 0.2 else word))
        elif r < 0.85:
            add("".join(rng.choices(punct, k=rng.randint(1, 3))) + rng.choice(["", "", " ", "\n"]))
        else:
            add("".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(rng.randint(1, 2))))
    return tokens + [b""] * num_special


def timed(engine: Engine, prompts: list[list[int]], sp: SamplingParams) -> tuple[float, int, int]:
    """(seconds, output tokens, steps) of one generate call, prefix cache flushed first."""
    engine.flush_cache()
    steps = engine.stats()["num_steps"]
    with Timer() as t:
        outs = engine.generate(prompts, sp)
    assert all(len(o.output_ids) == sp.max_new_tokens for o in outs), [o.finish_reason for o in outs]
    return t.seconds, sum(len(o.output_ids) for o in outs), engine.stats()["num_steps"] - steps


def main() -> None:
    ap = argparse.ArgumentParser()
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--shape", help="a named shape in benchmarks/common.py (dummy weights)")
    src.add_argument("--tiny", help="a gyre.testing architecture (CPU)")
    ap.add_argument("--batches", default="1,128")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each; the fastest counts")
    args = ap.parse_args()

    if args.shape:
        path, load = shape_dir(args.shape), "dummy"
    else:
        from gyre.testing import tiny_model

        path, load = str(tiny_model(args.tiny, f"/tmp/gyre-bench/{args.tiny}")), "auto"
    engine = Engine(path, load_format=load, max_model_len=args.prompt_len + args.new_tokens + 8)
    result: dict = {
        "model": args.shape or f"tiny-{args.tiny}",
        "vocab_size": engine.vocab_size,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
    }
    if engine.tokenizer is None:
        import xgrammar

        start = time.perf_counter()
        vocab = synthetic_vocab(engine.vocab_size)
        engine.grammar.tokenizer_info = xgrammar.TokenizerInfo(
            vocab,
            xgrammar.VocabType.RAW,
            vocab_size=engine.vocab_size,
            stop_token_ids=sorted(engine.tokens.eos_ids),
        )
        result["tokenizer"] = "synthetic byte-level"
        result["tokenizer_info_s"] = time.perf_counter() - start
    else:
        result["tokenizer"] = "model's"
    start = time.perf_counter()
    engine.grammar.compile(SamplingParams(json_schema=SCHEMA))
    result["compile_s"] = time.perf_counter() - start

    # host time of the grammar work (bitmask fill, matchers' advance), timed by wrapping the two calls
    host = {"fill": 0.0, "accept": 0.0}

    def timed_call(name, fn):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                host[name] += time.perf_counter() - start

        return wrapper

    engine.grammar.fill_bitmask = timed_call("fill", engine.grammar.fill_bitmask)
    scheduler_module.accept_tokens = timed_call("accept", scheduler_module.accept_tokens)

    g = torch.Generator().manual_seed(0)
    for bs in (int(b) for b in args.batches.split(",")):
        prompts = torch.randint(
            10, min(engine.vocab_size, 100000) - 10, (bs, args.prompt_len), generator=g
        ).tolist()
        free = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, seed=1, ignore_eos=True)
        json_sp = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, seed=1, json_schema=SCHEMA)
        warm = SamplingParams(max_new_tokens=8, json_schema=SCHEMA)
        engine.generate(prompts, warm)  # CUDA graphs, kernels, pinned buffers
        runs: dict[str, list] = {"free": [], "json": []}
        json_steps = 0
        host.update(fill=0.0, accept=0.0)
        for _ in range(args.repeats):  # interleaved, so drifts (clocks, other load) hit both alike
            runs["free"].append(timed(engine, prompts, free))
            runs["json"].append(timed(engine, prompts, json_sp))
            json_steps += runs["json"][-1][2]
        row = {}
        for name, rs in runs.items():
            seconds, tokens, steps = min(rs)
            row[f"{name}_ms_per_token"] = 1e3 * seconds / tokens
            row[f"{name}_ms_per_step"] = 1e3 * seconds / steps
        row["ratio"] = row["json_ms_per_token"] / row["free_ms_per_token"]
        row["fill_ms_per_step"] = 1e3 * host["fill"] / json_steps
        row["accept_ms_per_step"] = 1e3 * host["accept"] / json_steps
        result[f"batch_{bs}"] = row
        print(f"batch {bs}: {row}", file=sys.stderr, flush=True)
    from gyre.engine import grammar

    result["bitmask_kernel"] = (
        "xgrammar" if grammar._use_xgr_kernel and engine.runner.device.type == "cuda" else "torch"
    )
    engine.shutdown()
    record("grammar", result)


if __name__ == "__main__":
    main()
