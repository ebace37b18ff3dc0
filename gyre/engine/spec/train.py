"""Training an EAGLE draft head (gyre.engine.spec.eagle) against a frozen target.

With the target's final hidden states h (the lm_head's input) over tokens x, at each position p:
    f_p = norm(layer(fc([embed(x_{p+1}), h_p])))                  the head's guess of h_{p+1}
    loss = smooth_l1(f_p, h_{p+1}) + 0.1 * CE(lm_head(f_p), softmax(lm_head(h_{p+1})))
The label of the CE is the target's own next-token distribution, not the data's next token: the head
imitates the current target (on-policy), which is what acceptance measures. `accuracy` (argmax of both
agree) is the acceptance proxy. The training module is plain differentiable torch (transformers' Llama
decoder layer, causal over the sequence) whose parameter names are the save format's, so its state dict is
the head's model.safetensors; gyre's serving kernels are never differentiated.

Data (`load_token_data`): a .txt file holds documents separated by blank lines; a .jsonl file holds one row
per line with "token_ids", "prompt_ids" + "output_ids" (rollout logs, `gyre generate` output), "text", or
"question" + "answer" (GSM8K, rendered as a user / assistant chat when the tokenizer has a template).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gyre.engine.spec.eagle import ARCH, eagle_config

log = logging.getLogger("gyre.spec")

CE_WEIGHT = 0.1  # of the distribution loss against the feature loss, as in EAGLE
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ROW_KEYS = "'token_ids', 'prompt_ids' + 'output_ids', 'text', or 'question' + 'answer'"


# -- data ---------------------------------------------------------------------------------------------


def load_token_data(path: str | os.PathLike, tokenizer: Any = None,
                    max_len: int | None = None) -> list[list[int]]:
    """Token id sequences of a .txt or .jsonl file (module docstring), each cut to its first max_len tokens;
    sequences of fewer than 2 tokens are dropped. tokenizer: an HF tokenizer or a directory holding one
    (only text rows need it)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r}: no such data file")
    tok = _Tokenizer(tokenizer)
    suffix = path.suffix.lower()
    if suffix == ".txt":
        blocks = re.split(r"\n\s*\n", path.read_text())
        docs = [tok.encode(b.strip()) for b in blocks if b.strip()]
    elif suffix == ".jsonl":
        docs = []
        with open(path) as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i + 1}: not JSON: {e}") from None
                docs.append(_row_ids(row, tok, f"{path}:{i + 1}"))
    else:
        raise ValueError(f"{path}: unknown data format {suffix!r}: expected .txt (documents separated by "
                         f"blank lines) or .jsonl (rows with {_ROW_KEYS})")
    if max_len is not None:
        docs = [d[:max_len] for d in docs]
    docs = [d for d in docs if len(d) >= 2]
    if not docs:
        raise ValueError(f"{path}: no sequence of 2 tokens or more")
    return docs


class _Tokenizer:
    """Loaded on the first text to encode."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer

    def get(self) -> Any:
        if self._tok is None:
            raise ValueError("text data needs a tokenizer (token id rows do not)")
        if isinstance(self._tok, (str, os.PathLike)):
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(self._tok)
        return self._tok

    def encode(self, text: str) -> list[int]:
        return self.get().encode(text, add_special_tokens=False)  # as the engine encodes text prompts

    def chat(self, question: str, answer: str) -> list[int]:
        tok = self.get()
        if not getattr(tok, "chat_template", None):
            return self.encode(f"{question}\n{answer}")
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        return self.encode(tok.apply_chat_template(messages, tokenize=False))


def _row_ids(row: Any, tok: _Tokenizer, where: str) -> list[int]:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "token_ids" in row:
        ids = row["token_ids"]
    elif "prompt_ids" in row and "output_ids" in row:
        ids = list(row["prompt_ids"]) + list(row["output_ids"])
    elif "text" in row:
        return tok.encode(str(row["text"]))
    elif "question" in row and "answer" in row:
        return tok.chat(str(row["question"]), str(row["answer"]))
    else:
        raise ValueError(f"{where}: a row needs {_ROW_KEYS}; got keys {sorted(row)}")
    if not isinstance(ids, list) or not all(type(t) is int and t >= 0 for t in ids):
        raise ValueError(f"{where}: token ids must be a list of non-negative integers")
    return ids


# -- the training-side head ---------------------------------------------------------------------------------


class EagleTrainModule(nn.Module):
    """EagleHead as a differentiable module over padded batches; state dict = the save format's names."""

    def __init__(self, cfg: Any) -> None:
        from transformers.models.llama.modeling_llama import (
            LlamaDecoderLayer,
            LlamaRMSNorm,
            LlamaRotaryEmbedding,
        )

        super().__init__()
        cfg = copy.deepcopy(cfg)
        cfg._attn_implementation = "sdpa"  # NOTE: causal without a mask (the default "eager" would not be)
        h = cfg.hidden_size
        self.fc = nn.Linear(2 * h, h, bias=False)
        self.layer = LlamaDecoderLayer(cfg, layer_idx=0)
        self.norm = LlamaRMSNorm(h, eps=cfg.rms_norm_eps)
        self.rotary = LlamaRotaryEmbedding(cfg)  # non-persistent buffers: not in the state dict

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """embeds [B, T, H] (of x_{p+1}), hidden [B, T, H] (h_p), positions [B, T] (p) -> features [B, T, H].
        Causal over T: right padding never reaches the real positions before it."""
        x = self.fc(torch.cat([embeds, hidden], dim=-1))
        x = self.layer(x, position_ids=positions, position_embeddings=self.rotary(x, positions))
        return self.norm(x)


def save_head(module: EagleTrainModule, cfg: Any, path: str | os.PathLike, dtype: torch.dtype) -> None:
    """The save format of gyre.engine.spec.eagle: config.json (eagle_config) + model.safetensors."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    cfg.save_pretrained(path)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in module.state_dict().items()}
    tmp = os.path.join(path, "model.safetensors.tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(path, "model.safetensors"))  # a reader never sees half a file


def _load_head(module: EagleTrainModule, path: str | os.PathLike) -> None:
    from safetensors.torch import load_file

    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"init_from {str(path)!r} is not an EAGLE head directory (no config.json)")
    with open(cfg_path) as f:
        archs = json.load(f).get("architectures") or []
    if ARCH not in archs:
        raise ValueError(f"init_from {str(path)!r} holds {archs}, not a {ARCH}")
    tensors = load_file(os.path.join(path, "model.safetensors"))
    own = module.state_dict()
    unknown, missing = sorted(set(tensors) - set(own)), sorted(set(own) - set(tensors))
    if unknown or missing:
        raise ValueError(f"init_from {str(path)!r}: unknown {unknown[:5]}, missing {missing[:5]}")
    for name, t in tensors.items():
        if t.shape != own[name].shape:
            raise ValueError(f"init_from {str(path)!r}: {name} has shape {tuple(t.shape)}, the target needs "
                             f"{tuple(own[name].shape)} (a head of another model?)")
    module.load_state_dict(tensors)


# -- training -----------------------------------------------------------------------------------------------


def train_eagle(target: str | os.PathLike | nn.Module, data: str | os.PathLike | list[list[int]],
                out_path: str | os.PathLike, *, steps: int, batch_size: int = 8, seq_len: int = 512,
                lr: float = 1e-3, device: str = "auto", dtype: str = "auto",
                init_from: str | os.PathLike | None = None, log_every: int = 50,
                seed: int = 0) -> dict[str, Any]:
    """Train an EAGLE head for `target` (an HF model directory, or a loaded HF causal LM such as a trainer's
    policy: used as it is, on its device, never changed) on `data` (token id sequences, or a file for
    load_token_data), write it to out_path, and return {"loss", "accuracy" (means over the last log_every
    steps), "loss_first" (the first step's), "steps", "tokens", "seconds"}. Sequences longer than seq_len
    are cut into seq_len windows, each run through the target on its own. init_from: warm-start from a
    head directory. The global RNG state is left as it was."""
    if steps < 1 or batch_size < 1 or seq_len < 2 or log_every < 1:
        raise ValueError("steps, batch_size and log_every must be >= 1 and seq_len >= 2")
    start = time.perf_counter()
    dev = _target_device(target, device)
    compute = _resolve_dtype(dtype, dev)
    cuda = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):  # NOTE: loading and training leave a trainer's RNG alone
        torch.manual_seed(seed)
        model = _load_target(target, dev, compute)
        if isinstance(data, (str, os.PathLike)):
            tokenizer = model.config.name_or_path if isinstance(target, nn.Module) else target
            data = load_token_data(data, tokenizer)
        windows = [d[i:i + seq_len] for d in data for i in range(0, len(d), seq_len) if len(d) - i >= 2]
        if not windows:
            raise ValueError("no training sequence of 2 tokens or more")
        if max(max(w) for w in windows) >= model.config.vocab_size:
            raise ValueError(f"token ids must be < the target's vocab_size {model.config.vocab_size}")
        cfg = eagle_config(model.config)
        head = EagleTrainModule(cfg).to(dev)  # float32 master weights
        if init_from is not None:
            _load_head(head, init_from)
        opt = torch.optim.AdamW(head.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(seed)
        losses, accs, tokens = [], [], 0
        was_training = model.training
        model.eval()
        try:
            for step in range(steps):
                picks = torch.randint(len(windows), (batch_size,), generator=gen).tolist()
                loss, acc, n = _step(model, head, [windows[i] for i in picks], dev, compute)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
                opt.step()
                losses.append(float(loss.detach()))
                accs.append(acc)
                tokens += n
                if (step + 1) % log_every == 0 or step + 1 == steps:
                    log.info("draft step %d loss %.4f accuracy %.3f", step + 1, losses[-1], acc)
        finally:
            model.train(was_training)
    save_head(head, cfg, out_path, compute)
    recent = slice(-min(log_every, steps), None)
    return {"loss": _mean(losses[recent]), "accuracy": _mean(accs[recent]), "loss_first": losses[0],
            "steps": steps, "tokens": tokens, "seconds": time.perf_counter() - start}


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _step(model: nn.Module, head: EagleTrainModule, rows: list[list[int]], dev: torch.device,
          compute: torch.dtype) -> tuple[torch.Tensor, float, int]:
    """Loss, top-1 agreement and trained positions of one batch of token rows (right-padded). compute:
    float32, or the autocast dtype."""
    def amp():
        if compute == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(dev.type, dtype=compute)

    lens = torch.tensor([len(r) for r in rows])
    t = int(lens.max())
    ids = torch.zeros(len(rows), t, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = torch.tensor(r)
    ids = ids.to(dev)
    attn = (torch.arange(t)[None, :] < lens[:, None]).to(dev)
    valid = torch.arange(t - 1)[None, :] < (lens - 1)[:, None]  # [B, T-1]: positions p with an h_{p+1}
    valid = valid.to(dev)
    positions = torch.arange(t - 1, device=dev).expand(len(rows), -1)
    lm_head = model.get_output_embeddings()
    # NOTE: detached: a trainer's policy gets no gradient from here
    weight = lm_head.weight.detach() if compute != torch.float32 else lm_head.weight.detach().float()
    bias = lm_head.bias.detach().to(weight.dtype) if getattr(lm_head, "bias", None) is not None else None
    with torch.no_grad(), amp():
        hidden = model.base_model(input_ids=ids, attention_mask=attn).last_hidden_state.float()  # [B, T, H]
        embeds = model.get_input_embeddings()(ids[:, 1:]).float()  # [B, T-1, H]
        target = hidden[:, 1:][valid]  # [N, H]: h_{p+1}
        target_logits = F.linear(target, weight, bias).float()  # [N, V]
        target_probs = target_logits.softmax(-1)
    with amp():
        feats = head(embeds, hidden[:, :-1], positions)[valid].float()  # [N, H]
        logits = F.linear(feats, weight, bias).float()  # [N, V]
    loss = F.smooth_l1_loss(feats, target) + CE_WEIGHT * F.cross_entropy(logits, target_probs)
    acc = float((logits.argmax(-1) == target_logits.argmax(-1)).float().mean())
    if not math.isfinite(float(loss.detach())):
        raise FloatingPointError(f"EAGLE head training diverged (loss {float(loss.detach())}): lower the lr")
    return loss, acc, int(valid.sum())


def _target_device(target: str | os.PathLike | nn.Module, device: str) -> torch.device:
    if isinstance(target, nn.Module):
        return next(target.parameters()).device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def _load_target(target: str | os.PathLike | nn.Module, dev: torch.device, dtype: torch.dtype) -> nn.Module:
    if isinstance(target, nn.Module):
        return target
    from transformers import AutoModelForCausalLM

    if not os.path.isfile(os.path.join(target, "config.json")):
        raise FileNotFoundError(f"{str(target)!r} is not an HF model directory (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype)
    return model.to(dev).eval().requires_grad_(False)


def _resolve_dtype(dtype: str, dev: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if dev.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be auto | {' | '.join(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]
