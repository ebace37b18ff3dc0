"""Continuous batching: admission, chunked prefill mixed with decodes, retraction. CPU-only logic.

`schedule()` picks the requests of one step and how many of their tokens to compute; the model runner
computes them; `postprocess()` appends the sampled tokens, checks stops, caches finished prefixes and
frees pages. The scheduler never touches a tensor.

Page ownership: a request's page_table starts with pages matched in the radix cache (owned by the
cache, locked through req.cache_node); every page it allocates is in req.owned_pages until it is
inserted into the cache, which then owns it. On finish the request frees what it still owns.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from gyre.engine.config import EngineConfig
from gyre.engine.grammar import accept_tokens
from gyre.engine.kv_pool import KVPool
from gyre.engine.radix_cache import RadixCache
from gyre.engine.request import Request, Status


class NeedSync(Exception):
    """Raised by schedule(overlap=True) when it must retract: resolve the in-flight step, then retry."""


@dataclass
class ScheduledBatch:
    reqs: list[Request]
    num_new: list[int]  # tokens of each request computed this step
    sampling: list[bool] = None  # which requests sample a token this step (set by schedule())
    # speculative decoding: draft tokens a decoding request may verify this step (pages are reserved),
    # then the drafts attached (num_new becomes 1 + len(drafts[i]): its last token and the drafts)
    draft_budget: list[int] = None
    drafts: list[list[int]] = None

    def __post_init__(self) -> None:
        if self.sampling is None:
            self.sampling = [r.num_computed + n == r.num_tokens for r, n in zip(self.reqs, self.num_new)]
        if self.draft_budget is None:
            self.draft_budget = [0] * len(self.reqs)
        if self.drafts is None:
            self.drafts = [[] for _ in self.reqs]

    @property
    def num_rows(self) -> list[int]:
        """Sampled rows of each request: 0, 1, or 1 + its drafts when it verifies."""
        return [(1 + len(d)) if s else 0 for s, d in zip(self.sampling, self.drafts)]

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new)


class Scheduler:
    def __init__(self, config: EngineConfig, pool: KVPool, cache: RadixCache | None,
                 on_finish: Callable[[Request], None], reclaim: Callable[[], bool] | None = None) -> None:
        self.config = config
        self.pool = pool
        self.cache = cache
        self.on_finish = on_finish
        self.reclaim = reclaim  # releases locks held by idle sessions; True if it freed anything
        self.draft_len: Callable[[Request], int] | None = None  # speculative decoding: drafts to reserve for
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.version = 0
        self.max_model_len = config.max_model_len or 1 << 62
        self.num_retractions = 0
        self.num_prefill_tokens = 0  # tokens computed by prefills (excludes decodes)
        self.num_prompt_tokens = 0  # prompt tokens admitted (incl. cache hits)
        self.num_cached_tokens = 0  # prompt tokens served from the cache

    # -- public -------------------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        self.waiting.append(req)

    @property
    def is_idle(self) -> bool:
        return not self.waiting and not self.running

    def schedule(self, overlap: bool = False) -> ScheduledBatch | None:
        """The next step. overlap=True: a step is still in flight (its sampled tokens are pending), so
        this one must not retract anything (raises NeedSync instead)."""
        budget = self.config.max_batch_tokens
        reqs: list[Request] = []
        num_new: list[int] = []
        draft_budget: list[int] = []
        # 1) decodes, oldest first; pages for them may come from evicting the cache or retracting the newest
        for req in sorted(self.running, key=lambda r: r.arrival):
            if req.status != Status.RUNNING or req.num_uncomputed != 1 or budget == 0:
                continue
            if req.num_generated >= req.sampling.max_new_tokens or req.num_tokens >= self.max_model_len:
                continue  # its last token is pending: it finishes when that step resolves
            if not self._reserve(req, req.num_tokens, protected=reqs, overlap=overlap):
                continue  # req itself was retracted
            reqs.append(req)
            num_new.append(1)
            budget -= 1
            extra = min(self.draft_len(req), budget) if self.draft_len is not None else 0
            if extra > 0 and not self._reserve_free(req, req.num_tokens + extra):
                extra = 0  # drafts only use free memory: they never retract anyone
            draft_budget.append(extra)
            budget -= extra
        # 2) chunked prefills already running, then admissions
        for req in sorted(self.running, key=lambda r: r.arrival):
            if budget == 0:
                break
            if req.num_uncomputed > 1 and req not in reqs:
                chunk = min(req.num_uncomputed, budget)
                reqs.append(req)
                num_new.append(chunk)
                draft_budget.append(0)
                budget -= chunk
        in_prefill = [r for r in self.running if r.num_uncomputed > 1 or r.cache_on_resolve]
        deferred: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_running_requests:
            req = self.waiting.popleft()
            if self._shares_pending_prefix(req, in_prefill):
                deferred.append(req)  # prefill once: wait for the sibling's prefix to enter the cache
                continue
            admitted = self._admit(req)
            if admitted is None:
                continue  # could never fit: finished with "abort"
            if not admitted:
                self.waiting.appendleft(req)
                break
            chunk = min(req.num_uncomputed, budget)
            reqs.append(req)
            num_new.append(chunk)
            draft_budget.append(0)
            budget -= chunk
            in_prefill.append(req)
        self.waiting.extendleft(reversed(deferred))
        if not reqs:
            return None
        return ScheduledBatch(reqs, num_new, draft_budget=draft_budget)

    def advance(self, batch: ScheduledBatch) -> None:
        """The step was launched: count its tokens as computed; sampled tokens become pending."""
        row = 0
        for req, n, rows in zip(batch.reqs, batch.num_new, batch.num_rows):
            if req.status != Status.RUNNING:  # finished by the previous step, resolved during the launch
                row += rows
                continue
            req.num_computed += n
            if not req.is_decoding:
                self.num_prefill_tokens += n
            if rows:
                req.num_pending += 1
                req.pending_index = row  # row of its (first) token in the step's sampled tokens
                row += rows
                if not req.is_decoding:
                    req.is_decoding = True
                    req.cache_on_resolve = True  # siblings sharing this prompt can match it then

    def resolve(self, batch: ScheduledBatch, tokens: list[int | None], logprobs: list[float | None],
                tops: list[dict[int, float] | None], check_stop: Callable[[Request], str | None]) -> None:
        """The step's sampled tokens arrived (None for non-sampling rows): append them, check stops."""
        # NOTE: grammar matchers advance here, once per output token (a recompute never re-feeds them)
        rows = [i for i, (r, t) in enumerate(zip(batch.reqs, tokens))
                if r.grammar is not None and t is not None and r.status == Status.RUNNING]
        accepted = dict(zip(rows, accept_tokens([batch.reqs[i].grammar for i in rows], [tokens[i] for i in rows])))
        for i, (req, tok, lp, top) in enumerate(zip(batch.reqs, tokens, logprobs, tops)):
            if tok is None or req.status != Status.RUNNING:
                continue  # not sampling, or finished / aborted while the step ran
            req.num_pending -= 1
            self._append(req, tok, lp, top, check_stop, accepted.get(i))

    def resolve_spec(self, batch: ScheduledBatch, rows: list[tuple[list[int], list[float], list]],
                     check_stop: Callable[[Request], str | None]) -> list[int]:
        """A synchronous step that may verify drafts: rows[i] = (tokens, logprobs, tops) sampled for request
        i (empty when it sampled nothing; 1 + len(drafts[i]) when it verified). The drafts equal to the
        target's own samples are accepted, then the target's sample at the first mismatch: 1 + accepted
        tokens are appended (fewer at a stop). Rejected positions' KV is rolled back (num_computed).
        Returns the accepted draft count of each request."""
        accepted_counts = []
        for req, drafts, (tokens, logprobs, tops) in zip(batch.reqs, batch.drafts, rows):
            a = 0
            while a < len(drafts) and drafts[a] == tokens[a]:
                a += 1
            accepted_counts.append(a)
            if not tokens or req.status != Status.RUNNING:
                continue
            req.num_pending -= 1
            req.num_computed -= len(drafts) - a  # rejected drafts: their slots are overwritten later
            for j in range(a + 1):
                grammar_ok = req.grammar.accept(tokens[j]) if req.grammar is not None else None
                if not self._append(req, tokens[j], logprobs[j], tops[j] if tops else None, check_stop, grammar_ok):
                    break
        return accepted_counts

    def _append(self, req: Request, tok: int, lp: float, top: dict | None,
                check_stop: Callable[[Request], str | None], grammar_ok: bool | None) -> bool:
        """One sampled token of a running request (grammar_ok: whether its matcher accepted the token, None
        without a grammar); False if the request finished."""
        req.output_ids.append(tok)
        if req.cache_on_resolve:
            req.cache_on_resolve = False
            self._cache_prefix(req)
        req.output_logprobs.append(lp)
        if req.sampling.top_logprobs:
            req.top_logprobs.append(top or {})
        req.output_versions.append(self.version)
        if req.grammar is not None:
            if not grammar_ok:
                self.finish(req, "abort", f"token {tok} violates the request's grammar")
                return False
            reason = "stop" if req.grammar.is_terminated else check_stop(req)
        else:
            reason = check_stop(req)
        if reason is not None:
            req.num_computed = min(req.num_computed, req.num_tokens - 1)  # the rest of a verify is dropped
            self.finish(req, reason)
            return False
        if req.on_token is not None:
            req.on_token(req)
        return True

    def finish(self, req: Request, reason: str, abort_reason: str | None = None) -> None:
        """End a request (any state) with its partial output; frees what it owns."""
        if req.status == Status.FINISHED:
            return
        if req.status == Status.WAITING:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        else:
            self._cache_prefix(req)
            self._release(req, keep_lock=req.keep_lock)
            self.running.remove(req)
        req.status = Status.FINISHED
        req.num_pending = 0  # a token sampled by a step still in flight is dropped
        req.finish_reason = reason
        req.abort_reason = abort_reason
        self.on_finish(req)

    def retract(self, req: Request) -> None:
        """Free a running request's KV and requeue it first; it recomputes prompt + output later."""
        self._release(req)
        req.num_computed = 0
        req.status = Status.WAITING
        self.running.remove(req)
        self.waiting.appendleft(req)
        self.num_retractions += 1

    def set_version(self, version: int) -> None:
        """New weights: running requests' KV is stale (never cached); the cache drops old versions."""
        self.version = version
        for req in self.running:
            req.kv_stale = True
        if self.cache is not None:
            self.cache.set_version(version)

    # -- internals ----------------------------------------------------------------------------------
    def _alloc(self, n: int) -> list[int] | None:
        pages = self.pool.alloc(n)
        if pages is None and self.cache is not None:
            self.cache.evict(n - self.pool.num_free_pages)
            pages = self.pool.alloc(n)
        if pages is None and self.reclaim is not None and self.reclaim():
            if self.cache is not None:
                self.cache.evict(n - self.pool.num_free_pages)
            pages = self.pool.alloc(n)
        return pages

    def _reserve(self, req: Request, num_tokens: int, protected: list[Request], overlap: bool = False) -> bool:
        """Pages for req's first num_tokens tokens; retracts the newest other requests if needed."""
        need = self.pool.pages_needed(num_tokens) - len(req.page_table)
        while need > 0:
            pages = self._alloc(need)
            if pages is not None:
                req.page_table.extend(pages)
                req.owned_pages.update(pages)
                return True
            if overlap:
                raise NeedSync
            victims = [r for r in self.running if r is not req and r not in protected]
            victim = max(victims, key=lambda r: r.arrival) if victims else req
            if victim is req and not victims and not protected:
                self.finish(req, "abort", "out of KV cache memory")
                return False
            self.retract(victim)
            if victim is req:
                return False
        return True

    def reserve_free(self, req: Request, num_tokens: int) -> bool:
        """Pages for req's first num_tokens tokens from free memory or the cache only (no retraction):
        speculative steps queued ahead of the host (gyre.engine.spec.fused) reserve their worst case."""
        return self._reserve_free(req, num_tokens)

    def _reserve_free(self, req: Request, num_tokens: int) -> bool:
        """Pages for req's first num_tokens tokens from free memory or the cache only (no retraction)."""
        need = self.pool.pages_needed(num_tokens) - len(req.page_table)
        if need <= 0:
            return True
        pages = self.pool.alloc(need)
        if pages is None and self.cache is not None:
            self.cache.evict(need - self.pool.num_free_pages)
            pages = self.pool.alloc(need)
        if pages is None:
            return False
        req.page_table.extend(pages)
        req.owned_pages.update(pages)
        return True

    def _shares_pending_prefix(self, req: Request, in_prefill: list[Request]) -> bool:
        """Whether a request in prefill may be about to cache pages of req's prompt (req then waits to match
        them). One that matched all but its last page from the cache (the n - 1 other samples of a prompt)
        caches nothing new: its siblings are admitted with it, in the same step."""
        if self.cache is None or not in_prefill:
            return False
        ps = self.pool.page_size
        if len(req.prompt_ids) < ps:
            return False
        head = req.token_range(0, ps)
        return any(len(r.prompt_ids) - max(r.num_cached_tokens, 0) > ps and r.token_range(0, ps) == head
                   for r in in_prefill)

    def _admit(self, req: Request) -> bool | None:
        """True: admitted; False: not now (no memory yet); None: can never run, finished with abort."""
        ids = req.all_ids
        matched_pages: list[int] = []
        node = None
        if self.cache is not None:
            m = self.cache.match_prefix(ids[: len(ids) - 1], self.version)  # >= 1 token left to compute
            matched_pages, node = m.pages, m.node
            self.cache.lock(node)
        need = self.pool.pages_needed(len(ids)) - len(matched_pages)
        pages = self._alloc(need)
        if pages is None:
            if node is not None:
                self.cache.unlock(node)
            if not self.running:  # nothing will ever free memory for it
                self.finish(req, "abort", "out of KV cache memory")
                return None
            return False
        req.cache_node = node
        req.page_table = matched_pages + pages
        req.owned_pages = set(pages)
        req.num_computed = len(matched_pages) * self.pool.page_size
        req.kv_stale = False
        req.is_decoding = False
        if req.num_cached_tokens < 0:
            req.num_cached_tokens = req.num_computed
            self.num_prompt_tokens += len(req.prompt_ids)
            self.num_cached_tokens += req.num_computed
        req.status = Status.RUNNING
        self.running.append(req)
        return True

    def _cache_prefix(self, req: Request) -> None:
        """Insert the full pages of req's computed tokens into the cache; the cache takes their ownership."""
        if self.cache is None or req.kv_stale:
            return
        n_full = min(req.num_computed, len(req.prompt_ids) + len(req.output_ids)) // self.pool.page_size
        if n_full == 0:
            return
        pages = req.page_table[:n_full]
        node, num_dup = self.cache.insert(req.all_ids[: n_full * self.pool.page_size], pages, self.version)
        self.cache.lock(node)
        if req.cache_node is not None:
            self.cache.unlock(req.cache_node)
        req.cache_node = node
        req.owned_pages.difference_update(pages[num_dup:])

    def _release(self, req: Request, keep_lock: Callable | None = None) -> None:
        if req.cache_node is not None:
            if keep_lock is not None:
                keep_lock(req.cache_node)  # a session takes over the lock
            else:
                self.cache.unlock(req.cache_node)
            req.cache_node = None
        self.pool.free(req.owned_pages)
        req.owned_pages = set()
        req.page_table = []
