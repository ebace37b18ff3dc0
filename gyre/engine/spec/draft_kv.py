"""The draft KV of the model drafters and their CUDA graphs (gyre.engine.spec.draft_runner).

DraftKV: a pool with the target's page count and size and the draft's layers (so a request's page_table
addresses it), an attention backend over it, and the index tensors of the draft's forwards. StepGraphs:
one greedy draft step per batch bucket, replayed k times per proposal with its outputs fed back, and
once per verify for the EAGLE catch-up (one decode row per position).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from gyre.engine.cuda_graph import batch_buckets, capture_buckets
from gyre.engine.kv_pool import KVPool
from gyre.engine.layers.attention import AttentionBackend, AttentionMetadata, make_backend
from gyre.engine.model_runner import ForwardContext

# step(tokens [B], hidden [B, H] | None, positions [B], ctx) -> (features [B, H] | None, next tokens [B])
Step = Callable[..., tuple[Any, torch.Tensor]]


@dataclass
class Steps:
    """Index tensors of S draft decode steps over B rows, sorted by their number of steps, so that the
    rows still drafting at step j are the first active[j]; a row past its last step is padding."""

    positions: torch.Tensor  # [S, B] int64 (0 on padding)
    slots: torch.Tensor  # [S, B] int64 (-1 on padding: no KV store)
    seq_lens: torch.Tensor  # [S, B] int32 (0 on padding: output ignored)
    seq_lens_cpu: list[list[int]]  # [S][B]
    page_table: torch.Tensor  # [B, W] int32
    active: list[int]  # [S]


class DraftKV:
    """The draft's KV pool (the target's page count and size, the draft's layers and KV heads) and an
    attention backend over it; stages the batch tensors of the draft's forwards."""

    def __init__(self, runner, num_layers: int, num_kv_heads: int, head_dim: int) -> None:
        target = runner.pool
        self.device = runner.device
        self.page_size = target.page_size
        self.pool = KVPool(target.num_pages, target.page_size, num_layers, num_kv_heads, head_dim,
                           runner.dtype, runner.device)
        name = runner.config.attention_backend  # the target's choice (ModelRunner._build)
        self.backend_name = name if name != "auto" else "triton" if self.device.type == "cuda" else "torch"
        self.backend = make_backend(self.backend_name, self.pool)

    def to_device(self, data, dtype: torch.dtype) -> torch.Tensor:
        t = data if isinstance(data, torch.Tensor) else torch.tensor(data, dtype=dtype)
        return t.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else t

    def _table(self, tables: list[list[int]], width: int) -> torch.Tensor:
        return torch.tensor([t[:width] + [0] * (width - len(t[:width])) for t in tables], dtype=torch.int32)

    def extend(self, tables: list[list[int]], starts: list[int],
               counts: list[int]) -> tuple[ForwardContext, torch.Tensor]:
        """A forward over positions [starts[i], starts[i] + counts[i]) of each sequence i (counts >= 1),
        attending to its earlier positions in the pool -> (ctx, positions [T])."""
        ps = self.page_size
        positions, slots, seq_lens, cu = [], [], [], [0]
        for table, s, n in zip(tables, starts, counts):
            pos = range(s, s + n)
            positions.extend(pos)
            slots.extend([table[p // ps] * ps + p % ps for p in pos])
            seq_lens.append(s + n)
            cu.append(cu[-1] + n)
        meta = AttentionMetadata(
            slot_mapping=self.to_device(slots, torch.int64),
            page_table=self.to_device(self._table(tables, -(-max(seq_lens) // ps)), torch.int32),
            seq_lens=self.to_device(seq_lens, torch.int32), cu_seqlens_q=self.to_device(cu, torch.int32),
            max_q_len=max(counts), seq_lens_cpu=seq_lens, q_lens_cpu=list(counts),
            is_decode=all(n == 1 for n in counts))
        self.backend.prepare(meta)
        return ForwardContext(self.backend, meta), self.to_device(positions, torch.int64)

    def steps(self, tables: list[list[int]], firsts: list[int], counts: list[int]) -> Steps:
        """counts[i] (descending) decode steps of row i at positions firsts[i], firsts[i] + 1, ..."""
        ps, num_steps = self.page_size, counts[0]
        first, count = torch.tensor(firsts), torch.tensor(counts)
        width = -(-max(f + n for f, n in zip(firsts, counts)) // ps)
        table = self._table(tables, width)  # [B, W]
        pos = first[None, :] + torch.arange(num_steps)[:, None]  # [S, B]
        live = torch.arange(num_steps)[:, None] < count[None, :]
        pages = table.gather(1, (pos // ps).clamp(max=width - 1).T).T.to(torch.int64)
        slots = torch.where(live, pages * ps + pos % ps, -1)
        seq_lens = torch.where(live, pos + 1, 0).to(torch.int32)
        dev = self.to_device
        return Steps(dev(torch.where(live, pos, 0), torch.int64), dev(slots, torch.int64),
                     dev(seq_lens, torch.int32), seq_lens.tolist(), dev(table, torch.int32),
                     live.sum(1).tolist())

    def decode(self, step: Step, graphs: StepGraphs | None, tokens: torch.Tensor, hidden: torch.Tensor | None,
               steps: Steps) -> torch.Tensor:
        """Runs the steps, each feeding its tokens (and features) to the next -> tokens [S, B]."""
        bs, width = steps.page_table.shape
        if graphs is not None and graphs.can_run(bs, width):
            return graphs.run(tokens, hidden, steps)
        out = torch.empty((len(steps.active), bs), dtype=torch.int64, device=self.device)
        cu = torch.arange(bs + 1, dtype=torch.int32, device=self.device)
        for j, a in enumerate(steps.active):  # rows past a are done: each step runs the first a rows
            meta = AttentionMetadata(
                slot_mapping=steps.slots[j, :a], page_table=steps.page_table[:a],
                seq_lens=steps.seq_lens[j, :a], cu_seqlens_q=cu[:a + 1], max_q_len=1,
                seq_lens_cpu=steps.seq_lens_cpu[j][:a], q_lens_cpu=[1] * a, is_decode=True)
            self.backend.prepare(meta)
            ctx = ForwardContext(self.backend, meta)
            hidden = None if hidden is None else hidden[:a]
            hidden, tokens = step(tokens[:a], hidden, steps.positions[j, :a], ctx)
            out[j, :a] = tokens
        return out


class StepGraphs:
    """CUDA graphs of one greedy draft step, one per batch bucket, over static buffers. A replay feeds its
    outputs back into its inputs (tokens, and the EAGLE feature), so k draft steps are k replays with only
    the step's positions, slots and lengths copied in between. Rows past the batch, or past their last
    step, are padding: slot -1 (no KV store), seq_len 0 (output ignored). Weights are read by address:
    in-place loads (Drafter.load, the target's weight updates) keep the graphs valid."""

    def __init__(self, step: Step, kv: DraftKV, max_bs: int, max_seq_len: int,
                 hidden: tuple[int, torch.dtype] | None) -> None:
        dev, i32, i64 = kv.device, torch.int32, torch.int64
        self.step, self.kv = step, kv
        self.max_bs, self.max_pages = max_bs, -(-max_seq_len // kv.page_size)
        self.tokens = torch.zeros(max_bs, dtype=i64, device=dev)
        self.hidden = torch.zeros(max_bs, hidden[0], dtype=hidden[1], device=dev) if hidden else None
        self.positions = torch.zeros(max_bs, dtype=i64, device=dev)
        self.slot_mapping = torch.full((max_bs,), -1, dtype=i64, device=dev)
        self.page_table = torch.zeros(max_bs, self.max_pages, dtype=i32, device=dev)
        self.seq_lens = torch.zeros(max_bs, dtype=i32, device=dev)
        self.cu_seqlens_q = torch.arange(max_bs + 1, dtype=i32, device=dev)
        self.plans = type(kv.backend).prepare_graph is not AttentionBackend.prepare_graph  # FlashInfer
        self.buckets = batch_buckets(max_bs)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.capture()

    def _meta(self, bs: int, seq_lens_cpu: list[int] | None = None) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs], page_table=self.page_table[:bs], seq_lens=self.seq_lens[:bs],
            cu_seqlens_q=self.cu_seqlens_q[: bs + 1], max_q_len=1, seq_lens_cpu=seq_lens_cpu or [1] * bs,
            q_lens_cpu=[1] * bs, is_decode=True)

    def _forward(self, meta: AttentionMetadata) -> None:
        bs = meta.batch_size
        hidden = None if self.hidden is None else self.hidden[:bs]
        ctx = ForwardContext(self.kv.backend, meta)
        feats, tokens = self.step(self.tokens[:bs], hidden, self.positions[:bs], ctx)
        self.tokens[:bs].copy_(tokens)  # NOTE: after every read of the inputs (stream order): the next input
        if feats is not None:
            self.hidden[:bs].copy_(feats)

    @torch.inference_mode()
    def capture(self) -> None:
        graphs = capture_buckets(self.kv.device, self.buckets, self.kv.backend, self._meta, self._forward)
        self.graphs = {bs: graph for bs, (graph, _) in graphs.items()}

    def can_run(self, batch_size: int, width: int) -> bool:
        return batch_size <= self.max_bs and width <= self.max_pages

    def run_rows(self, tokens: torch.Tensor, hidden: torch.Tensor | None, positions: torch.Tensor,
                 slots: torch.Tensor, seq_lens: list[int], table: torch.Tensor) -> tuple[torch.Tensor | None,
                                                                                        torch.Tensor]:
        """One replay over bs independent decode rows (row i attends to positions < seq_lens[i] of its page
        table row) -> (features, tokens) [bs]: views of the static buffers, valid until the next replay."""
        bs, width = table.shape
        bucket = next(b for b in self.buckets if b >= bs)
        self.page_table[:bs, :width].copy_(table, non_blocking=True)
        self.tokens[:bs].copy_(tokens, non_blocking=True)
        if hidden is not None:
            self.hidden[:bs].copy_(hidden)
        self.positions[:bs].copy_(positions, non_blocking=True)
        self.slot_mapping[:bs].copy_(slots, non_blocking=True)
        self.seq_lens[:bs].copy_(torch.tensor(seq_lens, dtype=torch.int32).pin_memory(), non_blocking=True)
        self.slot_mapping[bs:bucket].fill_(-1)
        self.seq_lens[bs:bucket].fill_(0)
        if self.plans:
            self.kv.backend.prepare_graph(self._meta(bucket, seq_lens + [0] * (bucket - bs)))
        self.graphs[bucket].replay()
        return (None if self.hidden is None else self.hidden[:bs]), self.tokens[:bs]

    def run(self, tokens: torch.Tensor, hidden: torch.Tensor | None, steps: Steps) -> torch.Tensor:
        bs, width = steps.page_table.shape
        bucket = next(b for b in self.buckets if b >= bs)
        self.page_table[:bs, :width].copy_(steps.page_table)
        self.tokens[:bs].copy_(tokens)
        if hidden is not None:
            self.hidden[:bs].copy_(hidden)
        self.slot_mapping[bs:bucket].fill_(-1)
        self.seq_lens[bs:bucket].fill_(0)
        out = torch.empty((len(steps.active), bs), dtype=torch.int64, device=self.tokens.device)
        for j in range(len(steps.active)):
            self.positions[:bs].copy_(steps.positions[j])
            self.slot_mapping[:bs].copy_(steps.slots[j])
            self.seq_lens[:bs].copy_(steps.seq_lens[j])
            if self.plans:
                self.kv.backend.prepare_graph(self._meta(bucket, steps.seq_lens_cpu[j] + [0] * (bucket - bs)))
            self.graphs[bucket].replay()
            out[j].copy_(self.tokens[:bs])
        return out
