"""Paged KV memory: a page allocator and the per-layer K/V tensors.

Layout per layer: k_cache[l], v_cache[l]: [num_pages * page_size, num_kv_heads, head_dim], so that the
KV of token i of a sequence lives in slot page_table[i // page_size] * page_size + i % page_size.
Page 0 is never handed out: padded tokens (CUDA graphs, dummy batch rows) write their KV there.
"""

from __future__ import annotations

import torch


class KVPool:
    def __init__(self, num_pages: int, page_size: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        if num_pages < 2:
            raise ValueError(f"the KV pool needs at least 2 pages (page 0 is reserved), got {num_pages}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = device
        self._free: list[int] = list(range(num_pages - 1, 0, -1))  # pop() hands out low pages first
        self._is_free = [True] * num_pages
        self._is_free[0] = False
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []
        self._allocate_tensors()

    @staticmethod
    def bytes_per_page(page_size: int, num_layers: int, num_kv_heads: int, head_dim: int,
                       dtype: torch.dtype) -> int:
        return 2 * num_layers * page_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def _allocate_tensors(self) -> None:
        shape = (self.num_pages * self.page_size, self.num_kv_heads, self.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]

    # -- allocation -------------------------------------------------------------------------------
    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    @property
    def num_usable_pages(self) -> int:
        return self.num_pages - 1

    @property
    def capacity_tokens(self) -> int:
        return self.num_usable_pages * self.page_size

    def alloc(self, n: int) -> list[int] | None:
        """n free pages, or None (and nothing allocated) if fewer than n are free."""
        if n > len(self._free):
            return None
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self._is_free[p] = False
        return pages

    def free(self, pages: list[int] | set[int]) -> None:
        for p in pages:
            if p <= 0 or p >= self.num_pages or self._is_free[p]:
                raise RuntimeError(f"KV page {p} freed twice or out of range")
            self._is_free[p] = True
            self._free.append(p)

    def pages_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.page_size - 1) // self.page_size

    # -- memory release (colocation with a trainer) -----------------------------------------------
    @property
    def is_released(self) -> bool:
        return not self.k_cache

    def release(self) -> None:
        """Drop the K/V tensors (page bookkeeping is kept; the caller flushes the cache first)."""
        self.k_cache, self.v_cache = [], []

    def restore(self) -> None:
        if self.is_released:
            self._allocate_tensors()
