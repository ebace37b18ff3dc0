"""FlashInfer attention backend: `EngineConfig(attention_backend="flashinfer")`, with flashinfer-python.

The pool's per-layer K/V [num_pages * page_size, Hkv, D] is FlashInfer's "NHD" paged layout viewed as
[num_pages, page_size, Hkv, D]. A step is planned once, on the host, for all layers: sequence b owns
pages indices[indptr[b]:indptr[b+1]] (gathered from meta.page_table on the device), the last of them
holding last_page_len[b] tokens. Decode steps run BatchDecodeWithPagedKVCacheWrapper (tensor-core
kernels, any GQA group), extend steps (new tokens after a cached prefix, causal from the bottom right)
BatchPrefillWithPagedKVCacheWrapper. The new K/V are stored by gyre's kernels, rotary fused with the store
(fuses_rotary) as in the Triton backend.

CUDA graphs: each (batch bucket, page-table width) has a decode wrapper over fixed index buffers. plan()
cannot run inside a graph, so CudaGraphRunner calls prepare_graph() before capturing and before every
replay; the captured kernels then read the new plan from those buffers and the shared workspaces.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any

import torch

from gyre.engine.kv_pool import KVPool
from gyre.engine.layers.attention import AttentionBackend, AttentionMetadata
from gyre.kernels.attention import store_kv
from gyre.kernels.rotary import rotary_store_kv

WORKSPACE_BYTES = 384 << 20  # FlashInfer's split-KV scratch (SGLang's size), shared: one wrapper runs at once


class FlashInferBackend(AttentionBackend):
    fuses_rotary = True

    def __init__(self, pool: KVPool) -> None:
        super().__init__(pool)
        try:
            import flashinfer
        except ImportError as e:
            msg = "attention_backend='flashinfer' needs FlashInfer: pip install flashinfer-python"
            raise ImportError(msg) from e
        if pool.device.type != "cuda":
            raise ValueError(f"attention_backend='flashinfer' needs a CUDA device, got {pool.device}")
        if pool.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"attention_backend='flashinfer' needs float16 or bfloat16, got {pool.dtype}")
        self.flashinfer = flashinfer
        self.sm_scale = pool.head_dim**-0.5
        # NOTE: the backend is built before the model runs and the pool knows only the KV heads: the query
        # heads come from the first forward, so a step staged before then plans at its first layer.
        self.num_q_heads: int | None = None
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=pool.device)
        self.decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(self.workspace, "NHD", backend="fa2",
                                                                    use_tensor_cores=True)
        self.extend = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD", backend="fa2")
        self.graph_decode: dict[tuple[int, int], Any] = {}  # (bucket, page-table width) -> wrapper
        self._planned: dict[int, torch.cuda.Event] = {}  # id(wrapper) -> recorded after its last plan

    def prepare(self, meta: AttentionMetadata) -> None:
        self._stage(meta, self.decode if meta.is_decode else self.extend)

    def prepare_graph(self, meta: AttentionMetadata) -> None:
        key = (meta.batch_size, meta.page_table.shape[1])
        if key not in self.graph_decode:
            bs, width = key
            i32 = dict(dtype=torch.int32, device=self.pool.device)
            self.graph_decode[key] = self.flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                self.workspace, "NHD", use_cuda_graph=True, use_tensor_cores=True, backend="fa2",
                paged_kv_indptr_buffer=torch.zeros(bs + 1, **i32),
                paged_kv_indices_buffer=torch.zeros(bs * width, **i32),
                paged_kv_last_page_len_buffer=torch.zeros(bs, **i32))
        self._stage(meta, self.graph_decode[key])

    def _stage(self, meta: AttentionMetadata, wrapper: Any) -> None:
        """Host-side plan inputs of one step -> meta.extra["plan"]; planned now if the heads are known."""
        pool, ps = self.pool, self.pool.page_size
        # NOTE: a length-0 row (CUDA-graph padding) reads one token of its first page (its output is
        # ignored): FlashInfer's last_page_len is >= 1, and an empty sequence's output is not defined
        num_pages = [max(-(-n // ps), 1) for n in meta.seq_lens_cpu]
        last_page_len = [n - (p - 1) * ps if n else 1 for n, p in zip(meta.seq_lens_cpu, num_pages)]
        last_page_len = torch.tensor(last_page_len, dtype=torch.int32)
        indptr = torch.tensor([0, *itertools.accumulate(num_pages)], dtype=torch.int32)
        indices = _page_indices(meta.page_table, indptr)
        common = dict(num_kv_heads=pool.num_kv_heads, page_size=ps, sm_scale=self.sm_scale,
                      q_data_type=pool.dtype, kv_data_type=pool.dtype)
        if wrapper is self.extend:
            qo_indptr = torch.tensor([0, *itertools.accumulate(meta.q_lens_cpu)], dtype=torch.int32)
            plan = functools.partial(wrapper.plan, qo_indptr, indptr, indices, last_page_len,
                                     head_dim_qk=pool.head_dim, causal=True, **common)
        else:
            plan = functools.partial(wrapper.plan, indptr, indices, last_page_len, head_dim=pool.head_dim,
                                     **common)
        meta.extra["wrapper"], meta.extra["plan"] = wrapper, plan
        if self.num_q_heads is not None:
            self._plan(meta)

    def _plan(self, meta: AttentionMetadata) -> None:
        wrapper, plan = meta.extra["wrapper"], meta.extra.pop("plan")
        last = self._planned.get(id(wrapper))
        if last is not None:
            # NOTE: plan() refills a pinned host buffer whose copy to the device, queued by the previous
            # plan, may not have run yet while the host schedules ahead of the device
            last.synchronize()
        plan(num_qo_heads=self.num_q_heads)
        done = torch.cuda.Event()
        done.record()
        self._planned[id(wrapper)] = done

    def forward(self, q, k, v, layer_id, scale, meta, rope=None):
        if scale != self.sm_scale:
            raise ValueError(f"the flashinfer backend plans with softmax scale head_dim**-0.5, got {scale}")
        k_cache, v_cache = self.pool.k_cache[layer_id], self.pool.v_cache[layer_id]
        if rope is None:
            store_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        else:  # rotates q in place
            rotary_store_kv(q, k, v, *rope, k_cache, v_cache, meta.slot_mapping)
        if "plan" in meta.extra:  # the first forward of all: the query heads are known from now on
            if torch.cuda.is_current_stream_capturing():
                raise RuntimeError("FlashInfer cannot plan inside a CUDA graph capture: prepare_graph first")
            self.num_q_heads = q.shape[1]
            self._plan(meta)
        pages = (-1, self.pool.page_size, self.pool.num_kv_heads, self.pool.head_dim)
        return meta.extra["wrapper"].run(q.contiguous(), (k_cache.view(pages), v_cache.view(pages)))


def _page_indices(page_table: torch.Tensor, indptr: torch.Tensor) -> torch.Tensor:
    """page_table [B, P] (device), indptr [B+1] (host) -> the first indptr[b+1] - indptr[b] pages of each
    row b, concatenated [indptr[-1]] int32, without a device sync."""
    total = int(indptr[-1])
    starts = indptr.pin_memory().to(page_table.device, non_blocking=True)
    rows = torch.repeat_interleave(torch.arange(page_table.shape[0], device=page_table.device), starts.diff(),
                                   output_size=total)  # [total]: the row of each page
    cols = torch.arange(total, device=page_table.device) - starts[rows]  # its position in the row
    return page_table[rows, cols]
