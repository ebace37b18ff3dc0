"""EngineConfig: every knob of the generation engine, validated once."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

_BACKENDS = ("auto", "torch", "triton", "flashinfer")
_LOAD_FORMATS = ("auto", "dummy")
_SPEC_METHODS = (None, "ngram", "draft", "eagle")
_PAUSE_MODES = ("in_place", "abort", "retract")


@dataclass
class EngineConfig:
    model_path: str = ""
    device: str = "auto"  # "auto" -> cuda if available else cpu
    dtype: str = "auto"  # "auto" -> bfloat16 on cuda, float32 on cpu; or "float32" | "bfloat16" | "float16"
    load_format: str = "auto"  # "dummy": random weights from config.json alone
    seed: int = 0  # seeds dummy weights and the seeds drawn for unseeded requests

    # KV cache
    page_size: int = 16
    max_num_tokens: int | None = None  # KV capacity in tokens; None -> from mem_fraction (GPU) or 65536 (CPU)
    mem_fraction: float = 0.85  # fraction of free device memory used for weights' headroom + KV
    enable_prefix_cache: bool = True

    # scheduling
    max_batch_tokens: int = 8192  # tokens computed per step (prefill chunks + decodes)
    max_running_requests: int = 1024
    max_model_len: int | None = None  # None -> the model's max_position_embeddings
    session_timeout_s: float = 1800.0  # idle sessions are closed after this

    # execution
    attention_backend: str = "auto"  # "torch" on CPU, "triton" on GPU unless flashinfer is asked for
    cuda_graph: bool = True
    cuda_graph_max_bs: int = 512
    cuda_graph_max_seq_len: int = 8192  # decode batches with longer sequences run eagerly
    deterministic: bool = False
    overlap_schedule: bool = True  # host schedules step t+1 while the device runs step t
    # decode rows sharing leading KV pages (n samples of a prompt) read them once per group (Triton backend)
    shared_prefix_decode: bool = True

    # parallelism
    tp_size: int = 1
    ep_size: int = 1
    ep_dispatch: str = "allreduce"  # how MoE tokens reach their experts: "allreduce" | "alltoall" (layers/moe.py)
    ep_num_redundant_experts: int = 0  # extra expert slots per MoE layer for replicas of hot experts (EPLB)
    eplb_interval: int = 0  # rebalance experts every N steps (0: only on engine.rebalance_experts())

    # speculative decoding
    spec_method: str | None = None  # None (off) | "ngram" | "draft" (a small LM) | "eagle" (gyre.engine.spec)
    spec_num_tokens: int = 4  # draft tokens verified per step and request
    spec_draft_path: str | None = None  # the draft LM or EAGLE head directory ("draft" / "eagle")
    spec_on_weight_update: str = "disable"  # a model draft after new target weights: "disable" until
    # Engine.load_draft gives a new one, or "keep" drafting with the old one (stale, knowingly)
    # EAGLE: a step of decoding requests drafts, verifies, accepts and catches up on the device in one launch
    # (gyre.engine.spec.fused; one CUDA graph per batch bucket); False: the host drives each part
    spec_fused: bool = True

    # weight updates
    weight_update_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {self.page_size}")
        if self.max_num_tokens is not None and self.max_num_tokens < self.page_size:
            raise ValueError(f"max_num_tokens must be >= page_size, got {self.max_num_tokens}")
        if not 0.0 < self.mem_fraction <= 1.0:
            raise ValueError(f"mem_fraction must be in (0, 1], got {self.mem_fraction}")
        if self.max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {self.max_batch_tokens}")
        if self.max_running_requests < 1:
            raise ValueError(f"max_running_requests must be >= 1, got {self.max_running_requests}")
        if self.attention_backend not in _BACKENDS:
            raise ValueError(f"attention_backend must be one of {_BACKENDS}, got {self.attention_backend!r}")
        if self.load_format not in _LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {_LOAD_FORMATS}, got {self.load_format!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto|float32|bfloat16|float16, got {self.dtype!r}")
        if self.spec_method not in _SPEC_METHODS:
            raise ValueError(f"spec_method must be one of {_SPEC_METHODS}, got {self.spec_method!r}")
        if not isinstance(self.spec_num_tokens, int) or not 1 <= self.spec_num_tokens <= 16:
            raise ValueError(f"spec_num_tokens must be an integer in [1, 16], got {self.spec_num_tokens!r}")
        if self.spec_on_weight_update not in ("disable", "keep"):
            raise ValueError(f"spec_on_weight_update must be disable | keep, got {self.spec_on_weight_update!r}")
        if self.spec_method in ("draft", "eagle"):
            if not self.spec_draft_path:
                raise ValueError(f"spec_method={self.spec_method!r} needs spec_draft_path")
            if self.tp_size * self.ep_size > 1:
                raise ValueError(f"spec_method={self.spec_method!r} runs with tp_size = ep_size = 1 only "
                                 "(use spec_method='ngram' with parallel engines)")
        if self.tp_size < 1 or self.ep_size < 1:
            raise ValueError(f"tp_size and ep_size must be >= 1, got {self.tp_size}, {self.ep_size}")
        if self.ep_dispatch not in ("allreduce", "alltoall"):
            raise ValueError(f"ep_dispatch must be allreduce | alltoall, got {self.ep_dispatch!r}")
        if self.ep_num_redundant_experts < 0 or self.eplb_interval < 0:
            raise ValueError("ep_num_redundant_experts and eplb_interval must be >= 0")
        if (self.ep_num_redundant_experts or self.eplb_interval) and self.ep_size == 1:
            raise ValueError("ep_num_redundant_experts and eplb_interval need ep_size > 1")
        if self.weight_update_timeout_s <= 0:
            raise ValueError("weight_update_timeout_s must be > 0")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown EngineConfig field(s): {', '.join(unknown)}")
        return cls(**kwargs)
