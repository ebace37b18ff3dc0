"""Offline throughput of gyre vs HF transformers on the same device, plus roofline fractions.

GPU:  python benchmarks/throughput.py --shape llama3-8b            (dummy bf16 weights)
CPU:  python benchmarks/throughput.py --tiny llama                 (tracks engine overhead)
Prints one JSON line; appends it to benchmarks/results/throughput-<device>.json.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Timer, copy_bandwidth, matmul_flops, record, shape_dir  # noqa: E402

from gyre import Engine, SamplingParams  # noqa: E402


def random_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab - 10, (n, length), generator=g).tolist()


def hf_model(path: str, device: str, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(path)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def hf_generate(model, prompts: list[list[int]], new_tokens: int, batch: int) -> float:
    """HF generate in padded batches: output tokens/s."""
    dev = next(model.parameters()).device
    total = 0
    with Timer() as t:
        for i in range(0, len(prompts), batch):
            ids = torch.tensor(prompts[i:i + batch], device=dev)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            total += (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return total / t.seconds


def hf_generate_batch(model, prompts: list[list[int]], new_tokens: int) -> float | str:
    """HF's continuous-batching generate_batch: output tokens/s (or why it could not run)."""
    from transformers import GenerationConfig

    if not hasattr(model, "generate_batch"):
        return "unavailable"
    try:
        model.set_attn_implementation("sdpa_paged")
    except Exception:  # noqa: BLE001 - older/newer transformers name it differently
        pass
    cfg = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=-1,
                           pad_token_id=0, max_batch_tokens=8192)
    try:
        with Timer() as t:
            outs = model.generate_batch(inputs=prompts, generation_config=cfg, progress_bar=False)
    except Exception as e:  # noqa: BLE001 - report, don't crash the run
        return f"failed: {type(e).__name__}: {str(e)[:200]}"
    total = sum(len(o.generated_tokens) for o in outs.values())
    return total / t.seconds


def gyre_offline(engine: Engine, prompts, new_tokens: int) -> tuple[float, float, dict]:
    sp = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    engine.generate(prompts[: min(8, len(prompts))], SamplingParams(max_new_tokens=4, ignore_eos=True))  # warm up
    engine.flush_cache()
    before = engine.stats()
    with Timer() as t:
        outs = engine.generate(prompts, sp)
    after = engine.stats()
    total = sum(len(o.output_ids) for o in outs)
    steps = after["num_steps"] - before["num_steps"]
    return total / t.seconds, t.seconds, {"steps": steps, "mean_batch": total / max(steps, 1)}


def bs1_decode(engine: Engine, prompt: list[int], new_tokens: int, repeats: int = 3) -> tuple[float, float]:
    """Batch-1 decode tokens/s: new_tokens over the time of a (1 + new_tokens)-token generation minus that of
    a 1-token one (the same prefill, the cache flushed before each), medians of `repeats`. Also returns
    the plain rate new_tokens / time of a new_tokens generation, prefill included (the older figure)."""
    def timed(n: int) -> float:
        engine.flush_cache()
        with Timer() as t:
            engine.generate([prompt], SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True))
        return t.seconds

    def median(xs: list[float]) -> float:
        return sorted(xs)[len(xs) // 2]

    timed(8)  # warm up
    first = median([timed(1) for _ in range(repeats)])
    full = median([timed(1 + new_tokens) for _ in range(repeats)])
    plain = median([timed(new_tokens) for _ in range(repeats)])
    return new_tokens / (full - first), new_tokens / plain


def main() -> None:
    ap = argparse.ArgumentParser()
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--shape", help="a named shape in benchmarks/common.py (dummy weights)")
    src.add_argument("--tiny", help="a gyre.testing architecture (CPU)")
    ap.add_argument("--num-prompts", type=int, default=1024)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--hf-prompts", type=int, default=128, help="prompts given to HF generate (subset)")
    ap.add_argument("--hf-batch", type=int, default=64)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--prefill-prompts", type=int, default=8)
    ap.add_argument("--prefill-len", type=int, default=4096)
    ap.add_argument("--engine", action="append", default=[], help="FIELD=VALUE EngineConfig overrides")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    if args.shape:
        path = shape_dir(args.shape)
        load = "dummy"
    else:
        from gyre.testing import tiny_model

        path = str(tiny_model(args.tiny, f"/tmp/gyre-bench/{args.tiny}"))
        load = "auto"
    overrides = {}
    for kv in args.engine:
        k, _, v = kv.partition("=")
        overrides[k] = int(v) if v.isdigit() else v
    result: dict = {"model": args.shape or f"tiny-{args.tiny}", "dtype": str(dtype).removeprefix("torch."),
                    "num_prompts": args.num_prompts, "prompt_len": args.prompt_len, "output_len": args.output_len}

    vocab = 1500
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(path).vocab_size
    prompts = random_prompts(args.num_prompts, args.prompt_len, vocab)

    # -- HF baselines first (then freed) ---------------------------------------------------------------
    if not args.skip_hf:
        model = hf_model(path, device, dtype)
        sub = prompts[: args.hf_prompts]
        result["hf_generate_tok_s"] = hf_generate(model, sub, args.output_len, args.hf_batch)
        result["hf_generate_batch_tok_s"] = hf_generate_batch(model, sub, args.output_len)
        del model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    # -- gyre -----------------------------------------------------------------------------------------
    max_len = max(args.prompt_len + args.output_len, args.prefill_len + 8)
    engine = Engine(path, load_format=load, max_model_len=max_len, **overrides)
    tok_s, seconds, info = gyre_offline(engine, prompts, args.output_len)
    result.update({"gyre_tok_s": tok_s, "gyre_seconds": seconds, **info})
    if not args.skip_hf:
        result["offline_ratio_vs_hf_generate"] = tok_s / result["hf_generate_tok_s"]
        gb = result["hf_generate_batch_tok_s"]
        result["offline_ratio_vs_hf_generate_batch"] = tok_s / gb if isinstance(gb, float) else None

    model = engine.runner.model
    cfg = engine.runner.hf_config
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # MoE: a token reads (and multiplies by) only its top-k experts; dense models: active = all
    k_of_e = getattr(cfg, "num_experts_per_tok", 1) / getattr(cfg, "num_experts", 1) if model.num_experts else 1.0

    def active(p_name: str) -> float:
        return k_of_e if ".experts." in p_name else 1.0

    active_bytes = sum(p.numel() * p.element_size() * active(n) for n, p in model.named_parameters())
    result["weight_bytes"] = weight_bytes
    result["active_weight_bytes"] = active_bytes
    # batch-1 decode
    bs1_tok_s, bs1_with_prefill = bs1_decode(engine, prompts[0], 128)
    result["bs1_tok_s"] = bs1_tok_s
    result["bs1_tok_s_with_prefill"] = bs1_with_prefill
    result["bs1_step_ms"] = 1e3 / bs1_tok_s
    if cuda:
        bw = copy_bandwidth()
        result["copy_bandwidth_GBs"] = bw / 1e9
        result["bs1_roofline_fraction"] = bs1_tok_s * active_bytes / bw  # batch 1 reads the active weights
        # decode step at the batch size reached: weights (all experts at that batch) + KV read once per step
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 2
        mean_ctx = args.prompt_len + args.output_len / 2
        step_bytes = weight_bytes + info["mean_batch"] * mean_ctx * kv_per_token
        step_time = seconds / max(info["steps"], 1)
        result["decode_step_roofline_fraction"] = step_bytes / step_time / bw
        # prefill MFU
        pre = random_prompts(args.prefill_prompts, args.prefill_len, vocab, seed=1)
        engine.generate(pre[:1], SamplingParams(max_new_tokens=1))
        engine.flush_cache()
        with Timer() as t:
            engine.generate(pre, SamplingParams(max_new_tokens=1))
        n_params = sum(p.numel() * active(n) for n, p in model.named_parameters() if "embed_tokens" not in n)
        tokens = args.prefill_prompts * args.prefill_len
        attn = 2 * 2 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * args.prefill_prompts * (
            args.prefill_len**2 / 2)
        flops = 2 * n_params * tokens + attn
        peak = matmul_flops()
        result["matmul_TFLOPs"] = peak / 1e12
        result["prefill_seconds"] = t.seconds
        result["prefill_mfu"] = flops / t.seconds / peak
    engine.shutdown()
    record("throughput", result)


if __name__ == "__main__":
    main()
