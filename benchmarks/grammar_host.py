"""Host cost of grammar-constrained decoding per step, on the CPU: no model, no device.

    python benchmarks/grammar_host.py                            # batch 1 and 128, 100 steps
    python benchmarks/grammar_host.py --batches 128 --threads 2  # xgrammar fill threads
    python benchmarks/grammar_host.py --tokens uniform           # any allowed token, uniformly

Per step, for B requests constrained by one JSON schema over a 128256-token vocabulary (Llama 3's size):
`fill` (GrammarBackend.fill_bitmask: every matcher's next-token bitmask), `apply` (apply_token_mask on
[B, 128256] float32 CPU logits, a proxy for the device kernel) and `accept` (grammar.accept_tokens of
the step's tokens, as Scheduler.resolve calls it). fill + accept is the host work of a step that must
hide under the device's forward.

Tokens: `documents` (default) feeds each request a random valid JSON document of the schema, tokenized,
then the eos: the states a model's output walks through (keys, numbers, enums, words in strings,
whitespace); every token is checked against the mask first. `uniform` draws any token the mask allows:
nearly every draw lands inside a string and stays there. Requests start at random points of their
documents; one whose grammar terminates is replaced by a fresh one, so every step has B constrained rows.

The tokenizer is a real HF fast tokenizer: a byte-level BPE trained here (about 30 s, cached in --cache)
on generated text to 128000 tokens, plus 256 special tokens as Llama 3 has (128001 is the eos).
--max-length N bounds the schema's free strings: xgrammar 0.2 fills such states in milliseconds per
request (mlc-ai/xgrammar#852), which no batching hides. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gyre.engine.grammar import GrammarBackend, accept_tokens, apply_token_mask  # noqa: E402
from gyre.engine.request import Request, SamplingParams, Status  # noqa: E402

VOCAB_SIZE, BPE_SIZE, EOS = 128256, 128000, 128001
COLORS, STATUSES, COUNTRIES = (
    ["red", "green", "blue", "urgent", "later"],
    ["active", "inactive", "banned"],
    ["FR", "NO", "PE", "US"],
)

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 1000000},
        "user": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "email": {"type": "string", "pattern": "[a-z0-9.]{1,16}@[a-z]{2,10}\\.(com|org|net)"},
                "age": {"type": "integer", "minimum": 0, "maximum": 120},
            },
            "required": ["name", "email", "age"],
        },
        "tags": {"type": "array", "items": {"enum": COLORS}, "maxItems": 4},
        "scores": {"type": "array", "items": {"type": "number"}, "maxItems": 5},
        "status": {"enum": STATUSES},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string"},
                "zip": {"type": "string", "pattern": "[0-9]{5}"},
                "country": {"type": "string", "enum": COUNTRIES},
            },
            "required": ["street", "zip", "country"],
        },
        "parent": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
        "notes": {"type": "string"},
    },
    "required": ["id", "user", "tags", "scores", "status", "address", "parent", "notes"],
}


def schema(max_length: int | None) -> dict:
    """SCHEMA, its free strings (name, street, notes) bounded to max_length characters when given."""
    s = copy.deepcopy(SCHEMA)
    if max_length is not None:
        for field in (
            s["properties"]["user"]["properties"]["name"],
            s["properties"]["address"]["properties"]["street"],
            s["properties"]["notes"],
        ):
            field["maxLength"] = max_length
    return s


class Words:
    """Pseudo-English words built from syllables (the tokenizer's corpus and the documents' text)."""

    ONSETS = [
        "",
        "b",
        "c",
        "d",
        "f",
        "g",
        "h",
        "j",
        "k",
        "l",
        "m",
        "n",
        "p",
        "r",
        "s",
        "t",
        "v",
        "w",
        "z",
        "bl",
        "br",
        "ch",
        "cl",
        "cr",
        "dr",
        "fl",
        "fr",
        "gr",
        "pl",
        "pr",
        "sh",
        "sl",
        "st",
        "str",
        "th",
        "tr",
        "qu",
    ]
    NUCLEI = ["a", "e", "i", "o", "u", "ai", "ea", "ee", "ie", "oo", "ou", "y"]
    CODAS = ["", "", "n", "r", "s", "t", "l", "m", "nd", "ng", "nt", "rs", "st", "ck", "x"]

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def word(self) -> str:
        r = self.rng
        return "".join(
            r.choice(self.ONSETS) + r.choice(self.NUCLEI) + r.choice(self.CODAS)
            for _ in range(r.choice((1, 2, 2, 3, 3, 4)))
        )

    def text(self, lo: int, hi: int, max_length: int | None = None) -> str:
        s = " ".join(self.word() for _ in range(self.rng.randint(lo, hi)))
        return s if max_length is None else s[:max_length]


def _corpus(seed: int = 0, num_words: int = 200_000):
    """Words, JSON lines (compact and indented) and CJK runs: enough distinct pairs for 128k merges."""
    rng = random.Random(seed)
    words = Words(rng)
    vocab: set[str] = set()
    while len(vocab) < num_words:
        vocab.add(words.word())
    order = sorted(vocab)
    rng.shuffle(order)
    for i in range(0, len(order), 12):
        w = order[i : i + 12]
        for _ in range(3):
            yield " ".join(x.capitalize() if rng.random() < 0.2 else x for x in w) + rng.choice(".,!?;:")
            obj = {w[0]: w[1], w[2]: rng.randint(0, 99999), w[3]: [w[4], w[5]], "ok": rng.random() < 0.5}
            yield json.dumps(obj, indent=rng.choice((None, None, 2, 4)))
            yield "".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(rng.randint(2, 8)))


def build_tokenizer(cache: Path):
    """A PreTrainedTokenizerFast of VOCAB_SIZE tokens: the trained BPE, then the special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    path = cache / f"bpe-{BPE_SIZE}-v2.json"
    if not path.exists():
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=BPE_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        )
        tok.train_from_iterator(_corpus(), trainer)
        assert tok.get_vocab_size() == BPE_SIZE, tok.get_vocab_size()
        specials = ["<|begin_of_text|>", "<|end_of_text|>"]
        specials += [f"<|reserved_special_token_{i}|>" for i in range(VOCAB_SIZE - BPE_SIZE - 2)]
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
        cache.mkdir(parents=True, exist_ok=True)
        tok.save(str(path))
    tok = PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token="<|end_of_text|>")
    assert len(tok) == VOCAB_SIZE and tok.eos_token_id == EOS, (len(tok), tok.eos_token_id)
    return tok


def document(rng: random.Random, max_length: int | None) -> str:
    """A random JSON document valid for schema(max_length), laid out as a model might write it."""
    words, r = Words(rng), rng
    local = "".join(r.choice("abcdefghijklmnopqrstuvwxyz0123456789.") for _ in range(r.randint(1, 16)))
    doc = {
        "id": r.randint(0, 1000000),
        "user": {
            "name": words.text(1, 3, max_length).title(),
            "email": f"{local}@{''.join(r.choice('abcdefghijklmnopqrstuvwxyz') for _ in range(r.randint(2, 10)))}"
            f".{r.choice(['com', 'org', 'net'])}",
            "age": r.randint(0, 120),
        },
        "tags": r.sample(COLORS, r.randint(0, 4)),
        "scores": [
            r.choice((r.randint(-100, 100), round(r.uniform(-100, 100), r.randint(1, 4))))
            for _ in range(r.randint(0, 5))
        ],
        "status": r.choice(STATUSES),
        "address": {
            "street": f"{r.randint(1, 999)} {words.text(1, 3).title()}"[:max_length],
            "zip": f"{r.randint(0, 99999):05d}",
            "country": r.choice(COUNTRIES),
        },
        "parent": r.choice((None, r.randint(0, 10**6))),
        "notes": words.text(3, 30, max_length),
    }
    return json.dumps(doc, indent=r.choice((None, None, 2, 4)))


def allowed_tokens(bitmask: np.ndarray, vocab_size: int) -> list[np.ndarray]:
    """bitmask [B, W] int32 -> per row, the ids it allows."""
    bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, :vocab_size]
    return [np.flatnonzero(row) for row in bits]


def is_allowed(bitmask: np.ndarray, row: int, token: int) -> bool:
    return bool((int(bitmask[row, token // 32]) >> (token % 32)) & 1)


def run(
    backend: GrammarBackend,
    tok,
    sch: dict,
    max_length: int | None,
    batch: int,
    steps: int,
    warmup: int,
    mode: str,
    seed: int,
) -> dict:
    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    sp = SamplingParams(json_schema=sch, max_new_tokens=4096)
    compiled = backend.compile(sp)
    num_started = 0

    def fresh(start_anywhere: bool) -> tuple[Request, list[int]]:
        """A running constrained request, and the tokens it is still to be fed (documents mode)."""
        nonlocal num_started
        req = Request(f"req-{num_started}", [1, 2, 3], sp, num_started, num_started)
        num_started += 1
        req.status = Status.RUNNING
        req.grammar = backend.new_state(compiled, sp)
        if mode == "uniform":
            return req, []
        ids = tok.encode(document(rng, max_length), add_special_tokens=False) + [EOS]
        # requests at different points of their output
        skip = rng.randrange(len(ids)) if start_anywhere else 0
        if not all([req.grammar.accept(t) for t in ids[:skip]]):
            raise AssertionError("the grammar rejects a valid document")
        return req, ids[skip:][::-1]  # reversed: pop() gives the next token

    rows = [fresh(start_anywhere=True) for _ in range(batch)]
    base = torch.randn(batch, backend.vocab_size, generator=torch.Generator().manual_seed(seed))
    logits = torch.empty_like(base)
    times: dict[str, list[float]] = {"fill": [], "apply": [], "accept": []}
    num_allowed = []
    for step in range(warmup + steps):
        reqs = [r for r, _ in rows]
        t0 = time.perf_counter()
        bitmask = backend.fill_bitmask(reqs)
        t1 = time.perf_counter()
        logits.copy_(base)
        t2 = time.perf_counter()
        apply_token_mask(logits, bitmask)
        t3 = time.perf_counter()
        words = bitmask.numpy()
        if mode == "uniform":
            tokens = [int(ids[nrng.integers(len(ids))]) for ids in allowed_tokens(words, backend.vocab_size)]
        else:
            tokens = [todo.pop() for _, todo in rows]
            if not all(is_allowed(words, i, t) for i, t in enumerate(tokens)):
                raise AssertionError("the mask forbids a token of a valid document")
        num_allowed.append(float(np.unpackbits(words.view(np.uint8)).sum()) / batch)
        t4 = time.perf_counter()
        ok = accept_tokens([r.grammar for r in reqs], tokens)
        t5 = time.perf_counter()
        if not all(ok):
            raise AssertionError("a token the mask allows was rejected")
        if step >= warmup:
            times["fill"].append(t1 - t0)
            times["apply"].append(t3 - t2)
            times["accept"].append(t5 - t4)
        for i, (r, _) in enumerate(rows):  # a finished request leaves; a new one takes its row
            if r.grammar.is_terminated:
                rows[i] = fresh(start_anywhere=False)
    out = {}
    for name, ts in times.items():
        out[f"{name}_ms"] = 1e3 * statistics.median(ts)
        out[f"{name}_ms_mean"] = 1e3 * statistics.fmean(ts)
    out["host_ms"] = out["fill_ms"] + out["accept_ms"]  # what must hide under the forward
    out["host_ms_mean"] = out["fill_ms_mean"] + out["accept_ms_mean"]
    out["requests_completed"] = num_started - batch
    out["mean_allowed_tokens"] = statistics.fmean(num_allowed)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,128")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--tokens", choices=("documents", "uniform"), default="documents")
    ap.add_argument("--max-length", type=int, default=None, help="maxLength of the schema's free strings")
    ap.add_argument("--threads", type=int, default=None, help="fill threads (default: the backend's)")
    ap.add_argument("--cache", default="/tmp/gyre-bench/tokenizer")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    start = time.perf_counter()
    tok = build_tokenizer(Path(args.cache))
    result: dict = {
        "vocab_size": VOCAB_SIZE,
        "tokenizer_s": time.perf_counter() - start,
        "tokens": args.tokens,
        "max_length": args.max_length,
        "steps": args.steps,
        "cpu_count": len(os.sched_getaffinity(0)),  # Linux
    }
    backend = GrammarBackend(tok, VOCAB_SIZE, [EOS], fill_threads=args.threads)
    result["fill_threads"] = backend.fill_threads
    sch = schema(args.max_length)
    start = time.perf_counter()
    backend.compile(SamplingParams(json_schema=sch))
    result["compile_s"] = time.perf_counter() - start
    for bs in (int(b) for b in args.batches.split(",")):
        row = run(backend, tok, sch, args.max_length, bs, args.steps, args.warmup, args.tokens, args.seed)
        result[f"batch_{bs}"] = row
        summary = ", ".join(f"{k} {v:.3f}" for k, v in row.items())
        print(f"batch {bs}: {summary}", file=sys.stderr, flush=True)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
