"""What a training run needs besides the update: its directory (metrics, checkpoints, plot), the model
directory, the task stream, the environment, and the supervised warm-up."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from gyre.recipe import DataSection, LoggingSection, ModelSection, Recipe, SpecSection
from gyre.trainers import tasks

log = logging.getLogger("gyre.train")


class RunDir:
    """runs/<name>/: recipe.json, metrics.jsonl (one line per step), checkpoint.pt, reward.png.
    Under torch.distributed, rank 0 alone writes (is_main); the other ranks only read the checkpoint."""

    def __init__(self, cfg: LoggingSection, recipe: Recipe, is_main: bool = True) -> None:
        self.cfg = cfg
        self.is_main = is_main
        self.path = Path(cfg.run_dir) / cfg.name
        self.metrics_path = self.path / "metrics.jsonl"
        self.ckpt_path = self.path / "checkpoint.pt"
        self.wandb = None
        if not is_main:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "recipe.json").write_text(json.dumps(dataclasses.asdict(recipe), indent=1, default=str))
        if cfg.wandb:
            try:
                from gyre.rollout.metrics import WandbLogger

                self.wandb = WandbLogger(
                    project="gyre",
                    mode=cfg.wandb_mode,
                    dir=str(self.path),
                    name=cfg.name,
                    config=dataclasses.asdict(recipe),
                )
            except ImportError:
                log.warning("wandb is not installed: logging to metrics.jsonl only")

    def log(self, metrics: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.wandb is not None:
            self.wandb.log(
                {k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=metrics["step"]
            )

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def should_checkpoint(self, step: int, cfg) -> bool:
        return cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0 or step == cfg.steps

    def save_checkpoint(
        self, policy_state: dict, optim_state: dict, step: int, version: int, data_pos: int, **extra: Any
    ) -> None:
        state = {
            "policy": policy_state,
            "optimizer": optim_state,
            "step": step,
            "version": version,
            "data_pos": data_pos,
            "torch_rng": torch.get_rng_state(),
            "py_rng": random.getstate(),
            **extra,
        }
        tmp = self.ckpt_path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.ckpt_path)  # atomic: a kill never leaves a half-written checkpoint

    def load_checkpoint(self) -> dict[str, Any]:
        if not self.ckpt_path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {self.ckpt_path}")
        state = torch.load(self.ckpt_path, weights_only=False)
        if not self.is_main:
            return state
        # steps logged after the checkpoint are redone: drop their lines
        kept = [m for m in self.read_metrics() if m["step"] <= state["step"]]
        self.metrics_path.write_text("".join(json.dumps(m) + "\n" for m in kept))
        return state

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
        if self.cfg.plot:
            plot_rewards(self.read_metrics(), self.path / "reward.png")


def plot_rewards(metrics: list[dict[str, Any]], out: Path) -> None:
    if not metrics:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no reward plot")
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([m["step"] for m in metrics], [m["reward_mean"] for m in metrics], marker="o", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def prepare_model(cfg: ModelSection, run_path: Path) -> str:
    if cfg.path is not None:
        return cfg.path
    from gyre.testing import tiny_model

    path = run_path / f"model-{cfg.tiny}"
    if not (path / "config.json").exists():
        tiny_model(cfg.tiny, path, seed=cfg.seed, **cfg.tiny_overrides)
    return str(path)


class Stream:
    """An index-addressable task stream that remembers its position (for checkpoints)."""

    def __init__(self, it: Iterator[dict[str, Any]], start: int) -> None:
        self._it = it
        self.position = start

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> dict[str, Any]:
        task = next(self._it)
        self.position = task["index"] + 1
        return task


def make_stream(cfg: DataSection, tokenizer: Any, start: int) -> Stream:
    if cfg.task == "arith":
        return Stream(tasks.arith_stream(cfg.seed, start, cfg.max_operand, tokenizer), start)
    return Stream(tasks.cycle_stream(tasks.gsm8k_rows(cfg.path), cfg.seed, start), start)


def make_env_fn(cfg: DataSection) -> Callable[[], Any]:
    reward = tasks.arith_reward if cfg.task == "arith" else _math_reward
    if cfg.env == "single_turn":
        from gyre.rollout.env import SingleTurnEnv

        return lambda: SingleTurnEnv(reward, cfg.system_prompt)
    if cfg.env == "tool":
        from gyre.rollout.tools import ToolEnv

        return lambda: ToolEnv([calculator], reward, cfg.system_prompt, max_turns=3, max_tokens=256)
    from gyre.rollout.multi_agent import SolverVerifierEnv

    return lambda: SolverVerifierEnv(max_rounds=1, max_tokens=256)


def _math_reward(text: str, task: dict[str, Any]) -> float:
    from gyre.rollout.rewards import math_reward

    return math_reward(text, task)


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression with + - * / and parentheses."""
    import ast
    import operator

    ops = {
        ast.Add: operator.add,
        ast.Sub: operator.sub,
        ast.Mult: operator.mul,
        ast.Div: operator.truediv,
        ast.USub: operator.neg,
    }

    def ev(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            return ops[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in ops:
            return ops[type(node.op)](ev(node.operand))
        raise ValueError(f"unsupported expression: {expression!r}")

    value = ev(ast.parse(expression, mode="eval").body)
    return str(int(value)) if float(value).is_integer() else str(value)


def sft_warmup(policy, tokenizer: Any, recipe: Recipe, device: torch.device) -> None:
    """Supervised steps on the task's reference answers (prompt tokens masked out); an HF policy or, with
    trainer.forward = gyre, a gyre training model."""
    cfg = recipe.warmup
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr)
    stream = make_stream(recipe.data, tokenizer, start=10_000_000)  # disjoint from the RL prompts
    for step in range(cfg.steps):
        rows = [reference_ids(next(stream), tokenizer) for _ in range(cfg.batch_size)]
        length = max(len(p) + len(a) for p, a in rows)
        ids = torch.zeros(len(rows), length, dtype=torch.long)
        attn = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for i, (p, a) in enumerate(rows):
            n = len(p) + len(a)
            ids[i, :n] = torch.tensor(p + a)
            attn[i, :n] = 1
            labels[i, len(p) : n] = torch.tensor(a)
        if recipe.trainer.forward == "gyre":
            logp = padded_logprobs(policy, ids.to(device), attn.to(device), 1.0)  # [B, T-1]
            answer = (labels[:, 1:] != -100).to(device, logp.dtype)
            loss = -(logp * answer).sum() / answer.sum()
        else:
            loss = policy(
                input_ids=ids.to(device), attention_mask=attn.to(device), labels=labels.to(device)
            ).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        if (step + 1) % 50 == 0:
            log.info("warm-up step %d loss %.3f", step + 1, float(loss))


def reference_ids(task: dict[str, Any], tokenizer: Any) -> tuple[list[int], list[int]]:
    """(prompt ids, reference answer ids + eos) of a task."""
    prompt = task["prompt"]
    if not isinstance(prompt, list):
        prompt = tokenizer.encode(prompt, add_special_tokens=False)
    return prompt, tokenizer.encode(task["answer"], add_special_tokens=False) + [tokenizer.eos_token_id]


class DraftRefresher:
    """spec.refresh_every > 0: the EAGLE head follows the policy.

    The token ids (prompt + response) of every step's samples are kept; every refresh_every steps the head
    is retrained on them against the current policy (spec.refresh_steps steps, warm-started from the head in
    use), written to runs/<name>/draft/step-<N> and loaded into the engine. With spec.draft_path null,
    `bootstrap` trains a first head before the engine starts, on the task's prompts + reference answers
    against the starting weights. A resumed run starts from the newest head written."""

    def __init__(self, cfg: SpecSection, run_path: Path, seed: int, device: str = "auto") -> None:
        self.cfg = cfg
        self.root = run_path / "draft"
        self.seed = seed
        self.device = device
        self.tokens: list[list[int]] = []
        written = sorted(self.root.glob("step-*/model.safetensors"), key=lambda p: int(p.parent.name[5:]))
        self.path: str | None = str(written[-1].parent) if written else cfg.draft_path  # the head in use

    def bootstrap(self, model_dir: str, recipe: Recipe, num_tasks: int = 256) -> dict[str, float]:
        if self.path is not None:
            return {}
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        stream = make_stream(recipe.data, tokenizer, start=20_000_000)  # disjoint from RL and warm-up tasks
        docs = [sum(reference_ids(next(stream), tokenizer), []) for _ in range(num_tasks)]
        return self.retrain(model_dir, docs, step=0)

    def after_step(self, step: int, batch, engine, target: Callable[[], Any]) -> dict[str, float]:
        """Keep the step's rollouts; on a refresh step retrain against target() (the policy: an HF model or
        directory) and load the new head into the engine. Returns the refresh's metrics, or {}."""
        self.tokens.extend(s.token_ids for s in batch.samples)
        if step % self.cfg.refresh_every or not self.tokens:
            return {}
        start = time.perf_counter()
        docs, self.tokens = self.tokens, []
        metrics = self.retrain(target(), docs, step)
        engine.load_draft(self.path)
        metrics["spec_refresh_seconds"] = time.perf_counter() - start
        return metrics

    def retrain(self, target: Any, docs: list[list[int]], step: int) -> dict[str, float]:
        from gyre.engine.spec.train import train_eagle

        out = self.root / f"step-{step}"
        res = train_eagle(target, docs, out, steps=self.cfg.refresh_steps, init_from=self.path,
                          device=self.device, seed=self.seed + step, log_every=self.cfg.refresh_steps)
        old, self.path = self.path, str(out)
        if old is not None and old != self.path and Path(old).parent == self.root:
            shutil.rmtree(old, ignore_errors=True)  # only heads this run wrote; the engine holds the new one
        log.info("draft head refreshed at step %d: loss %.4f -> %.4f, accuracy %.3f",
                 step, res["loss_first"], res["loss"], res["accuracy"])
        return {"spec_refresh_loss_first": res["loss_first"], "spec_refresh_loss": res["loss"],
                "spec_refresh_accuracy": res["accuracy"], "spec_refresh_tokens": res["tokens"],
                "spec_refresh_seconds": res["seconds"]}

    def write_policy(self, model_dir: str, named_tensors) -> str:
        """An HF directory of the policy's named HF-format tensors (for a policy that is not an HF model)."""
        from safetensors.torch import save_file

        path = self.root / "policy"
        path.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(model_dir) / "config.json", path / "config.json")
        tensors = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in named_tensors}
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        return str(path)


def padded_logprobs(model, ids: torch.Tensor, attn: torch.Tensor, temperature: float) -> torch.Tensor:
    """The HF-style [B, T-1] logprobs of targets ids[:, 1:] from a gyre training model: the right-padded rows
    are packed whole (training_forward.token_logprobs), 0 at padding. Differentiable."""
    from gyre.trainers.training_forward import token_logprobs

    lens = attn.sum(1).tolist()  # rows are right-padded: row b is ids[b, :lens[b]]
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    flat = token_logprobs(model, torch.cat([ids[b, :n] for b, n in enumerate(lens)]), cu, temperature)  # [N]
    rows = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens) - 1).to(flat.device)
    cols = torch.cat([torch.arange(n - 1) for n in lens]).to(flat.device)
    src = torch.cat([torch.arange(a + 1, b) for a, b in zip(cu, cu[1:])]).to(flat.device)  # token i given < i
    return flat.new_zeros(ids.shape[0], ids.shape[1] - 1).index_put((rows, cols), flat[src])


# -- data parallel (FSDP2) ---------------------------------------------------------------------------------


def init_distributed() -> tuple[int, int, bool]:
    """(rank, world_size, initialised here): joins a group the caller (torchrun) set up, or sets one up from
    the env (WORLD_SIZE > 1: nccl with CUDA, else gloo)."""
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return dist.get_rank(), dist.get_world_size(), True
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    return 0, 1, False


def broadcast_object(obj: Any) -> Any:
    """rank 0's obj on every rank (pickled)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard_model(model: torch.nn.Module) -> None:
    """FSDP2: each decoder layer, then the root (embedding, final norm, head). Every rank first takes rank 0's
    weights, so that ranks that built or warmed up the model on their own start from the same policy."""
    from torch.distributed.fsdp import fully_shard

    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src=0)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
