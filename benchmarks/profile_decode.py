"""Where a decode step's GPU time goes: the kernels of N decode steps at one batch size under torch.profiler.

GPU:  python benchmarks/profile_decode.py --shape llama3-8b --batch 1
Prints the top kernels (total and per-step microseconds, launches per step) and the step's kernel time
against its wall time; a diagnostic, not a benchmark (nothing is recorded).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Timer, shape_dir  # noqa: E402
from throughput import random_prompts  # noqa: E402

from gyre import Engine, SamplingParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--n", type=int, default=1, help="samples per prompt (batch / n prompts; GRPO-like)")
    args = ap.parse_args()
    engine = Engine(shape_dir(args.shape), load_format="dummy", max_model_len=args.prompt_len + args.steps + 64)
    prompts = random_prompts(args.batch // args.n, args.prompt_len, engine.vocab_size)
    sp = SamplingParams(max_new_tokens=args.steps, temperature=1.0, n=args.n, seed=0, ignore_eos=True)
    engine.generate(prompts, SamplingParams(max_new_tokens=4, ignore_eos=True))  # warm up
    engine.flush_cache()
    short = SamplingParams(max_new_tokens=1, temperature=1.0, n=args.n, seed=0, ignore_eos=True)
    with Timer() as t1:
        engine.generate(prompts, short)
    engine.flush_cache()
    with profile(activities=[ProfilerActivity.CUDA]) as prof, Timer() as t:
        engine.generate(prompts, sp)
    step_ms = 1e3 * (t.seconds - t1.seconds) / (args.steps - 1)
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    events.sort(key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in events)
    print(f"batch {args.batch} (n={args.n}, shared_prefix_decode_steps "
          f"{engine.stats()['shared_prefix_decode_steps']}): wall {step_ms:.3f} ms/decode step; profiled kernel time {total / 1e3:.1f} ms "
          f"over {args.steps} steps + 1 prefill")
    for e in events[: args.top]:
        print(f"{e.device_time_total / args.steps:9.1f} us/step {e.count / args.steps:6.1f}/step  "
              f"{e.device_time_total / max(e.count, 1):7.2f} us each  {e.key[:110]}")
    engine.shutdown()


if __name__ == "__main__":
    main()
