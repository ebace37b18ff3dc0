"""ModelRunner: loads the model, builds batch tensors, runs forward + sampling. Never touches a queue."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoConfig

from gyre.engine.config import EngineConfig
from gyre.engine.kv_pool import KVPool
from gyre.engine.layers.attention import AttentionBackend, AttentionMetadata, make_backend
from gyre.engine.models import model_class
from gyre.engine.parallel import get_parallel_state, min_over_ranks, use_parallel_state
from gyre.engine.request import Request
from gyre.engine.sampler import DeviceSample, SampleOutput, Sampler, to_host
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
    def __init__(self, config: EngineConfig, rank: int = 0) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        if not os.path.isfile(os.path.join(config.model_path, "config.json")):
            raise FileNotFoundError(f"{config.model_path!r} is not an HF model directory (no config.json)")
        self.hf_config = AutoConfig.from_pretrained(config.model_path)
        self.workers = None  # rank 0 of a parallel engine: gyre.engine.workers.WorkerGroup (ranks 1..)
        if rank == 0 and config.tp_size * config.ep_size > 1:
            from gyre.engine.workers import WorkerGroup

            self.workers = WorkerGroup(config, self.hf_config, self.device)  # validates, starts, connects
        self.parallel = self.workers.state if self.workers is not None else get_parallel_state()
        try:
            with use_parallel_state(self.parallel):
                self._build(config)
            if self.workers is not None:
                self.workers.wait_ready()
        except BaseException as e:
            if self.workers is None:
                raise
            err = self.workers.abort_start()
            if err is None:
                raise
            raise err from e

    def _build(self, config: EngineConfig) -> None:
        self.model = self._build_model()
        self.pool = self._build_pool()
        from gyre.engine.eplb import ExpertBalancer
        from gyre.engine.layers.moe import attach_routing_store, moe_layers

        is_moe, rank0 = bool(moe_layers(self.model)), self.parallel.rank == 0
        self.experts = ExpertBalancer(self) if is_moe and rank0 else None  # expert load statistics, EPLB
        # [moe_layer, kv slot, k]: routing of every computed position, kept with its KV (rank 0)
        self.routing_store = attach_routing_store(self.model, self.pool.num_pages * self.pool.page_size) if rank0 else None
        backend = config.attention_backend
        if backend == "auto":
            backend = "triton" if self.device.type == "cuda" else "torch"
        if config.deterministic:  # batch-invariant layers and attention, whatever backend was asked for
            from gyre.engine.deterministic import DeterministicBackend, make_batch_invariant

            make_batch_invariant(self.model)
            cfg = self.hf_config
            self.backend = DeterministicBackend(self.pool, cfg.num_attention_heads // cfg.num_key_value_heads)
        else:
            self.backend = make_backend(backend, self.pool)
        self.sampler = Sampler(self.device)
        self.graphs = None
        self.keep_hidden = False  # keep the last forward's final hidden states (a drafter reads them)
        self.num_shared_prefix_steps = 0  # decode steps whose rows read a shared KV prefix once per group
        self.last_hidden: torch.Tensor | None = None  # [T, H], when keep_hidden
        if self.device.type == "cuda" and config.cuda_graph:
            self.init_cuda_graphs()

    # -- construction -------------------------------------------------------------------------------
    def _build_model(self) -> torch.nn.Module:
        cls = model_class(self.hf_config)
        torch.manual_seed(self.config.seed)
        with torch.device(self.device):
            model = cls(self.hf_config, self.dtype)
        model.eval()
        if self.config.load_format == "dummy":
            init_dummy(model, self.config.seed)
        elif self.parallel.world_size > 1:
            from gyre.engine.shards import load_shard

            load_shard(model, self.config.model_path)  # only this rank's shard and experts
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
            if self.config.spec_method in ("draft", "eagle"):  # the drafter's pool mirrors every page
                from gyre.engine.spec.draft_runner import draft_kv_bytes_per_page

                per_page += draft_kv_bytes_per_page(self.config, self.hf_config, self.dtype)
            num_tokens = max(int(budget // per_page), 2) * ps
        else:
            num_tokens = 65536
        num_tokens = min_over_ranks(num_tokens)  # every rank holds the same pages
        return KVPool(num_tokens // ps + 1, ps, layers, kv_heads, head_dim, self.dtype, self.device)

    def on_memory_released(self) -> None:
        self.last_hidden = None
        if self.device.type == "cuda":
            self.graphs = None  # they point at the released buffers
            torch.cuda.empty_cache()

    def on_memory_resumed(self) -> None:
        if self.device.type == "cuda" and self.config.cuda_graph and self.graphs is None and not self.pool.is_released:
            self.init_cuda_graphs()

    # -- one step -----------------------------------------------------------------------------------
    def prepare(self, batch: ScheduledBatch) -> dict[str, Any]:
        """Host-side tensors of one step: input ids, positions, slots, page table, lengths, logit rows,
        and `fills`: (input row, row in the in-flight step's samples) for tokens still pending."""
        ps = self.pool.page_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        fill_rows, fill_src = [], []
        seq_lens, q_lens, cu, logit_rows = [], [], [0], []
        tables: list[list[int]] = []  # page table of each sequence row
        for req, n, samples, drafts in zip(batch.reqs, batch.num_new, batch.sampling, batch.drafts):
            start = req.num_computed
            if drafts:  # a verify: the last token and the drafts as 1 + m decode rows over the same pages,
                # row j attends to positions <= start + j (its KV is stored by the same layer first)
                assert not req.num_pending and n == 1 + len(drafts), "drafts need a resolved request"
                for j, tok in enumerate(req.token_range(start, start + 1) + drafts):
                    p = start + j
                    ids.append(tok)
                    positions.append(p)
                    slots.append(req.page_table[p // ps] * ps + p % ps)
                    seq_lens.append(p + 1)
                    q_lens.append(1)
                    cu.append(cu[-1] + 1)
                    logit_rows.append(cu[-1] - 1)
                    tables.append(req.page_table)
                continue
            tables.append(req.page_table)
            if req.num_pending:  # its last token is pending: the device fills it in
                fill_rows.append(len(ids) + n - 1)
                fill_src.append(req.pending_index)
            ids.extend(req.token_range(start, start + n))
            pos = range(start, start + n)
            positions.extend(pos)
            table = req.page_table
            slots.extend([table[p // ps] * ps + p % ps for p in pos])
            seq_lens.append(start + n)
            q_lens.append(n)
            cu.append(cu[-1] + n)
            if samples:
                logit_rows.append(cu[-1] - 1)
        num_pages = [(n + ps - 1) // ps for n in seq_lens]
        width = max(num_pages)
        table = torch.tensor([t[:n] + [0] * (width - n) for t, n in zip(tables, num_pages)], dtype=torch.int32)
        groups = self._shared_prefix(table, seq_lens) if cu[-1] == len(seq_lens) else None
        return {
            "input_ids": torch.tensor(ids, dtype=torch.int64),
            "positions": torch.tensor(positions, dtype=torch.int64),
            "slot_mapping": torch.tensor(slots, dtype=torch.int64),
            "page_table": table,
            "seq_lens": torch.tensor(seq_lens, dtype=torch.int32),
            "cu_seqlens_q": torch.tensor(cu, dtype=torch.int32),
            "seq_lens_cpu": seq_lens,
            "q_lens_cpu": q_lens,
            "logit_rows": logit_rows,
            "fill_rows": fill_rows,
            "fill_src": fill_src,
            "prefix_lens": None if groups is None else groups[0],  # decode rows sharing leading pages
            "group_lens": None if groups is None else groups[1],
        }

    def _shared_prefix(self, table: torch.Tensor, seq_lens: list[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(prefix_lens, group_lens) of a decode batch whose adjacent rows share leading KV pages (the n
        samples of a prompt, the rows of a verify), when the backend reads shared prefixes once."""
        bs = len(seq_lens)
        if bs < 2 or not self.config.shared_prefix_decode or not self.backend.decodes_shared_prefix(bs):
            return None
        from gyre.kernels.attention import shared_prefix_groups, shared_prefix_max_rows

        cfg = self.hf_config
        max_rows = shared_prefix_max_rows(cfg.num_attention_heads // cfg.num_key_value_heads)
        groups = shared_prefix_groups(table, seq_lens, self.pool.page_size, max_rows)
        self.num_shared_prefix_steps += groups is not None
        return groups

    def init_cuda_graphs(self) -> None:
        from gyre.engine.cuda_graph import CudaGraphRunner

        max_seq = min(self.config.cuda_graph_max_seq_len, self.max_model_len)
        self.graphs = CudaGraphRunner(self, min(self.config.cuda_graph_max_bs, self.config.max_running_requests),
                                      max_seq)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def _fill_pending(self, input_ids: torch.Tensor, h: dict[str, Any], prev: StepHandle | None) -> None:
        if h["fill_rows"]:
            assert prev is not None, "a pending token without an in-flight step"
            rows = self._to_device(torch.tensor(h["fill_rows"], dtype=torch.int64))
            src = self._to_device(torch.tensor(h["fill_src"], dtype=torch.int64))
            input_ids.index_copy_(0, rows, prev.device_sample.tokens.index_select(0, src))

    @torch.inference_mode()
    def forward(self, batch: ScheduledBatch, capture_experts: bool = False,
                prev: StepHandle | None = None) -> tuple[torch.Tensor, Any]:
        """Runs the model; returns (logits [N, V] of the sampling rows, routed experts or None). With
        keep_hidden, the final hidden states of all rows [T, H] stay in last_hidden until the next one."""
        h = self.prepare(batch)
        if self.workers is None:
            return self.forward_prepared(h, capture_experts, prev)
        self.workers.send_step(h, capture_experts)  # every rank runs the same step
        with self.workers.failures():
            return self.forward_prepared(h, capture_experts, prev)

    @torch.inference_mode()
    def forward_prepared(self, h: dict[str, Any], capture_experts: bool = False,
                         prev: StepHandle | None = None) -> tuple[torch.Tensor, Any]:
        """forward() of prepare()'s host tensors (a worker rank runs the steps rank 0 sends it)."""
        is_decode = all(n == 1 for n in h["q_lens_cpu"])
        graphs = self.graphs
        bs = len(h["seq_lens_cpu"])
        if (graphs is not None and is_decode and not capture_experts
                and graphs.can_run(bs, h["page_table"].shape[1])):
            shared = None if h.get("prefix_lens") is None else (h["prefix_lens"], h["group_lens"])
            graphs.load_inputs(h["input_ids"], h["positions"], h["slot_mapping"], h["page_table"], h["seq_lens"],
                               shared)
            self._fill_pending(graphs.input_ids[:bs], h, prev)
            logits = graphs.replay(bs, shared is not None)
            self.last_hidden = graphs.hidden(bs) if self.keep_hidden else None
            return logits, None
        meta = AttentionMetadata(
            slot_mapping=self._to_device(h["slot_mapping"]),
            page_table=self._to_device(h["page_table"]),
            seq_lens=self._to_device(h["seq_lens"]),
            cu_seqlens_q=self._to_device(h["cu_seqlens_q"]),
            max_q_len=max(h["q_lens_cpu"]),
            seq_lens_cpu=h["seq_lens_cpu"],
            q_lens_cpu=h["q_lens_cpu"],
            is_decode=is_decode,
        )
        if h.get("prefix_lens") is not None:
            meta.prefix_lens, meta.group_lens = self._to_device(h["prefix_lens"]), self._to_device(h["group_lens"])
        self.backend.prepare(meta)
        ctx = ForwardContext(self.backend, meta, [] if capture_experts else None)
        input_ids = self._to_device(h["input_ids"])
        self._fill_pending(input_ids, h, prev)
        hidden = self.model(input_ids, self._to_device(h["positions"]), ctx)
        self.last_hidden = hidden if self.keep_hidden else None
        rows = self._to_device(torch.tensor(h["logit_rows"], dtype=torch.int64))
        logits = self.model.compute_logits(hidden.index_select(0, rows))
        return logits, ctx.routed_experts

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, prev: StepHandle | None = None,
               masks: torch.Tensor | Callable[[], torch.Tensor] | None = None) -> StepHandle:
        """Queue one step on the device (forward + sampling) without waiting for it. masks: [B, V] bool,
        a grammar bitmask [B, ceil(V / 32)] int32 (gyre.engine.grammar), or a callable returning one,
        called once the forward is queued (host work that overlaps it)."""
        if self.experts is not None:
            self.experts.on_step()  # counts steps; rebalances every eplb_interval
        capture = any(r.sampling.return_routed_experts for r in batch.reqs)
        starts = [r.num_computed for r in batch.reqs]
        logits, experts = self.forward(batch, capture_experts=capture, prev=prev)
        if callable(masks):
            masks = masks()
        sampling_reqs: list[Request] = []
        offsets: list[int] = []  # a verify's row j samples the request's token num_generated + j
        for req, rows in zip(batch.reqs, batch.num_rows):
            sampling_reqs.extend([req] * rows)
            offsets.extend(range(rows))
        sample = self.sampler.sample(logits, sampling_reqs, masks, offsets) if sampling_reqs else None
        if self.workers is not None and sample is not None:
            self.workers.share_tokens(sample.tokens)  # the workers' next step may read them
        return StepHandle(batch, sample, experts, starts)

    # -- parallel engines and MoE -------------------------------------------------------------------
    def routed_experts(self, page_table: list[int], start: int, end: int) -> list[list[list[int]]]:
        """Stored routing of positions [start, end) of a sequence: [position][moe_layer][k]."""
        from gyre.engine.layers.moe import read_routing

        return read_routing(self.routing_store, page_table, self.pool.page_size, start, end)

    def rebalance_experts(self) -> dict[str, float]:
        if self.experts is None:
            raise ValueError("rebalance_experts needs a mixture-of-experts model with ep_size > 1")
        return self.experts.rebalance()

    def shutdown(self) -> None:
        if self.workers is not None:
            self.workers.stop()


class StepHandle:
    """A launched step. `wait()` brings its samples to the host (the only per-step synchronisation)."""

    def __init__(self, batch: ScheduledBatch, device_sample: DeviceSample | None, experts: Any,
                 starts: list[int]) -> None:
        self.batch = batch
        self.device_sample = device_sample
        self.experts = experts
        self.starts = starts  # num_computed of each request when the step was built
        self._host: tuple | None = None
        if device_sample is not None and device_sample.tokens.is_cuda:
            self._host = (device_sample.tokens.to("cpu", non_blocking=True),
                          device_sample.logprobs.to("cpu", non_blocking=True))
            self._event = torch.cuda.Event()
            self._event.record()

    def wait(self) -> SampleOutput:
        d = self.device_sample
        if d is None:
            return SampleOutput([], [], [])
        if self._host is not None:
            self._event.synchronize()
            d = DeviceSample(self._host[0], self._host[1], d.top_values, d.top_ids, d.top_counts)
        return to_host(d)
