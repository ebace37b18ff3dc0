"""CUDA graphs for decode steps, one per batch-size bucket, over static input buffers.

A decode batch of size bs runs the graph of the smallest bucket >= bs; rows past bs are padding:
slot -1 (their KV store is skipped), seq_len 0 (their attention is ignored), logits ignored. Buckets whose
attention reads shared prefixes once (AttentionBackend.decodes_shared_prefix) have a second graph that
does, replayed for batches with groups of rows sharing leading pages. Graphs read
the model's parameters by address: weight updates copy in place, so graphs stay valid; releasing the
weights' memory invalidates them (they are captured again on resume). The attention backend's
prepare_graph runs outside the graph before capture and before each replay (FlashInfer plans there).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from gyre.engine.layers.attention import AttentionMetadata

_CAPTURE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def capture_stream(device: torch.device) -> torch.cuda.Stream:
    """The one side stream every capture on a device uses. NOTE: torch caches a cuBLAS workspace (32 MiB
    on Hopper) per (handle, stream), allocated from the capturing graph's pool and never freed: a fresh
    stream per capture leaked one workspace per recapture (release/resume_memory cycles)."""
    stream = _CAPTURE_STREAMS.get(device)
    if stream is None:
        stream = _CAPTURE_STREAMS[device] = torch.cuda.Stream(device)
    return stream


def capture_buckets(device: torch.device, buckets: list[int], backend, make_meta: Callable[[int], Any],
                    forward: Callable[[Any], Any], pool: Any = None) -> dict[int, tuple[torch.cuda.CUDAGraph, Any]]:
    """Capture forward(meta) once per batch bucket, largest first into one memory pool (smaller graphs
    reuse its memory; `pool` to share one with other captures, never replayed concurrently), on the
    device's capture stream: {bs: (graph, forward's outputs)}. Each bucket's backend.prepare_graph(meta)
    and a warm-up run (Triton autotune/compile) happen outside the capture."""
    pool = pool if pool is not None else torch.cuda.graph_pool_handle()
    stream = capture_stream(device)
    stream.wait_stream(torch.cuda.current_stream())
    graphs = {}
    with torch.cuda.stream(stream):
        for bs in reversed(buckets):
            meta = make_meta(bs)
            backend.prepare_graph(meta)
            forward(meta)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                out = forward(meta)
            graphs[bs] = (graph, out)
    torch.cuda.current_stream().wait_stream(stream)
    return graphs


def batch_buckets(max_bs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, 257, 16)) + list(range(288, 1025, 32))
    return [s for s in sizes if s < max_bs] + [max_bs]


class CudaGraphRunner:
    def __init__(self, runner, max_bs: int, max_seq_len: int) -> None:
        self.runner = runner
        dev = runner.device
        ps = runner.pool.page_size
        self.max_bs = max_bs
        self.max_pages = (max_seq_len + ps - 1) // ps
        self.input_ids = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((max_bs,), -1, dtype=torch.int64, device=dev)
        self.page_table = torch.zeros(max_bs, self.max_pages, dtype=torch.int32, device=dev)
        self.seq_lens = torch.zeros(max_bs, dtype=torch.int32, device=dev)
        self.cu_seqlens_q = torch.arange(max_bs + 1, dtype=torch.int32, device=dev)
        self.prefix_lens = torch.zeros(max_bs, dtype=torch.int32, device=dev)
        self.group_lens = torch.zeros(max_bs, dtype=torch.int32, device=dev)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}  # logits, hidden
        self.shared_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self._hidden: torch.Tensor | None = None  # of the last replayed graph
        self.buckets = batch_buckets(max_bs)
        self.capture()

    def _meta(self, bs: int, seq_lens_cpu: list[int] | None = None, shared: bool = False) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs], page_table=self.page_table[:bs], seq_lens=self.seq_lens[:bs],
            cu_seqlens_q=self.cu_seqlens_q[: bs + 1], max_q_len=1, seq_lens_cpu=seq_lens_cpu or [1] * bs,
            q_lens_cpu=[1] * bs, is_decode=True, prefix_lens=self.prefix_lens[:bs] if shared else None,
            group_lens=self.group_lens[:bs] if shared else None)

    @torch.inference_mode()
    def _forward(self, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        from gyre.engine.model_runner import ForwardContext

        bs = meta.batch_size
        ctx = ForwardContext(self.runner.backend, meta, None)
        hidden = self.runner.model(self.input_ids[:bs], self.positions[:bs], ctx)
        return self.runner.model.compute_logits(hidden), hidden

    def capture(self) -> None:
        runner, pool = self.runner, torch.cuda.graph_pool_handle()
        graphs = capture_buckets(runner.device, self.buckets, runner.backend, self._meta, self._forward, pool)
        self.graphs = {bs: (graph, logits, hidden) for bs, (graph, (logits, hidden)) in graphs.items()}
        shared = [bs for bs in self.buckets if bs > 1 and runner.backend.decodes_shared_prefix(bs)]
        if runner.config.shared_prefix_decode and shared:
            graphs = capture_buckets(runner.device, shared, runner.backend,
                                     lambda bs: self._meta(bs, shared=True), self._forward, pool)
            self.shared_graphs = {bs: (graph, logits, hidden) for bs, (graph, (logits, hidden)) in graphs.items()}

    def can_run(self, batch_size: int, max_pages: int) -> bool:
        return batch_size <= self.max_bs and max_pages <= self.max_pages

    def load_inputs(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                    page_table: torch.Tensor, seq_lens: torch.Tensor,
                    shared: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Copy a decode batch's host tensors (page_table [bs, P]) into the static buffers; shared: its
        (prefix_lens, group_lens), for replay(bs, shared=True)."""
        bs, width = page_table.shape
        bucket = next(b for b in self.buckets if b >= bs)
        self.input_ids[:bs].copy_(input_ids.pin_memory(), non_blocking=True)
        self.positions[:bs].copy_(positions.pin_memory(), non_blocking=True)
        self.slot_mapping[:bs].copy_(slot_mapping.pin_memory(), non_blocking=True)
        self.page_table[:bs, :width].copy_(page_table.pin_memory(), non_blocking=True)
        self.seq_lens[:bs].copy_(seq_lens.pin_memory(), non_blocking=True)
        if bucket > bs:
            self.slot_mapping[bs:bucket].fill_(-1)
            self.seq_lens[bs:bucket].fill_(0)
        if shared is not None:
            self.prefix_lens[:bs].copy_(shared[0].pin_memory(), non_blocking=True)
            self.group_lens[:bs].copy_(shared[1].pin_memory(), non_blocking=True)
            if bucket > bs:
                self.prefix_lens[bs:bucket].fill_(0)
                self.group_lens[bs:bucket].fill_(0)
        self.runner.backend.prepare_graph(self._meta(bucket, seq_lens.tolist() + [0] * (bucket - bs)))

    def replay(self, bs: int, shared: bool = False) -> torch.Tensor:
        """Run the graph of the smallest bucket >= bs over the loaded inputs -> logits [bs, V]; shared: the
        graph reading the loaded prefix groups (when its bucket has one)."""
        bucket = next(b for b in self.buckets if b >= bs)
        entry = self.shared_graphs.get(bucket) if shared else None
        graph, logits, hidden = entry or self.graphs[bucket]
        graph.replay()
        self._hidden = hidden
        return logits[:bs]

    def hidden(self, bs: int) -> torch.Tensor:
        """Final hidden states [bs, H] of the last replay (valid until the next one)."""
        return self._hidden[:bs]
