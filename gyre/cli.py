"""gyre command line: generate (JSONL in, JSONL out) | serve | train | train-draft | bench."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from gyre.engine.config import EngineConfig


def _engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", help="an HF model directory (config.json + *.safetensors)")
    g.add_argument("--tiny", choices=["llama", "qwen2", "qwen3", "qwen3_moe"],
                   help="build a tiny random model with gyre.testing (no download) and use it")
    p.add_argument("--tiny-dir", default=".tiny", help="where --tiny models are written")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--engine", action="append", default=[], metavar="FIELD=VALUE",
                   help="an EngineConfig field, e.g. --engine page_size=32 (repeatable)")


def _parse_value(raw: str):
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def build_engine(args: argparse.Namespace):
    from gyre import Engine

    path = args.model
    if args.tiny:
        from gyre.testing import tiny_model

        path = Path(args.tiny_dir) / args.tiny
        if not (path / "config.json").exists():
            tiny_model(args.tiny, path)
    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    overrides = {}
    for item in args.engine:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise SystemExit(f"--engine expects FIELD=VALUE with a field of EngineConfig, got {item!r}")
        overrides[key] = _parse_value(value)
    return Engine(str(path), device=args.device, dtype=args.dtype, **overrides)


def cmd_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from gyre import SamplingParams

    defaults = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
                "top_k": args.top_k, "seed": args.seed, "n": args.n}
    rows = []
    if args.prompt is not None:
        rows.append({"prompt": args.prompt})
    else:
        src = sys.stdin if args.input == "-" else open(args.input)
        with src:
            for i, line in enumerate(src):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise SystemExit(f"{args.input}:{i + 1}: not JSON: {e}") from None
    prompts, params = [], []
    for i, row in enumerate(rows):
        prompt = row.get("prompt_ids", row.get("prompt"))
        if prompt is None:
            raise SystemExit(f"line {i + 1}: needs 'prompt' (text) or 'prompt_ids' (token ids)")
        prompts.append(prompt)
        try:
            params.append(SamplingParams.from_dict({**defaults, **row.get("sampling", {})}))
        except ValueError as e:
            raise SystemExit(f"line {i + 1}: {e}") from None
    engine = build_engine(args)
    out = sys.stdout if args.output == "-" else open(args.output, "w")
    try:
        if engine.tokenizer is not None and args.chat:
            prompts = [engine.tokens.render_chat([{"role": "user", "content": p}], True)
                       if isinstance(p, str) else p for p in prompts]
        bar = tqdm(total=len(prompts), desc="generate", disable=len(prompts) < 8, file=sys.stderr)
        for start in range(0, len(prompts), args.batch):
            outs = engine.generate(prompts[start:start + args.batch], params[start:start + args.batch])
            for c in outs:
                out.write(json.dumps(dataclasses.asdict(c)) + "\n")
            bar.update(min(args.batch, len(prompts) - start))
        bar.close()
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    finally:
        engine.shutdown()
        if out is not sys.stdout:
            out.close()
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import logging

    from gyre.recipe import load_recipe
    from gyre.recipe_loader import RecipeError
    from gyre.trainers.grpo import train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except (RecipeError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    history = train(recipe, resume=args.resume)
    if history and int(os.environ.get("RANK", "0")) == 0:  # under torchrun: one summary
        first, last = history[0], history[-1]
        print(json.dumps({"steps": last["step"], "reward_first": first["reward_mean"],
                          "reward_last": last["reward_mean"], "weight_version": last["weight_version"],
                          "run_dir": f"{recipe.logging.run_dir}/{recipe.logging.name}"}))
    return 0


def cmd_train_draft(args: argparse.Namespace) -> int:
    """Train an EAGLE draft head for --model (gyre.engine.spec.train) and print the result as a JSON line."""
    import logging

    from gyre.engine.spec.train import train_eagle

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        result = train_eagle(args.model, args.data, args.out, steps=args.steps, batch_size=args.batch_size,
                             seq_len=args.seq_len, lr=args.lr, device=args.device, dtype=args.dtype,
                             init_from=args.init_from, log_every=args.log_every, seed=args.seed)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    print(json.dumps({**result, "out": args.out}))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Offline throughput of this engine on random prompts (benchmarks/ has the full GPU harness)."""
    import time

    import torch

    from gyre import SamplingParams

    engine = build_engine(args)
    try:
        g = torch.Generator().manual_seed(0)
        vocab = engine.vocab_size
        prompts = torch.randint(10, vocab - 10, (args.num_prompts, args.prompt_len), generator=g).tolist()
        sp = SamplingParams(max_new_tokens=args.output_len, temperature=0.0, ignore_eos=True)
        engine.generate(prompts[:2], SamplingParams(max_new_tokens=2, ignore_eos=True))  # warm up
        start = time.perf_counter()
        outs = engine.generate(prompts, sp)
        seconds = time.perf_counter() - start
        tokens = sum(len(o.output_ids) for o in outs)
        stats = engine.stats()
        print(json.dumps({"num_prompts": args.num_prompts, "prompt_len": args.prompt_len,
                          "output_len": args.output_len, "seconds": round(seconds, 3),
                          "output_tokens_per_s": round(tokens / seconds, 1), "steps": stats["num_steps"],
                          "device": str(engine.runner.device), "dtype": str(engine.runner.dtype)}))
    finally:
        engine.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gyre", description="gyre: an RL rollout engine")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate completions: JSONL in, JSONL out")
    _engine_args(gen)
    gen.add_argument("--prompt", help="one text prompt (instead of --input)")
    gen.add_argument("--input", default="-", help="JSONL with 'prompt' or 'prompt_ids' [+ 'sampling'] per line")
    gen.add_argument("--output", default="-")
    gen.add_argument("--chat", action="store_true", help="wrap text prompts in the chat template as a user turn")
    gen.add_argument("--batch", type=int, default=256, help="prompts per engine call")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("-n", type=int, default=1)
    gen.set_defaults(fn=cmd_generate)

    tr = sub.add_parser("train", help="run an RL recipe (YAML)")
    tr.add_argument("recipe", help="recipes/*.yaml")
    tr.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. trainer.lr=1e-5")
    tr.add_argument("--resume", action="store_true", help="continue from runs/<name>/checkpoint.pt")
    tr.set_defaults(fn=cmd_train)

    draft = sub.add_parser("train-draft", help="train an EAGLE draft head for a target model (JSON line)")
    draft.add_argument("--model", required=True, help="the target: an HF model directory")
    draft.add_argument("--data", required=True,
                       help=".txt (documents separated by blank lines) or .jsonl (token_ids | prompt_ids + "
                            "output_ids | text | question + answer per row)")
    draft.add_argument("--out", required=True, help="the head's directory (config.json + model.safetensors)")
    draft.add_argument("--steps", type=int, default=1000)
    draft.add_argument("--batch-size", type=int, default=8)
    draft.add_argument("--seq-len", type=int, default=512)
    draft.add_argument("--lr", type=float, default=1e-3)
    draft.add_argument("--init-from", default=None, help="warm-start from this head directory")
    draft.add_argument("--device", default="auto")
    draft.add_argument("--dtype", default="auto", help="auto: bfloat16 autocast on CUDA, float32 on the CPU")
    draft.add_argument("--log-every", type=int, default=50)
    draft.add_argument("--seed", type=int, default=0)
    draft.set_defaults(fn=cmd_train_draft)

    bench = sub.add_parser("bench", help="offline throughput on random prompts (JSON line)")
    _engine_args(bench)
    bench.add_argument("--num-prompts", type=int, default=64)
    bench.add_argument("--prompt-len", type=int, default=128)
    bench.add_argument("--output-len", type=int, default=64)
    bench.set_defaults(fn=cmd_bench)

    srv = sub.add_parser("serve", help="HTTP server (OpenAI-compatible, sessions, admin)", add_help=False)
    srv.set_defaults(fn=None)

    args, rest = parser.parse_known_args(argv)
    if args.command == "serve":
        from gyre.engine.server import serve

        serve(rest)
        return 0
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
