"""The training forward of true on-policy RL: gyre's own model modules, trainable, computing per-token
logprobs bit for bit equal to those of an `Engine(..., deterministic=True)` with the same weights.

Both run the batch-invariant ops of gyre.kernels.batch_invariant (the forward of each autograd op is the
engine's computation, its backward ordinary torch math), so a token's logprob does not depend on how
the trainer packs its batch any more than on how the engine batched it::

    model = build_training_model(path, device="cuda", dtype=torch.bfloat16)
    engine = Engine(path, deterministic=True)
    outs = engine.generate(prompts, SamplingParams(temperature=1.0, ...))
    seqs = [o.prompt_ids + o.output_ids for o in outs]
    logp = sequence_logprobs(model, seqs, temperature=1.0)   # [len - 1] each, with grad
    # logp[i][len(prompt) - 1:] == outs[i].output_logprobs, bit for bit
    loss = policy_loss(...); loss.backward(); optimizer.step()
    engine.update_weights(hf_named_tensors(model))            # the engine follows the trainer

NOTE: the equality holds for the weights as the engine holds them: train in the engine's dtype (or cast
the master weights to it for the forward and for the push), with tp_size = ep_size = 1, and build the
model on its device (the rotary tables are computed there, as the engine computes them).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from gyre.engine.deterministic import make_batch_invariant
from gyre.engine.model_runner import ForwardContext, resolve_dtype
from gyre.engine.models import model_class
from gyre.engine.weights import load_checkpoint
from gyre.kernels import batch_invariant as bi


@dataclass
class PackedSequences:
    """Whole sequences back to back: sequence b is rows cu_seqlens[b]:cu_seqlens[b+1] (no KV cache)."""

    cu_seqlens: torch.Tensor  # [B+1] int32, on the model's device
    lens: list[int]


class PackedAttention:
    """Attention backend of the training forward: causal within each packed sequence, no cache."""

    def forward(self, q, k, v, layer_id, scale, meta: PackedSequences):
        return bi.varlen_attention(q, k, v, meta.cu_seqlens, meta.lens, scale)


def build_training_model(
    source: str | os.PathLike | nn.Module | Iterable[tuple[str, torch.Tensor]],
    hf_config=None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
) -> nn.Module:
    """A trainable gyre model on the batch-invariant ops (parameters require grad, train mode).

    source: an HF model directory, a gyre model (e.g. `engine.runner.model`; its weights are copied) or
    HF-named tensors (then hf_config is required). dtype: the engine's dtype ("auto": bfloat16 on CUDA,
    float32 on the CPU, as the engine resolves it); None keeps the source model's dtype or means "auto"."""
    from transformers import AutoConfig

    device = torch.device(device)
    if isinstance(source, nn.Module):
        hf_config = source.config
        dtype = dtype or next(source.parameters()).dtype
    elif isinstance(source, (str, os.PathLike)):
        hf_config = hf_config or AutoConfig.from_pretrained(source)
    elif hf_config is None:
        raise ValueError("build_training_model from named tensors needs hf_config")
    if dtype is None or isinstance(dtype, str):
        dtype = resolve_dtype(dtype or "auto", device)
    with torch.device(device):
        model = model_class(hf_config)(hf_config, dtype)
    if isinstance(source, nn.Module):
        with torch.no_grad():
            ours = dict(model.named_parameters())
            for name, p in source.named_parameters():
                ours[name].copy_(p)
    elif isinstance(source, (str, os.PathLike)):
        load_checkpoint(model, source)
    else:
        model.load_weights(source)
    for p in model.parameters():
        p.requires_grad_(True)
    make_batch_invariant(model)
    return model.train()


def hf_named_tensors(
    model: nn.Module, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's weights as HF checkpoint tensors (fused projections split): `engine.update_weights`.

    Under FSDP2 (`fully_shard`) each parameter is gathered in turn (one full parameter at a time):
    every rank must call this and iterate it to the end, in step; all ranks get the full tensors."""
    from torch.distributed.tensor import DTensor

    from gyre.trainers.adapters.hf import HFAdapter

    if any(isinstance(p, DTensor) for p in model.parameters()):
        model = _FullParameters(model)
    return HFAdapter(model, dtype).named_tensors()


class _FullParameters:
    """A sharded gyre model seen whole: named_parameters() gathers each DTensor when it is reached.
    NOTE: not an nn.Module (HFAdapter only reads named_parameters and the model's attributes)."""

    def __init__(self, model: nn.Module) -> None:
        self._model = model

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def named_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        from torch.distributed.tensor import DTensor

        for name, p in self._model.named_parameters():
            yield name, p.detach().full_tensor() if isinstance(p, DTensor) else p


def token_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    cu_seqlens: torch.Tensor | Sequence[int],
    temperature: float = 1.0,
) -> torch.Tensor:
    """Packed whole sequences -> logprobs [T] float32 aligned with input_ids: entry i is
    log_softmax(logits / T')[input_ids[i]] given the tokens of its sequence before it (T' = temperature,
    or 1 when <= 0, as the engine reports), 0 at each sequence's first token. Differentiable.

    input_ids [T] int64, sequence b at rows cu_seqlens[b]:cu_seqlens[b+1] (positions restart at 0)."""
    device = next(model.parameters()).device
    cu = [int(c) for c in cu_seqlens]
    lens = [b - a for a, b in zip(cu, cu[1:])]
    if any(n < 1 for n in lens) or cu[0] != 0 or cu[-1] != input_ids.shape[0]:
        raise ValueError(
            f"cu_seqlens {cu} does not partition {input_ids.shape[0]} tokens into non-empty sequences"
        )
    input_ids = input_ids.to(device)
    positions = torch.cat([torch.arange(n) for n in lens]).to(device)
    meta = PackedSequences(torch.tensor(cu, dtype=torch.int32, device=device), lens)
    hidden = model(input_ids, positions, ForwardContext(PackedAttention(), meta))  # [T, H]
    is_last = torch.zeros(len(input_ids), dtype=torch.bool, device=device)
    is_last[torch.tensor(cu[1:], device=device) - 1] = True
    rows = torch.nonzero(~is_last).squeeze(1)  # every token that has a next token in its sequence
    logits = model.compute_logits(hidden.index_select(0, rows))  # [N, V] float32
    temps = torch.full((len(rows),), float(temperature), dtype=torch.float32, device=device)
    chosen = bi.token_logprobs(logits, input_ids[rows + 1], temps)
    out = torch.zeros(len(input_ids), dtype=chosen.dtype, device=device)
    return out.index_put((rows + 1,), chosen)


def sequence_logprobs(
    model: nn.Module, seqs: Sequence[Sequence[int]], temperature: float = 1.0
) -> list[torch.Tensor]:
    """Per sequence [len - 1]: entry i is the logprob of token i + 1 (gyre.trainers.mismatch's layout)."""
    cu = [0]
    for s in seqs:
        cu.append(cu[-1] + len(s))
    ids = torch.tensor([t for s in seqs for t in s], dtype=torch.int64)
    logp = token_logprobs(model, ids, cu, temperature)
    return [logp[a + 1 : b] for a, b in zip(cu, cu[1:])]
