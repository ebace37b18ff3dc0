"""Where a batch-1 request's fixed cost goes (its prefill and first token), with and without an EAGLE
drafter: milliseconds per 1-token generation, and wall time per call of the engine thread's parts.

Random weights (the cost does not depend on them), the spec.py "small" shape by default. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CallTimes  # noqa: E402

from gyre import Engine, SamplingParams  # noqa: E402
from gyre.testing import tiny_model  # noqa: E402


def timed_parts(engine: Engine) -> CallTimes:
    times = CallTimes()
    runner = engine.runner
    parts = [(runner, "launch"), (runner, "forward"), (runner, "prepare"), (runner.sampler, "sample"),
             (engine.scheduler, "schedule"), (engine.scheduler, "resolve"), (engine.scheduler, "resolve_spec"),
             (engine, "_sync")]
    if engine.spec is not None:
        parts += [(engine.spec, "attach"), (engine.spec, "after_step"), (engine.spec.drafter, "observe"),
                  (engine.spec, "launch_fused"), (engine, "_resolve_spec")]
    for obj, name in parts:
        times.patch(obj, name)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompt-len", type=int, default=100)
    ap.add_argument("--requests", type=int, default=10)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gyre-prefill-"))
    shape = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                 intermediate_size=2048, head_dim=64)
    target = tiny_model("llama", work / "target", **shape)
    from transformers import AutoConfig

    from gyre.engine.spec.eagle import EagleHead, eagle_config, save_eagle

    head = EagleHead(eagle_config(AutoConfig.from_pretrained(target)), torch.float32)
    save_eagle(head, work / "eagle")
    gen = torch.Generator().manual_seed(0)
    vocab = AutoConfig.from_pretrained(target).vocab_size
    prompts = [torch.randint(10, vocab - 10, (args.prompt_len + i,), generator=gen).tolist()
               for i in range(args.requests)]
    one = SamplingParams(max_new_tokens=1, temperature=0.0)
    result: dict = {"benchmark": "profile_prefill", "prompt_len": args.prompt_len, "requests": args.requests}
    for name, spec in (("plain", {}), ("eagle", dict(spec_method="eagle", spec_draft_path=str(work / "eagle")))):
        engine = Engine(str(target), max_num_tokens=65536, **spec)
        try:
            for p in prompts:  # warm-up: every prompt length once
                engine.generate(p, one)
            engine.flush_cache()
            times = timed_parts(engine)
            t = time.perf_counter()
            for p in prompts:
                engine.generate(p, one)
            ms = 1e3 * (time.perf_counter() - t) / len(prompts)
            times.restore()
            result[name] = {"ms_per_request": ms, "parts_ms": times.summary(unit=1e3)}
        finally:
            engine.shutdown()
        print(f"[prefill] {name}: {result[name]}", flush=True)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
