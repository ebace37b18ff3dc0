"""ModelRunner: loads the model, builds batch tensors, runs forward + sampling. Never touches a queue."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoConfig

from gyre.engine.config import EngineConfig
from gyre.engine.kv_pool import KVPool
from gyre.engine.layers.attention import AttentionBackend, AttentionMetadata, make_backend
from gyre.engine.models import model_class
from gyre.engine.request import Request
from gyre.engine.sampler import SampleOutput, Sampler
from gyre.engine.scheduler import ScheduledBatch
from gyre.engine.weights import init_dummy, load_checkpoint

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ForwardContext:
    backend: AttentionBackend
    attn: AttentionMetadata
    routed_experts: list[torch.Tensor] | None = None  # MoE layers append topk_ids [T, k] when asked


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[dtype]


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        if not os.path.isfile(os.path.join(config.model_path, "config.json")):
            raise FileNotFoundError(f"{config.model_path!r} is not an HF model directory (no config.json)")
        self.hf_config = AutoConfig.from_pretrained(config.model_path)
        self.model = self._build_model()
        self.pool = self._build_pool()
        backend = config.attention_backend
        if backend == "auto":
            backend = "triton" if self.device.type == "cuda" else "torch"
        self.backend = make_backend(backend, self.pool)
        self.sampler = Sampler(self.device)

    # -- construction -------------------------------------------------------------------------------
    def _build_model(self) -> torch.nn.Module:
        cls = model_class(self.hf_config)
        torch.manual_seed(self.config.seed)
        with torch.device(self.device):
            model = cls(self.hf_config, self.dtype)
        model.eval()
        if self.config.load_format == "dummy":
            init_dummy(model, self.config.seed)
        else:
            load_checkpoint(model, self.config.model_path)
        return model

    @property
    def max_model_len(self) -> int:
        return self.config.max_model_len or int(self.hf_config.max_position_embeddings)

    @property
    def vocab_size(self) -> int:
        return int(self.hf_config.vocab_size)

    def _kv_geometry(self) -> tuple[int, int, int]:
        cfg = self.hf_config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        from gyre.engine.parallel import get_parallel_state

        return cfg.num_hidden_layers, cfg.num_key_value_heads // get_parallel_state().tp_size, head_dim

    def _build_pool(self) -> KVPool:
        layers, kv_heads, head_dim = self._kv_geometry()
        ps = self.config.page_size
        if self.config.max_num_tokens is not None:
            num_tokens = self.config.max_num_tokens
        elif self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = free - (1 - self.config.mem_fraction) * total
            per_page = KVPool.bytes_per_page(ps, layers, kv_heads, head_dim, self.dtype)
            num_tokens = max(int(budget // per_page), 2) * ps
        else:
            num_tokens = 65536
        return KVPool(num_tokens // ps + 1, ps, layers, kv_heads, head_dim, self.dtype, self.device)

    def on_memory_released(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def on_memory_resumed(self) -> None:
        pass

    # -- one step -----------------------------------------------------------------------------------
    def prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        """Host-side tensors of one step: input ids, positions, attention metadata, logit rows."""
        ps = self.pool.page_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens, q_lens, cu, logit_rows = [], [], [0], []
        for req, n, samples in zip(batch.reqs, batch.num_new, batch.sampling):
            start = req.num_computed
            all_ids = req.all_ids
            ids.extend(all_ids[start:start + n])
            pos = range(start, start + n)
            positions.extend(pos)
            table = req.page_table
            slots.extend(table[p // ps] * ps + p % ps for p in pos)
            seq_lens.append(start + n)
            q_lens.append(n)
            cu.append(cu[-1] + n)
            if samples:
                logit_rows.append(cu[-1] - 1)
        max_pages = max(len(r.page_table) for r in batch.reqs)
        table = torch.zeros(len(batch.reqs), max_pages, dtype=torch.int32)
        for i, r in enumerate(batch.reqs):
            table[i, : len(r.page_table)] = torch.tensor(r.page_table, dtype=torch.int32)
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64).to(dev, non_blocking=True),
            page_table=table.to(dev, non_blocking=True),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(dev, non_blocking=True),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32).to(dev, non_blocking=True),
            max_q_len=max(q_lens),
            seq_lens_cpu=seq_lens,
            q_lens_cpu=q_lens,
            is_decode=all(n == 1 for n in q_lens),
        )
        input_ids = torch.tensor(ids, dtype=torch.int64).to(dev, non_blocking=True)
        pos_t = torch.tensor(positions, dtype=torch.int64).to(dev, non_blocking=True)
        return input_ids, pos_t, meta, logit_rows

    @torch.inference_mode()
    def forward(self, batch: ScheduledBatch, capture_experts: bool = False) -> tuple[torch.Tensor, Any]:
        """Runs the model; returns (logits [N, V] of the sampling rows, routed experts or None)."""
        input_ids, positions, meta, logit_rows = self.prepare(batch)
        self.backend.prepare(meta)
        ctx = ForwardContext(self.backend, meta, [] if capture_experts else None)
        hidden = self.model(input_ids, positions, ctx)
        rows = torch.tensor(logit_rows, dtype=torch.int64, device=self.device)
        logits = self.model.compute_logits(hidden.index_select(0, rows))
        return logits, ctx.routed_experts

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, masks: torch.Tensor | None = None) -> tuple[SampleOutput, Any]:
        logits, experts = self.forward(batch, capture_experts=any(r.sampling.return_routed_experts for r in batch.reqs))
        sampling_reqs: list[Request] = [r for r, s in zip(batch.reqs, batch.sampling) if s]
        if not sampling_reqs:
            return SampleOutput([], [], []), experts
        return self.sampler(logits, sampling_reqs, masks), experts
