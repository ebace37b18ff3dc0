"""The reference GRPO trainer behind `gyre train`. It reads like the recipe it runs:

    model dir -> [first EAGLE head] -> engine -> trainer policy (HF) -> [warm-up] -> rollout manager
    each step: batch of scored groups -> GRPO update -> push weights (version += 1) -> [refresh the EAGLE
    head on the last rollouts, every spec.refresh_every steps] -> log -> checkpoint

One process on one device, plain torch; or, under torch.distributed with world_size > 1 (torchrun, or
WORLD_SIZE in the env), FSDP2 data parallel:
    rank 0 alone owns the engine and the rollout manager; each step it broadcasts the batch tensors, every rank
    trains on its share of the rows (the loss normalised over the global batch, FSDP reduces the gradients),
    and every rank takes part in the bucketed gathers of the weight push (FSDPAdapter), which rank 0 sends.
    Checkpoints hold full (unsharded) state dicts, written by rank 0 and read by every rank on --resume.
trainer.forward = gyre trains gyre's own batch-invariant modules (gyre.trainers.training_forward): with
`engine: {deterministic: true}` the trainer's logprobs are the engine's, bit for bit (one process only).
"""

from __future__ import annotations

import copy
import logging
import os
import random
import time
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from gyre.engine.engine import Engine
from gyre.recipe import Recipe
from gyre.rollout.data import Batch
from gyre.rollout.manager import RolloutManager
from gyre.rollout.pool import LocalPool
from gyre.trainers.adapters.fsdp import FSDPAdapter
from gyre.trainers.adapters.hf import HFAdapter
from gyre.trainers.grpo_loss import policy_loss, token_logprobs
from gyre.trainers.hook import WeightSyncHook
from gyre.trainers.run import (
    DraftRefresher,
    RunDir,
    broadcast_object,
    init_distributed,
    make_env_fn,
    make_stream,
    padded_logprobs,
    prepare_model,
    sft_warmup,
    shard_model,
)
from gyre.weight_sync.sender import WeightSender

log = logging.getLogger("gyre.train")


def train(recipe: Recipe, resume: bool = False, stop_after: int | None = None) -> list[dict[str, Any]]:
    """Runs the recipe; returns the metrics of the steps run. stop_after: stop after that many steps of
    this call (a simulated kill, for tests)."""
    cfg = recipe.trainer
    rank, world_size, owns_group = init_distributed()
    is_main, dp = rank == 0, world_size > 1
    if dp and cfg.forward == "gyre":
        raise ValueError("trainer.forward=gyre trains on one process: run it without torch.distributed")
    if dp and recipe.spec.refreshes:
        raise ValueError("spec.refresh_every retrains the draft head on one process: run it without "
                         "torch.distributed")
    run = RunDir(recipe.logging, recipe, is_main=is_main)
    state = run.load_checkpoint() if resume else None
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    # -- model, engine (rank 0), trainer policy ----------------------------------------------------------
    engine = sender = manager = drafts = None
    if is_main:
        model_dir = prepare_model(recipe.model, run.path)
        if recipe.spec.refreshes:
            drafts = DraftRefresher(recipe.spec, run.path, seed=cfg.seed, device=cfg.device)
            drafts.bootstrap(model_dir, recipe)  # a first head when spec.draft_path is null
        draft_path = drafts.path if drafts is not None else recipe.spec.draft_path
        engine = Engine(model_dir, seed=cfg.seed, **recipe.engine, **recipe.spec.engine_fields(draft_path))
        engine_dtype = engine.runner.dtype
    if dp:
        model_dir, engine_dtype = broadcast_object((model_dir, engine_dtype) if is_main else None)
    device = _device(cfg.device, dp)
    if cfg.forward == "gyre":
        from gyre.trainers.training_forward import build_training_model

        # NOTE: in the engine's dtype: the logprobs are the engine's bit for bit only with its weights
        policy = build_training_model(model_dir, device=device, dtype=engine_dtype)
    else:
        from transformers import AutoModelForCausalLM

        policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
        policy.train()
    version, start_step, data_pos = 0, 0, 0
    if state is not None:  # resume: policy, optimizer (below), RNG, data position, weight version
        policy.load_state_dict(state["policy"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["py_rng"])
        version, start_step, data_pos = state["version"], state["step"], state["data_pos"]
    elif recipe.warmup.steps > 0:
        if is_main:  # data parallel: rank 0 warms up, shard_model hands its weights to every rank
            sft_warmup(policy, engine.tokenizer, recipe, device)
        version += 1
    ref = copy.deepcopy(policy).eval().requires_grad_(False) if cfg.kl_coef > 0 else None
    if dp:
        shard_model(policy)
        if ref is not None:
            shard_model(ref)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if state is not None:
        _load_optimizer(policy, opt, state, dp)
    if is_main:
        sender = WeightSender(
            engine,
            mode=recipe.weight_sync.mode,
            bucket_bytes=recipe.weight_sync.bucket_mb << 20,
            disk_dir=run.path / "weights" if recipe.weight_sync.mode == "disk" else None,
        )
    adapter = FSDPAdapter(policy, dtype=engine_dtype) if dp else HFAdapter(policy, dtype=engine_dtype)
    hook = WeightSyncHook(sender, adapter)
    if state is not None or recipe.warmup.steps > 0:
        hook.after_step(version)  # every rank (the FSDP gathers are collectives); rank 0 pushes
    if state is not None:
        log.info("resumed at step %d (weight version %d)", start_step, version)

    stream = make_stream(recipe.data, engine.tokenizer, data_pos) if is_main else None
    if is_main:
        manager = RolloutManager(LocalPool([engine]), make_env_fn(recipe.data), stream, recipe.rollout)
    temperature = recipe.rollout.sampling.temperature

    # -- the RL loop ---------------------------------------------------------------------------------
    history = []
    from tqdm import tqdm

    bar = tqdm(
        total=cfg.steps,
        initial=start_step,
        desc="train",
        unit="step",
        disable=not (recipe.logging.progress and is_main),
    )
    try:
        for step in range(start_step, cfg.steps):
            t0 = time.perf_counter()
            batch = tensors = None
            if is_main:
                batch = manager.get_batch()
                if batch is not None:
                    tensors = batch.to_tensors(
                        pad_id=engine.tokenizer.pad_token_id or 0, normalize_std=cfg.normalize_advantage_std
                    )
            if dp:
                tensors = broadcast_object(tensors)  # the whole batch; each rank trains on its share
            if tensors is None:
                break
            t1 = time.perf_counter()
            update = grpo_update(
                policy, ref, opt, tensors, cfg, temperature, device, rank=rank, world_size=world_size
            )
            t2 = time.perf_counter()
            version += 1
            with manager.weight_update(version) if is_main else nullcontext():
                hook.after_step(version)
            t3 = time.perf_counter()
            if is_main:
                metrics = step_metrics(step + 1, version, batch, tensors, update, t1 - t0, t3 - t2, t2 - t1)
                if drafts is not None:  # the head follows the weights just pushed
                    metrics.update(drafts.after_step(step + 1, batch, engine, lambda: _draft_target(
                        policy, cfg.forward, drafts, model_dir, adapter)))
                run.log(metrics)
                log.info("step %d reward %.3f", step + 1, metrics["reward_mean"])
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", version=version)
            else:
                metrics = {"step": step + 1, "weight_version": version, **update}
            history.append(metrics)
            if run.should_checkpoint(step + 1, cfg):
                _save_checkpoint(run, policy, opt, step + 1, version, stream, dp)
            if stop_after is not None and len(history) >= stop_after:
                break
    finally:
        bar.close()
        if is_main:
            manager.close()
            sender.close()
            engine.shutdown()
    if is_main:
        run.finish()
    if owns_group:
        dist.destroy_process_group()
    return history


def _draft_target(policy, forward: str, drafts: DraftRefresher, model_dir: str, adapter: HFAdapter):
    """The current policy as train_eagle takes it: the HF model itself, or an HF directory of its weights."""
    return policy if forward == "hf" else drafts.write_policy(model_dir, adapter.named_tensors())


def _device(name: str, dp: bool) -> torch.device:
    if dp and name == "auto" and torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank() % torch.cuda.device_count()))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device(
        "cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name)
    )


def _save_checkpoint(run: RunDir, policy, opt, step: int, version: int, stream, dp: bool) -> None:
    """Single process: the modules' own state dicts. Data parallel: full state dicts gathered on every rank
    (collectives), offloaded to the CPU on rank 0, which writes them; optimizer state keyed by parameter name."""
    if not dp:
        run.save_checkpoint(policy.state_dict(), opt.state_dict(), step, version, stream.position)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    policy_state = get_model_state_dict(policy, options=options)
    optim_state = get_optimizer_state_dict(policy, opt, options=options)
    if run.is_main:
        run.save_checkpoint(policy_state, optim_state, step, version, stream.position, optimizer_by_name=True)


def _load_optimizer(policy, opt, state: dict[str, Any], dp: bool) -> None:
    if not state.get("optimizer_by_name"):
        if dp:
            raise ValueError("this checkpoint was written by one process: resume it on one process")
        opt.load_state_dict(state["optimizer"])
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(policy, opt, state["optimizer"], options=StateDictOptions(full_state_dict=True))


def grpo_update(
    policy,
    ref,
    opt,
    t: dict[str, torch.Tensor],
    cfg,
    temperature: float,
    device,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, float]:
    """One GRPO update on a padded batch (see gyre.trainers.grpo_loss for the loss).

    world_size > 1 (FSDP2): every rank passes the whole batch and trains on its share of the rows; the loss is
    normalised over the whole batch, so the update is the single-process one up to reduction order."""
    num_samples = t["input_ids"].shape[0]
    total_tokens = t["loss_mask"][:, 1:].float().sum().clamp(min=1).to(device)
    if world_size > 1:
        t = data_parallel_share(t, rank, world_size)
    t = {k: v.to(device) for k, v in t.items()}
    ids, attn = t["input_ids"], t["attention_mask"]
    targets, mask = ids[:, 1:], t["loss_mask"][:, 1:].float()
    rollout_lp = t["logprobs"][:, 1:]
    adv = t["advantages"]
    mbs = max(1, cfg.micro_batch_size)
    # NOTE: exact stops: a seq-mean micro-batch weighs as many rows as it has
    chunks = [slice(i, min(i + mbs, ids.shape[0])) for i in range(0, ids.shape[0], mbs)]

    def logprobs(model, sl: slice) -> torch.Tensor:  # [b, T-1]
        if cfg.forward == "gyre":
            return padded_logprobs(model, ids[sl], attn[sl], temperature)
        logits = model(input_ids=ids[sl], attention_mask=attn[sl]).logits[:, :-1]
        return token_logprobs(logits, targets[sl], temperature)

    with torch.no_grad():
        old_lp = torch.cat([logprobs(policy, sl) for sl in chunks])
        ref_lp = torch.cat([logprobs(ref, sl) for sl in chunks]) if ref is not None else None
    stats: dict[str, float] = {}
    for _ in range(cfg.epochs):
        opt.zero_grad(set_to_none=True)
        for sl in chunks:
            out = policy_loss(
                logprobs(policy, sl),
                old_lp[sl],
                adv[sl],
                mask[sl],
                rollout_logp=rollout_lp[sl],
                ref_logp=ref_lp[sl] if ref_lp is not None else None,
                clip_low=cfg.clip_low,
                clip_high=cfg.clip_high,
                kl_coef=cfg.kl_coef,
                tis_cap=cfg.tis_cap,
                agg=cfg.loss_agg,
            )
            weight = (
                mask[sl].sum() / total_tokens
                if cfg.loss_agg == "token-mean"
                else (sl.stop - sl.start) / num_samples
            )
            # NOTE: FSDP averages the gradients over ranks; the loss is already a share of the global one
            (out.loss * weight * world_size if world_size > 1 else out.loss * weight).backward()
            for k, v in out.metrics.items():
                stats[k] = stats.get(k, 0.0) + v * float(weight)
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
        stats["grad_norm"] = float(grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm)
        opt.step()
    diff = (old_lp - rollout_lp).abs() * mask
    if world_size > 1:  # each rank's stats are its share of the global sums
        keys = sorted(k for k in stats if k != "grad_norm")
        sums = torch.tensor([stats[k] for k in keys] + [float(diff.sum())], dtype=torch.float64)
        peak = diff.max().detach().float().cpu().reshape(1)
        if dist.get_backend() == "nccl":
            sums, peak = sums.to(device), peak.to(device)
        dist.all_reduce(sums)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        stats.update(zip(keys, sums[:-1].tolist()))
        stats["mismatch_mean_abs"] = float(sums[-1] / total_tokens.double())
        stats["mismatch_max_abs"] = float(peak)
        return stats
    stats["mismatch_mean_abs"] = float(diff.sum() / total_tokens)
    stats["mismatch_max_abs"] = float(diff.max())
    return stats


def data_parallel_share(t: dict[str, torch.Tensor], rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s contiguous share of the rows. The batch is first padded to a multiple of world_size with
    copies of row 0 that train on no token, so that every rank runs the same number of FSDP forwards."""
    num_rows = t["input_ids"].shape[0]
    pad = -num_rows % world_size
    if pad:
        filler = {k: v[:1].expand(pad, *v.shape[1:]).clone() for k, v in t.items()}
        filler["loss_mask"].zero_()
        filler["advantages"].zero_()
        t = {k: torch.cat([v, filler[k]]) for k, v in t.items()}
    share = (num_rows + pad) // world_size
    return {k: v[rank * share : (rank + 1) * share] for k, v in t.items()}


def step_metrics(
    step: int,
    version: int,
    batch: Batch,
    t: dict[str, torch.Tensor],
    update: dict[str, float],
    rollout_s: float,
    sync_s: float,
    train_s: float,
) -> dict[str, Any]:
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
