"""The reference GRPO trainer behind `gyre train`. It reads like the recipe it runs:

    model dir -> engine -> trainer policy (HF) -> [warm-up] -> rollout manager
    each step: batch of scored groups -> GRPO update -> push weights (version += 1) -> log -> checkpoint

One device, plain torch (the trainer side of FSDP2 / Megatron loops is gyre.trainers.adapters + hook).
"""

from __future__ import annotations

import copy
import json
import logging
import random
import time
from typing import Any

import torch

from gyre.engine.engine import Engine
from gyre.recipe import Recipe
from gyre.rollout.data import Batch
from gyre.rollout.manager import RolloutManager
from gyre.rollout.pool import LocalPool
from gyre.trainers.adapters.hf import HFAdapter
from gyre.trainers.grpo_loss import policy_loss, token_logprobs
from gyre.trainers.hook import WeightSyncHook
from gyre.trainers.run import RunDir, make_env_fn, make_stream, prepare_model, sft_warmup
from gyre.weight_sync.sender import WeightSender

log = logging.getLogger("gyre.train")


def train(recipe: Recipe, resume: bool = False, stop_after: int | None = None) -> list[dict[str, Any]]:
    """Runs the recipe; returns the metrics of the steps run. stop_after: stop after that many steps of
    this call (a simulated kill, for tests)."""
    cfg = recipe.trainer
    run = RunDir(recipe.logging, recipe)
    state = run.load_checkpoint() if resume else None
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    # -- model, engine, trainer policy -------------------------------------------------------------
    model_dir = prepare_model(recipe.model, run.path)
    engine = Engine(model_dir, seed=cfg.seed, **recipe.engine)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    policy.train()
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sender = WeightSender(engine, mode=recipe.weight_sync.mode, bucket_bytes=recipe.weight_sync.bucket_mb << 20,
                          disk_dir=run.path / "weights" if recipe.weight_sync.mode == "disk" else None)
    hook = WeightSyncHook(sender, HFAdapter(policy, dtype=engine.runner.dtype))
    version, start_step, data_pos = 0, 0, 0

    if state is not None:  # resume: policy, optimizer, RNG, data position, weight version
        policy.load_state_dict(state["policy"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["py_rng"])
        version, start_step, data_pos = state["version"], state["step"], state["data_pos"]
        hook.after_step(version)
        log.info("resumed at step %d (weight version %d)", start_step, version)
    elif recipe.warmup.steps > 0:
        sft_warmup(policy, engine.tokenizer, recipe, device)
        version += 1
        hook.after_step(version)

    ref = copy.deepcopy(policy).eval().requires_grad_(False) if cfg.kl_coef > 0 else None
    stream = make_stream(recipe.data, engine.tokenizer, data_pos)
    manager = RolloutManager(LocalPool([engine]), make_env_fn(recipe.data), stream, recipe.rollout)
    temperature = recipe.rollout.sampling.temperature

    # -- the RL loop ---------------------------------------------------------------------------------
    history = []
    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, initial=start_step, desc="train", unit="step", disable=not recipe.logging.progress)
    try:
        for step in range(start_step, cfg.steps):
            t0 = time.perf_counter()
            batch = manager.get_batch()
            if batch is None:
                break
            t1 = time.perf_counter()
            tensors = batch.to_tensors(pad_id=engine.tokenizer.pad_token_id or 0,
                                       normalize_std=cfg.normalize_advantage_std)
            update = grpo_update(policy, ref, opt, tensors, cfg, temperature, device)
            t2 = time.perf_counter()
            version += 1
            with manager.weight_update(version):
                hook.after_step(version)
            t3 = time.perf_counter()
            metrics = step_metrics(step + 1, version, batch, tensors, update, t1 - t0, t3 - t2, t2 - t1)
            run.log(metrics)
            history.append(metrics)
            log.info("step %d reward %.3f", step + 1, metrics["reward_mean"])
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", version=version)
            if run.should_checkpoint(step + 1, cfg):
                run.save_checkpoint(policy, opt, step + 1, version, stream.position)
            if stop_after is not None and len(history) >= stop_after:
                break
    finally:
        bar.close()
        manager.close()
        sender.close()
        engine.shutdown()
    run.finish()
    return history


def grpo_update(policy, ref, opt, t: dict[str, torch.Tensor], cfg, temperature: float, device) -> dict[str, float]:
    """One GRPO update on a padded batch (see gyre.trainers.grpo_loss for the loss)."""
    t = {k: v.to(device) for k, v in t.items()}
    ids, attn = t["input_ids"], t["attention_mask"]
    targets, mask = ids[:, 1:], t["loss_mask"][:, 1:].float()
    rollout_lp = t["logprobs"][:, 1:]
    adv = t["advantages"]
    mbs = max(1, cfg.micro_batch_size)
    chunks = [slice(i, i + mbs) for i in range(0, ids.shape[0], mbs)]

    def logprobs(model, sl: slice) -> torch.Tensor:
        logits = model(input_ids=ids[sl], attention_mask=attn[sl]).logits[:, :-1]
        return token_logprobs(logits, targets[sl], temperature)

    with torch.no_grad():
        old_lp = torch.cat([logprobs(policy, sl) for sl in chunks])
        ref_lp = torch.cat([logprobs(ref, sl) for sl in chunks]) if ref is not None else None
    total_tokens = mask.sum().clamp(min=1)
    stats: dict[str, float] = {}
    for _ in range(cfg.epochs):
        opt.zero_grad(set_to_none=True)
        for sl in chunks:
            out = policy_loss(logprobs(policy, sl), old_lp[sl], adv[sl], mask[sl], rollout_logp=rollout_lp[sl],
                              ref_logp=ref_lp[sl] if ref_lp is not None else None, clip_low=cfg.clip_low,
                              clip_high=cfg.clip_high, kl_coef=cfg.kl_coef, tis_cap=cfg.tis_cap, agg=cfg.loss_agg)
            weight = mask[sl].sum() / total_tokens if cfg.loss_agg == "token-mean" else (sl.stop - sl.start) / len(ids)
            (out.loss * weight).backward()
            for k, v in out.metrics.items():
                stats[k] = stats.get(k, 0.0) + v * float(weight)
        stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm))
        opt.step()
    diff = (old_lp - rollout_lp).abs() * mask
    stats["mismatch_mean_abs"] = float(diff.sum() / total_tokens)
    stats["mismatch_max_abs"] = float(diff.max())
    return stats


def step_metrics(step: int, version: int, batch: Batch, t: dict[str, torch.Tensor], update: dict[str, float],
                 rollout_s: float, sync_s: float, train_s: float) -> dict[str, Any]:
    rewards = t["rewards"]
    generated = int(t["loss_mask"].sum())
    return {
        "step": step,
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
        "weight_version": version,
        "sync_seconds": sync_s,
        "rollout_seconds": rollout_s,
        "train_seconds": train_s,
        "rollout_tokens_per_s": generated / max(rollout_s, 1e-9),
        "response_length_mean": float(t["response_lengths"].float().mean()),
        "num_samples": int(rewards.numel()),
        **{k: v for k, v in batch.metrics.items() if isinstance(v, (int, float))},
        **update,
    }


def metrics_to_json(m: dict[str, Any]) -> str:
    return json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in m.items()})

