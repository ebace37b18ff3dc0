"""N-gram (prompt lookup) drafter: no model. The longest recent suffix of the sequence that occurred
before proposes the tokens that followed it then (RL rollouts repeat their prompts, tool outputs and
their own reasoning a lot).
"""

from __future__ import annotations

import numpy as np

from gyre.engine.request import Request
from gyre.engine.spec.base import Drafter


class NgramDrafter(Drafter):
    name = "ngram"

    def __init__(self, max_ngram: int = 4, min_ngram: int = 1, window: int = 4096) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram, self.window = max_ngram, min_ngram, window
        self.num_lookups = 0
        self.num_hits = 0

    def propose(self, reqs: list[Request], num_tokens: list[int]) -> list[list[int]]:
        return [self.lookup(r.all_ids, k) if k > 0 else [] for r, k in zip(reqs, num_tokens)]

    def lookup(self, ids: list[int], k: int) -> list[int]:
        """Tokens following the most recent earlier occurrence of the longest suffix n-gram of ids
        (n from max_ngram down to min_ngram); [] when none occurred."""
        self.num_lookups += 1
        arr = np.asarray(ids[-self.window:], dtype=np.int64)
        n = len(arr)
        if n < 2:
            return []
        ends = np.flatnonzero(arr[:-1] == arr[-1])  # earlier positions matching the last token
        best = None
        for m in range(1, self.max_ngram + 1):  # ends whose m tokens match the suffix of length m
            if len(ends) == 0:
                break
            if m >= self.min_ngram:
                best = ends[-1]
            if m == self.max_ngram:
                break
            ends = ends[ends >= m]
            ends = ends[arr[ends - m] == arr[n - 1 - m]]
        if best is None:
            return []
        self.num_hits += 1
        return arr[best + 1:best + 1 + k].tolist()

    def stats(self) -> dict:
        return {"spec_ngram_lookups": self.num_lookups, "spec_ngram_hits": self.num_hits}
