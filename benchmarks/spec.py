"""Speculative decoding (issue #11): speedup, acceptance and verify cost on a target that was really trained.

Random weights make draft acceptance meaningless, so this script first trains its own target in-house:
(1) a byte-level BPE tokenizer and a Llama LM pretrained on GSM8K ("Question: ...\\nAnswer: ..." text,
packed 512-token rows) for a fixed time, (2) an EAGLE head for it (gyre.engine.spec.train), then
(3) measures gyre's Engine with each spec method on held-out GSM8K questions (the last HELDOUT records of
the train split, never trained on): output tokens/s at batch 1 (greedy and temperature 1) and at batch B,
speedup over "none" in the same run, mean acceptance length, verify step vs decode step time, and the
fraction of greedy completions identical to "none" (bf16 batched verification may legitimately differ).

GPU:  python benchmarks/spec.py --work-dir /tmp/gyre-spec            (~6 min on one H200)
      python benchmarks/spec.py --work-dir /tmp/gyre-spec --reuse    (measure only, if both are there)
CPU:  python benchmarks/spec.py --target-size tiny --pretrain-seconds 20 --eagle-steps 20 --batch-sizes 1,4 \\
          --max-new-tokens 32 --num-prompts 4
Prints one JSON line; appends it to benchmarks/results/spec-<device>.json. The work dir keeps
target/ (HF dir: safetensors + tokenizer + pretrain.json), eagle/ (the head) and gsm8k_heldin.jsonl
(the token ids of the training documents: `gyre train-draft` data).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import CallTimes, Timer, record  # noqa: E402

from gyre import Engine, SamplingParams  # noqa: E402
from gyre.testing import CHAT_TEMPLATE, ENDOFTEXT, IM_END, IM_START  # noqa: E402

DATA_FILE = "gsm8k/train.jsonl"
HELDOUT = 256  # the last records of the train split: measurement prompts, never trained on
SEQ_LEN = 512
EAGLE_CHUNK = 500  # steps per train_eagle call: the head's time cap is checked between calls
# LlamaConfig fields + BPE vocab, pretraining batch (rows of SEQ_LEN), peak lr, EAGLE batch (documents)
PRESETS = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=256, vocab=2048, batch_size=4, lr=3e-3, eagle_batch=4),  # CPU smoke
    "small": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                  intermediate_size=2048, vocab=4096, batch_size=32, lr=8e-4, eagle_batch=32),  # ~80M params
    # ~770M params (1.5 GB bf16): its decode step reads enough weights to be memory-bound, like the
    # policies RL serves, rather than all launch overhead like "small"
    "medium": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=8,
                   intermediate_size=5632, vocab=4096, batch_size=32, lr=2e-4, eagle_batch=16),
}
# issue #11; verify_over_decode_step is an upper bound, the speedups lower bounds
TARGETS = {"eagle_speedup_bs1": 2.0, "eagle_speedup_bs32": 1.3, "verify_over_decode_step": 1.3,
           "spec_step_over_decode_step_decode_phase": 1.3, "verify_forward_over_decode_gpu": 1.3}


def find_data(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    candidates = [root / "shared" / "data" / DATA_FILE for root in (REPO.parent, REPO, Path.cwd())]
    for c in candidates:
        if c.exists():
            return c
    looked = ", ".join(map(str, candidates))
    raise FileNotFoundError(f"GSM8K train split not found; pass --data (looked at {looked})")


def doc_text(rec: dict) -> str:
    return f"Question: {rec['question']}\nAnswer: {rec['answer']}"


def prompt_text(rec: dict) -> str:
    return f"Question: {rec['question']}\nAnswer:"


def encode(tok, texts: list[str]) -> list[list[int]]:
    return tok(texts, add_special_tokens=False)["input_ids"]  # as the engine encodes a text prompt


# -- (1) tokenizer and target ---------------------------------------------------------------------------
def train_tokenizer(texts: list[str], vocab_size: int, path: Path):
    """Byte-level BPE (digits split into single tokens, as gyre.testing) saved as an HF fast tokenizer:
    <|endoftext|> (id 0) ends every document and is eos and pad; ChatML tokens and template for chat."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[ENDOFTEXT, IM_START, IM_END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=ENDOFTEXT, pad_token=ENDOFTEXT,
                                   extra_special_tokens=[IM_START, IM_END], chat_template=CHAT_TEMPLATE)
    fast.save_pretrained(path, save_jinja_files=False)
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    special_map = {"additional_special_tokens": [IM_START, IM_END],
                   "eos_token": {"content": ENDOFTEXT, **flags}, "pad_token": {"content": ENDOFTEXT, **flags}}
    (path / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    return fast


def packed_rows(docs: list[torch.Tensor], rng: random.Random) -> torch.Tensor:
    """Shuffled documents, concatenated (each ends with eos), cut into rows: [N, SEQ_LEN] int64."""
    order = list(range(len(docs)))
    rng.shuffle(order)
    flat = torch.cat([docs[i] for i in order])
    n = flat.numel() // SEQ_LEN
    return flat[: n * SEQ_LEN].view(n, SEQ_LEN)


def pretrain(docs: list[list[int]], heldout: list[list[int]], tok, size: str, seconds: float, out: Path,
             device: torch.device, seed: int) -> dict:
    """Train a Llama LM from scratch for `seconds` (AdamW, cosine lr over the time budget, bf16 autocast on
    CUDA) and save it to `out` as an HF dir (safetensors, bf16 on CUDA) beside the tokenizer."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    preset = {k: v for k, v in PRESETS[size].items() if k not in ("vocab", "batch_size", "lr", "eagle_batch")}
    batch_size, peak_lr = PRESETS[size]["batch_size"], PRESETS[size]["lr"]
    eot = tok.convert_tokens_to_ids(ENDOFTEXT)
    cfg = LlamaConfig(**preset, head_dim=preset["hidden_size"] // preset["num_attention_heads"],
                      vocab_size=-(-len(tok) // 64) * 64, max_position_embeddings=2048, rms_norm_eps=1e-5,
                      rope_theta=10000.0, rope_scaling=None, bos_token_id=eot, eos_token_id=eot,
                      pad_token_id=eot, tie_word_embeddings=False)
    torch.manual_seed(seed)
    cuda = device.type == "cuda"
    model = LlamaForCausalLM(cfg).to(device)  # float32 master weights
    num_params = sum(p.numel() for p in model.parameters())
    epoch_tokens = sum(map(len, docs))
    docs = [torch.tensor(d, dtype=torch.int64) for d in docs]
    opt = torch.optim.AdamW(model.parameters(), lr=peak_lr, betas=(0.9, 0.95), weight_decay=0.1,
                            **({"fused": True} if cuda else {}))
    print(f"[pretrain] {size}: {num_params / 1e6:.1f}M params, {epoch_tokens / 1e6:.2f}M tokens/epoch, "
          f"batch {batch_size}x{SEQ_LEN}, {seconds:.0f} s", flush=True)
    rng = random.Random(seed)
    losses: list[torch.Tensor] = []
    step, epoch, last_log, done = 0, 0, 0.0, False
    scale, snapshot = 1.0, None
    start = time.perf_counter()
    model.train()
    while not done:
        rows = packed_rows(docs, rng).to(device)  # a new packing each epoch
        for i in range(0, rows.shape[0] - batch_size + 1, batch_size):
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                done = True
                break
            frac = elapsed / seconds  # warmup over the first 5% of the time, then cosine down to 10%
            lr = scale * peak_lr * min(1.0, frac / 0.05) * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
            if step % 25 == 0:  # a diverged run goes back to its last finite snapshot at half the lr
                if step and not torch.isfinite(torch.stack(losses[-25:])).all():
                    model.load_state_dict(snapshot[0])
                    opt.load_state_dict(snapshot[1])
                    scale *= 0.5
                    print(f"[pretrain] non-finite loss by step {step}: back to the snapshot, lr x{scale}",
                          flush=True)
                snapshot = ({k: v.detach().clone() for k, v in model.state_dict().items()},
                            copy.deepcopy(opt.state_dict()))
            for g in opt.param_groups:
                g["lr"] = lr
            x = rows[i:i + batch_size]  # [B, SEQ_LEN]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                loss = model(input_ids=x, labels=x).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())  # no sync per step
            step += 1
            if elapsed - last_log >= 15:
                last_log = elapsed
                print(f"[pretrain] {elapsed:5.0f} s  step {step}  epoch {epoch}  "
                      f"loss {torch.stack(losses[-20:]).mean().item():.3f}  lr {lr:.2e}", flush=True)
        epoch += 1
    train_seconds = time.perf_counter() - start
    final_loss = torch.stack(losses[-20:]).mean().item()
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
        x = packed_rows([torch.tensor(d) for d in heldout], random.Random(0))[:16].to(device)
        heldout_loss = model(input_ids=x, labels=x).loss.item()
    tokens = step * batch_size * SEQ_LEN
    info = {"size": size, "params": num_params, "steps": step, "epochs": tokens / epoch_tokens,
            "seconds": train_seconds, "tokens_per_s": tokens / train_seconds, "final_loss": final_loss,
            "heldout_loss": heldout_loss}
    print(f"[pretrain] done: {step} steps, {info['epochs']:.1f} epochs in {train_seconds:.0f} s; "
          f"final train loss {final_loss:.3f}, held-out loss {heldout_loss:.3f}", flush=True)
    if cuda:
        model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=eot, eos_token_id=[eot, tok.convert_tokens_to_ids(IM_END)], pad_token_id=eot,
        do_sample=False)
    model.save_pretrained(out, safe_serialization=True)
    (out / "pretrain.json").write_text(json.dumps(info, indent=1))
    del model, opt, losses
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return info


# -- (2) EAGLE head -------------------------------------------------------------------------------------
def train_head(target: Path, data_path: Path, out: Path, steps: int, seconds: float, batch_size: int) -> dict:
    """gyre.engine.spec.train.train_eagle on the held-in documents, for `steps` or until `seconds` would be
    passed: it runs in chunks, each warm-started from the previous one's head (train_eagle's lr is
    constant; only AdamW's moments restart)."""
    from gyre.engine.spec.train import load_token_data, train_eagle

    data = load_token_data(data_path, target)  # [num_docs][len]
    print(f"[eagle] {len(data)} sequences, {sum(map(len, data)) / 1e6:.2f}M tokens, batch {batch_size}",
          flush=True)
    done, info = 0, {}
    with Timer() as t:
        while done < steps:
            n = min(EAGLE_CHUNK, steps - done)
            info = train_eagle(str(target), data, str(out), steps=n, batch_size=batch_size, seq_len=SEQ_LEN,
                               lr=1e-3, init_from=str(out) if done else None, log_every=min(50, n), seed=done)
            done += n
            elapsed = time.perf_counter() - t.start
            print(f"[eagle] {elapsed:5.0f} s  step {done}  loss {info['loss']:.4f}  "
                  f"accuracy {info['accuracy']:.3f}", flush=True)
            if elapsed / done * (done + min(EAGLE_CHUNK, steps - done)) > seconds:
                break
    return {"steps": done, "steps_asked": steps, "seconds": t.seconds, "batch_size": batch_size,
            "loss": info["loss"], "accuracy": info["accuracy"]}


# -- (3) measurements -----------------------------------------------------------------------------------
SPEC_KEYS = ("spec_num_verify_steps", "spec_num_verifies", "spec_num_draft_tokens",
             "spec_num_accepted_tokens")


def delta_mean(before: dict, after: dict, mean_key: str, count_key: str) -> float | None:
    """The mean of a stat over one run, from the engine's cumulative mean and its count (None if absent)."""
    if after.get(mean_key) is None or count_key not in after:
        return None
    n = after[count_key] - before.get(count_key, 0)
    if not n:
        return None
    return (after[mean_key] * after[count_key] - (before.get(mean_key) or 0.0) * before.get(count_key, 0)) / n


def spec_delta(before: dict, after: dict) -> dict:
    """Spec counters over one run; None where the engine has no such key."""
    out = {k.removeprefix("spec_"): after[k] - before.get(k, 0) if k in after else None for k in SPEC_KEYS}
    # tokens produced per verify of a request (accepted drafts + the target's own token): the engine's
    # mean is over spec_num_verifies (one per request per verify step) when it reports that count
    per = "spec_num_verifies" if "spec_num_verifies" in after else "spec_num_verify_steps"
    out["mean_accept_len"] = delta_mean(before, after, "spec_mean_accept_len", per)
    out["engine_verify_step_ms"] = delta_mean(before, after, "spec_verify_step_ms", "spec_num_verify_steps")
    drafted, accepted = out["num_draft_tokens"], out["num_accepted_tokens"]
    out["accept_rate"] = accepted / drafted if drafted and accepted is not None else None
    return out


def run(engine: Engine, prompts: list[list[int]], batch: int, temperature: float, max_new: int,
        ignore_eos: bool) -> tuple[dict, list[list[int]]]:
    """Prompts in groups of `batch` submitted at once (batch 1: one at a time), seeded per prompt."""
    sps = [SamplingParams(max_new_tokens=max_new, temperature=temperature, seed=i, ignore_eos=ignore_eos)
           for i in range(len(prompts))]
    engine.flush_cache()
    before = engine.stats()
    outs = []
    with Timer() as t:
        for i in range(0, len(prompts), batch):
            outs += engine.generate(prompts[i:i + batch], sps[i:i + batch])
    after = engine.stats()
    tokens = sum(len(o.output_ids) for o in outs)
    steps = after["num_steps"] - before["num_steps"]
    res = {"tok_s": tokens / t.seconds, "seconds": t.seconds, "num_prompts": len(prompts),
           "output_tokens": tokens, "num_steps": steps, "step_ms": 1e3 * t.seconds / max(steps, 1),
           **spec_delta(before, after)}
    if batch == 1:  # decode alone: the same run minus 1-token generations (prefill, first token, overheads)
        engine.flush_cache()
        first = [SamplingParams(max_new_tokens=1, temperature=temperature, seed=i) for i in range(len(prompts))]
        with Timer() as t1:
            for p, sp in zip(prompts, first):
                engine.generate(p, sp)
        res["first_token_seconds"] = t1.seconds
        res["decode_tok_s"] = (tokens - len(prompts)) / max(t.seconds - t1.seconds, 1e-9)
    return res, [o.output_ids for o in outs]


def device_costs(engine: Engine, k: int, context: int = 300, reps: int = 100) -> dict | None:
    """GPU milliseconds per replay of captured graphs, back to back (no host work in them): the target's
    decode at batch 1, its decode over 1 + k rows (a verify's forward), and the fused EAGLE step at batch 1
    (k - 1 draft steps, the verify, sampling, acceptance and the catch-up, all k drafts live; its inputs
    are reset by one device copy before each replay, since a step advances them). Every row is set at
    position `context` over free pages (the cache is flushed and nothing runs: the KV written is scratch)."""
    if not torch.cuda.is_available():
        return None
    engine.flush_cache()

    def fn() -> dict:
        runner, out = engine.runner, {}
        graphs, ps = runner.graphs, runner.pool.page_size
        pages = torch.arange(1, context // ps + 2, dtype=torch.int32, device=runner.device)
        slot = int(pages[context // ps]) * ps + context % ps

        def time_it(graph, before=None) -> float:
            for _ in range(5):
                if before is not None:
                    before()
                graph.replay()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                if before is not None:
                    before()
                graph.replay()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / reps

        if graphs is not None:
            for rows in (1, k + 1):
                bucket = next(b for b in graphs.buckets if b >= rows)
                graphs.page_table[:bucket, :len(pages)] = pages
                graphs.seq_lens[:bucket] = 0
                graphs.seq_lens[:rows] = torch.arange(context + 1, context + 1 + rows, dtype=torch.int32)
                graphs.slot_mapping[:bucket] = -1
                graphs.slot_mapping[:rows] = torch.arange(slot, slot + rows)
                out["decode_bs1" if rows == 1 else f"decode_{rows}_rows"] = time_it(graphs.graphs[bucket][0])
        fused = getattr(engine.spec.drafter, "fused", None) if engine.spec is not None else None
        if fused is not None and (1, False) in fused.graphs:
            from gyre.engine.spec.fused import CAP, COUNT, GENERATED, MAX_GENERATED, SLOT, START

            fused.table[0, :len(pages)] = pages
            fused.alive[0] = 1
            row = fused.ints[0]
            row[SLOT], row[START], row[COUNT], row[GENERATED] = engine.spec.drafter.scratch_slot, context, k, 0
            row[MAX_GENERATED], row[CAP] = 1 << 40, 1 << 40
            inputs = fused.ints.clone()  # a step advances its own inputs: every replay starts from these
            out["fused_eagle_bs1"] = time_it(fused.graphs[(1, False)], lambda: fused.ints.copy_(inputs))
        return out

    return engine.call(fn)


def host_profile(engine: Engine, prompts: list[list[int]], max_new: int) -> dict:
    """Microseconds per call of the engine thread's parts of a speculative step at batch 1 (wall clock,
    wrappers around the methods; the first-call entries include the waits inside them)."""
    from gyre.engine.spec import fused as fused_mod

    times = CallTimes()
    for obj, name in [(engine, "_spec_step"), (engine, "_resolve_spec"), (engine.spec, "continue_fused"),
                      (engine.spec, "launch_fused"), (engine.spec, "after_step"), (engine.scheduler, "resolve_spec"),
                      (engine.scheduler, "schedule"), (engine.scheduler, "advance"), (engine.runner, "launch"),
                      (fused_mod.FusedHandle, "wait"), (fused_mod.FusedEagle, "_launch"),
                      (torch.cuda.Event, "synchronize"), (torch.cuda.CUDAGraph, "replay")]:
        times.patch(obj, name)
    try:
        engine.flush_cache()
        with Timer() as t:
            for p in prompts:
                engine.generate(p, SamplingParams(max_new_tokens=max_new, temperature=0.0))
    finally:
        times.restore()
    return {"seconds": t.seconds, **times.summary()}


def measure(method: str, target: Path, eagle: Path, prompts: list[list[int]], args, overrides: dict
            ) -> tuple[dict, dict[str, list[list[int]]]]:
    """One engine for `method`: batch 1 greedy and temperature 1, then each larger batch size greedy."""
    spec = {} if method == "none" else {"spec_method": method, "spec_num_tokens": args.num_tokens}
    if method == "eagle":
        spec["spec_draft_path"] = str(eagle)
    max_len = min(2048, max(map(len, prompts)) + args.max_new_tokens + 16)
    engine = Engine(target, max_model_len=max_len, **spec, **overrides)
    try:
        greedy = SamplingParams(max_new_tokens=16, temperature=0.0)
        engine.generate(prompts[:max(args.batch_sizes)], greedy)  # warm up
        engine.generate(prompts[:1], greedy)
        engine.generate(prompts[:1], SamplingParams(max_new_tokens=16, temperature=1.0, seed=0))
        res, ids = {}, {}
        for bs in args.batch_sizes:
            n = min(len(prompts), max(args.num_prompts, args.waves * bs))
            for temp in (0.0, 1.0) if bs == 1 else (0.0,):
                name = f"bs{bs}" + ("_t1" if temp else "")
                # the run of median rate among repeats (host jitter moves a batch-1 run by 10-20%)
                reps = [run(engine, prompts[:n], bs, temp, args.max_new_tokens, args.ignore_eos)
                        for _ in range(args.repeats)]
                reps.sort(key=lambda x: x[0]["tok_s"])
                r, ids[name] = reps[len(reps) // 2]
                r["tok_s_repeats"] = [x[0]["tok_s"] for x in reps]
                if "decode_tok_s" in r:
                    r["decode_tok_s_repeats"] = sorted(x[0]["decode_tok_s"] for x in reps)
                    r["decode_tok_s"] = r["decode_tok_s_repeats"][len(reps) // 2]
                res[name] = r
                print(f"[measure] {method:5s} {name:6s} {r['tok_s']:9.1f} tok/s  step {r['step_ms']:.2f} ms  "
                      f"accept_len {r['mean_accept_len']}", flush=True)
        res["engine_stats"] = {k: v for k, v in engine.stats().items() if k.startswith("spec_")}
        if method in ("none", "eagle"):
            res["device_ms"] = device_costs(engine, args.num_tokens)
            print(f"[measure] {method:5s} graph replays (ms): {res['device_ms']}", flush=True)
        if method == "eagle" and torch.cuda.is_available():
            res["host_us"] = host_profile(engine, prompts[:4], args.max_new_tokens)
            print(f"[measure] host: {json.dumps(res['host_us'])}", flush=True)
    finally:
        engine.shutdown()
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return res, ids


def summarize(per: dict, ids: dict, max_bs: int) -> dict:
    """Flat keys: <method>_speedup_<run>, <method>_mean_accept_len_<run>, greedy identity, verify cost,
    and the issue's targets (the batch-32 one is checked at the largest batch size measured)."""
    out: dict = {}
    base = per["none"]
    for m, runs in per.items():
        if m == "none" or "error" in runs:
            continue
        same = total = 0
        for name, r in runs.items():
            if name not in base or not isinstance(r, dict) or "tok_s" not in r:
                continue
            out[f"{m}_speedup_{name}"] = r["tok_s"] / base[name]["tok_s"]
            if r.get("decode_tok_s") and base[name].get("decode_tok_s"):  # prefill and first token left out
                out[f"{m}_decode_speedup_{name}"] = r["decode_tok_s"] / base[name]["decode_tok_s"]
            out[f"{m}_mean_accept_len_{name}"] = r["mean_accept_len"]
            if not name.endswith("_t1"):
                pairs = list(zip(ids[m][name], ids["none"][name]))
                r["greedy_identical_frac"] = sum(a == b for a, b in pairs) / len(pairs)
                same += sum(a == b for a, b in pairs)
                total += len(pairs)
        out[f"{m}_greedy_identical_frac"] = same / total if total else None
        out[f"{m}_greedy_identical"] = same == total if total else None
    if "bs1" in base and "bs1" in per.get("eagle", {}):
        out["decode_step_ms"] = base["bs1"]["step_ms"]
        out["spec_verify_step_ms"] = per["eagle"]["bs1"]["step_ms"]  # draft + verify, wall time per step
        out["verify_over_decode_step"] = out["spec_verify_step_ms"] / out["decode_step_ms"]
    eagle1 = (per.get("eagle") or {}).get("bs1") or {}
    if eagle1.get("first_token_seconds") is not None and base.get("bs1", {}).get("first_token_seconds") is not None:
        # per step of the decode phase alone: the run minus its 1-token generations (one step each), so the
        # prefills and per-request costs, fixed per request, are not spread over fewer steps for spec
        def decode_step_ms(r: dict) -> float:
            return 1e3 * (r["seconds"] - r["first_token_seconds"]) / max(r["num_steps"] - r["num_prompts"], 1)

        out["decode_phase_step_ms"] = decode_step_ms(base["bs1"])
        out["spec_decode_phase_step_ms"] = decode_step_ms(eagle1)
        out["spec_step_over_decode_step_decode_phase"] = out["spec_decode_phase_step_ms"] / out["decode_phase_step_ms"]
    dev = (per.get("eagle") or {}).get("device_ms") or {}
    if dev.get("decode_bs1"):  # GPU time alone (graph replays), the host's share of a step left out
        rows = next((key for key in dev if key.endswith("_rows")), None)
        out["verify_forward_over_decode_gpu"] = dev[rows] / dev["decode_bs1"] if rows else None
        out["fused_step_over_decode_gpu"] = (dev["fused_eagle_bs1"] / dev["decode_bs1"]
                                             if dev.get("fused_eagle_bs1") else None)
    values = {"eagle_speedup_bs1": out.get("eagle_speedup_bs1"),
              "eagle_speedup_bs32": out.get(f"eagle_speedup_bs{max_bs}"),
              "verify_over_decode_step": out.get("verify_over_decode_step"),
              "spec_step_over_decode_step_decode_phase": out.get("spec_step_over_decode_step_decode_phase"),
              "verify_forward_over_decode_gpu": out.get("verify_forward_over_decode_gpu")}
    out["targets"] = {}
    for k, goal in TARGETS.items():
        v = values[k]
        met = None if v is None else v >= goal if k.startswith("eagle_speedup") else v <= goal
        out["targets"][k] = {"target": goal, "value": v, "met": met,
                             "batch": max_bs if k == "eagle_speedup_bs32" else 1}
    return out


# -- the recipe -----------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", help=f"GSM8K train jsonl (default: shared/data/{DATA_FILE} by or in the repo)")
    ap.add_argument("--work-dir", help="keeps target/, eagle/ and the data file (default: a new temp dir)")
    ap.add_argument("--reuse", action="store_true", help="skip training what --work-dir already holds")
    ap.add_argument("--target-size", choices=sorted(PRESETS), default="small")
    ap.add_argument("--vocab-size", type=int, help="BPE vocabulary (default: 2048 tiny, 4096 small)")
    ap.add_argument("--pretrain-seconds", type=float, default=150.0)
    ap.add_argument("--eagle-steps", type=int, default=3000)
    ap.add_argument("--eagle-seconds", type=float, default=150.0, help="time cap of the head's training")
    ap.add_argument("--eagle-batch", type=int, help="documents per step (default: 4 tiny, 32 small)")
    ap.add_argument("--skip-eagle", action="store_true", help="train no head (eagle runs only if reused)")
    ap.add_argument("--methods", default="none,ngram,eagle")
    ap.add_argument("--num-tokens", type=int, default=4, help="draft tokens per verify (spec_num_tokens)")
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--num-prompts", type=int, default=8, help="prompts at batch 1 (B: max(this, waves*B))")
    ap.add_argument("--waves", type=int, default=2, help="batch B runs waves*B prompts, B at a time")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each measurement (the median is kept)")
    ap.add_argument("--ignore-eos", action="store_true", help="always generate max_new_tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--engine", action="append", default=[], help="FIELD=VALUE EngineConfig overrides")
    args = ap.parse_args()
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.methods = ["none"] + [m for m in (s.strip() for s in args.methods.split(",")) if m and m != "none"]
    return args


def main() -> None:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    args = parse_args()
    # KV for every measured sequence many times over, not 85% of the GPU (the drafter mirrors the pages)
    overrides: dict = {"max_num_tokens": 262144}
    for k, _, v in (kv.partition("=") for kv in args.engine):
        overrides[k] = int(v) if v.lstrip("-").isdigit() else v
    hf_logging.disable_progress_bar()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    else:  # the CPU run is a smoke test of tiny models: threads gain nothing there, and OpenMP workers
        torch.set_num_threads(1)  # spin-waiting on a shared machine make it several times slower
    t0 = time.perf_counter()
    phases: dict = {}

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="gyre-spec-"))
    target, eagle = work / "target", work / "eagle"
    target.mkdir(parents=True, exist_ok=True)
    print(f"[spec] work dir {work}", flush=True)
    records = [json.loads(line) for line in find_data(args.data).read_text().splitlines() if line.strip()]
    train_recs, heldout_recs = records[:-HELDOUT], records[-HELDOUT:]

    # (1) tokenizer + target
    reuse_target = args.reuse and (target / "pretrain.json").exists()
    with Timer() as t:
        if reuse_target:
            tok = AutoTokenizer.from_pretrained(target)
        else:
            vocab = args.vocab_size or PRESETS[args.target_size]["vocab"]
            tok = train_tokenizer([doc_text(r) for r in train_recs], vocab, target)
        eos = [tok.convert_tokens_to_ids(ENDOFTEXT)]
        docs = [d + eos for d in encode(tok, [doc_text(r) for r in train_recs])]
        heldout = [d + eos for d in encode(tok, [doc_text(r) for r in heldout_recs])]
        prompts = encode(tok, [prompt_text(r) for r in heldout_recs])
    heldin_path = work / "gsm8k_heldin.jsonl"  # the head's data: the target's documents, eos included
    heldin_path.write_text("".join(json.dumps({"token_ids": d}) + "\n" for d in docs))
    phases["tokenizer_s"] = t.seconds
    if reuse_target:
        pre = {**json.loads((target / "pretrain.json").read_text()), "reused": True}
    else:
        pre = pretrain(docs, heldout, tok, args.target_size, args.pretrain_seconds, target, device, args.seed)
        phases["pretrain_s"] = pre["seconds"]

    # (2) EAGLE head
    head: dict = {}
    if reuse_target and (eagle / "config.json").exists():
        head = {"reused": True}
    elif "eagle" in args.methods and not args.skip_eagle:
        try:
            head = train_head(target, heldin_path, eagle, args.eagle_steps, args.eagle_seconds,
                              args.eagle_batch or PRESETS[args.target_size]["eagle_batch"])
            phases["eagle_s"] = head["seconds"]
        except Exception as e:  # noqa: BLE001 - still measure the other methods in this (one) device call
            head = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(f"[eagle] training failed: {head['error']}", flush=True)
    has_head = bool(head) and "error" not in head  # a head trained for (or reused with) this target
    methods = [m for m in args.methods if m != "eagle" or has_head]

    # (3) measurements
    per, ids = {}, {}
    with Timer() as t:
        for m in methods:
            try:
                per[m], ids[m] = measure(m, target, eagle, prompts, args, overrides)
            except Exception as e:  # noqa: BLE001 - a method the engine cannot run is reported, not fatal
                per[m] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                print(f"[measure] {m} failed: {per[m]['error']}", flush=True)
    phases["measure_s"] = t.seconds
    phases["total_s"] = time.perf_counter() - t0
    if "error" in per["none"]:
        raise SystemExit(f"the baseline failed: {per['none']['error']}")

    result = {"model": f"gsm8k-llama-{pre.get('size', args.target_size)}", "work_dir": str(work),
              "vocab_size": len(tok), "num_tokens": args.num_tokens, "max_new_tokens": args.max_new_tokens,
              "ignore_eos": args.ignore_eos, "batch_sizes": args.batch_sizes, "methods": methods,
              "pretrain": pre, "eagle_train": head,
              **summarize(per, ids, max(args.batch_sizes)), "runs": per, "phases_s": phases}
    record("spec", result)


if __name__ == "__main__":
    main()
