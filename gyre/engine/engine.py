"""Engine: the public API. One background thread owns the scheduler, the cache and the model; callers
talk to it through a queue, so generate(), agenerate() from many coroutines, sessions and control
calls (weight updates, pause, flush) are ordered between steps and never race a running step.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import torch

from gyre.engine.config import EngineConfig
from gyre.engine.grammar import GrammarBackend
from gyre.engine.loop import EngineLoop
from gyre.engine.model_runner import ModelRunner
from gyre.engine.radix_cache import RadixCache
from gyre.engine.request import Completion, Request, SamplingParams
from gyre.engine.scheduler import Scheduler
from gyre.engine.session import Session
from gyre.engine.tokens import TokenizerHelper
from gyre.engine.weight_update import WeightUpdater

log = logging.getLogger("gyre.engine")

Prompt = str | Sequence[int]


class Engine(EngineLoop):
    def __init__(self, model_path: str | os.PathLike, device: str = "auto", dtype: str = "auto",
                 **config_fields: Any) -> None:
        self.config = EngineConfig.from_kwargs(model_path=str(model_path), device=device, dtype=dtype,
                                               **config_fields)
        self.runner = ModelRunner(self.config)
        self.tokens = TokenizerHelper(self.config.model_path, self.runner.hf_config)
        pool = self.runner.pool
        self.cache = RadixCache(pool.page_size, pool.free) if self.config.enable_prefix_cache else None
        self.scheduler = Scheduler(self.config, pool, self.cache, self._on_finish, self._reclaim_sessions)
        self.weights = WeightUpdater(self)
        self._rng = random.Random(self.config.seed)
        self._ids = itertools.count()
        self._arrival = itertools.count()
        self._inbox: queue.Queue = queue.Queue()
        self._requests: dict[str, Request] = {}
        self._sessions: dict[str, Session] = {}
        self._weight_version = 0
        self._paused = False
        self._paused_for_memory = False  # release_memory: nothing runs until resume_memory
        self._stopped = False
        self._last_session_sweep = 0.0
        self._step_count = 0
        self._tokens_generated = 0
        self._started = time.monotonic()
        self._last_integrity_check = 0.0
        self._inflight = None  # the launched, unresolved step (overlapped scheduling)
        self._last_spec_resolve = 0.0
        self._check_stop = self.tokens.check_stop_fn(self.runner.max_model_len)
        self.grammar = GrammarBackend(self.tokenizer, self.vocab_size, self.tokens.eos_ids)
        self.scheduler.max_model_len = self.runner.max_model_len
        self.spec = None  # speculative decoding (gyre.engine.spec): runs the loop synchronously
        if self.config.spec_method is not None:
            from gyre.engine.spec.verify import SpecDecoder, make_drafter

            try:
                self.spec = SpecDecoder(self, make_drafter(self))
            except BaseException:
                self.runner.shutdown()
                raise
            self.scheduler.draft_len = self.spec.draft_len
            self.runner.keep_hidden = self.spec.needs_hidden
        self._thread = threading.Thread(target=self._loop, name="gyre-engine", daemon=True)
        self._thread.start()

    # -- properties ---------------------------------------------------------------------------------
    @property
    def weight_version(self) -> int:
        return self._weight_version

    @property
    def tokenizer(self):
        return self.tokens.tokenizer

    @property
    def vocab_size(self) -> int:
        return self.runner.vocab_size

    @property
    def max_model_len(self) -> int:
        return self.runner.max_model_len

    # -- generation ---------------------------------------------------------------------------------
    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling: SamplingParams | Sequence[SamplingParams] | None = None) -> list[Completion]:
        """Blocking batched generation; n completions per prompt when sampling.n > 1, in prompt order."""
        reqs = self.make_requests(prompts, sampling)
        futures = [self._submit(r) for r in reqs]
        return [f.result() for f in futures]

    async def agenerate(self, prompt: Prompt, sampling: SamplingParams | None = None,
                        on_token: Callable[[Request], None] | None = None) -> Completion | list[Completion]:
        """asyncio generation of one prompt: a Completion, or a list when sampling.n > 1."""
        reqs = self.make_requests([prompt], sampling)
        futures = [asyncio.wrap_future(self._submit(r, on_token)) for r in reqs]
        try:
            outs = await asyncio.gather(*futures)
        except asyncio.CancelledError:
            for r in reqs:
                self.abort(r.request_id)
            raise
        return outs[0] if len(outs) == 1 else list(outs)

    def make_requests(self, prompts: Prompt | Sequence[Prompt],
                      sampling: SamplingParams | Sequence[SamplingParams] | None = None) -> list[Request]:
        """Validated Requests (n per prompt); raises ValueError naming what is wrong, nothing is queued."""
        if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(prompts, Sequence) or len(prompts) == 0:
            raise ValueError("prompts must be a non-empty list of strings or of token-id lists")
        if sampling is None:
            sampling = SamplingParams()
        if isinstance(sampling, SamplingParams):
            sampling = [sampling] * len(prompts)
        if len(sampling) != len(prompts):
            raise ValueError(f"got {len(sampling)} SamplingParams for {len(prompts)} prompts")
        reqs = []
        for i, (prompt, sp) in enumerate(zip(prompts, sampling)):
            if not isinstance(sp, SamplingParams):
                raise ValueError(f"sampling[{i}] must be a SamplingParams, got {type(sp).__name__}")
            sp.validate()
            ids = self.validate_prompt(prompt, sp, index=i)
            compiled = self.grammar.compile(sp) if sp.is_constrained else None  # cached by validate_prompt
            base_seed = sp.seed if sp.seed is not None else self._rng.getrandbits(63)
            for j in range(sp.n):
                seed = base_seed if j == 0 else (base_seed * 1_000_003 + j) & ((1 << 63) - 1)
                reqs.append(Request(f"req-{next(self._ids)}", ids, sp, seed, 0))
                if compiled is not None:
                    reqs[-1].grammar = self.grammar.new_state(compiled, sp)
        return reqs

    def validate_prompt(self, prompt: Prompt, sp: SamplingParams, index: int = 0) -> list[int]:
        where = f"prompt {index}"
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{where} is text but the model directory has no tokenizer; pass token ids")
            ids = self.tokens.encode(prompt)
        elif isinstance(prompt, Sequence) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
        else:
            raise ValueError(f"{where} must be a string or a list of integer token ids")
        if not ids:
            raise ValueError(f"{where} is empty")
        bad = next((i for i, t in enumerate(ids) if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"{where}: token id {ids[bad]} at position {bad} is outside the vocabulary "
                             f"[0, {self.vocab_size})")
        total = len(ids) + sp.max_new_tokens
        if total > self.max_model_len:
            raise ValueError(f"{where}: prompt length {len(ids)} + max_new_tokens {sp.max_new_tokens} = {total} "
                             f"exceeds the context length {self.max_model_len}")
        capacity = self.runner.pool.capacity_tokens
        if total > capacity:
            raise ValueError(f"{where}: prompt length {len(ids)} + max_new_tokens {sp.max_new_tokens} exceeds "
                             f"the KV cache capacity of {capacity} tokens")
        if sp.stop and self.tokenizer is None:
            raise ValueError("SamplingParams.stop needs a tokenizer; use stop_token_ids")
        if sp.is_constrained:  # compiled here, in the caller's thread (with a timeout), and cached
            try:
                self.grammar.compile(sp)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
        if sp.return_routed_experts and not self.runner.model.num_experts:
            raise ValueError("SamplingParams.return_routed_experts needs a mixture-of-experts model")
        return ids

    def abort(self, request_id: str | None = None) -> None:
        """Abort one request (or all when None); it finishes with "abort" and keeps its partial output."""
        self._inbox.put(("abort", request_id))

    # -- sessions -----------------------------------------------------------------------------------
    def open_session(self) -> Session:
        session = Session(self, f"sess-{next(self._ids)}")
        self._sessions[session.session_id] = session
        return session

    def get_session(self, session_id: str) -> Session:
        session = self._sessions.get(session_id)
        if session is None or session.closed:
            raise KeyError(f"unknown or closed session {session_id!r}")
        return session

    def _reclaim_sessions(self) -> bool:
        """Loop thread, under memory pressure: idle sessions give up their cache locks (LRU first)."""
        idle = [s for s in self._sessions.values() if s.holds_lock and not s.busy]
        for s in sorted(idle, key=lambda s: s.last_used):
            s.drop_lock()
        return bool(idle)

    # -- control ------------------------------------------------------------------------------------
    def call(self, fn: Callable[[], Any], timeout: float | None = None) -> Any:
        """Run fn on the engine thread between steps and return its result (or raise its error)."""
        if threading.current_thread() is self._thread:
            return fn()
        if self._stopped:
            raise RuntimeError("the engine is shut down")
        fut: Future = Future()
        self._inbox.put(("call", fn, fut))
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:  # never wait forever on an engine thread that has stopped
            wait = 0.5 if deadline is None else max(0.0, min(0.5, deadline - time.monotonic()))
            try:
                return fut.result(wait)
            except FutureTimeout:
                if fut.done():
                    return fut.result()
                if not self._thread.is_alive():
                    raise RuntimeError("the engine stopped before running the call") from None
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"engine call did not run within {timeout} s") from None

    def pause(self, mode: str = "in_place") -> None:
        """Stop scheduling. in_place: running requests wait, and continue on resume; abort: they end
        with "abort" and their partial output; retract: they are requeued and recomputed on resume."""
        if mode not in ("in_place", "abort", "retract"):
            raise ValueError(f"pause mode must be in_place | abort | retract, got {mode!r}")

        def do() -> None:
            self._paused = True
            for req in list(self.scheduler.running):
                if mode == "abort":
                    self.scheduler.finish(req, "abort", "paused with mode=abort")
                elif mode == "retract":
                    self.scheduler.retract(req)

        self.call(do)

    def resume(self) -> None:
        def do() -> None:
            self._paused = False

        self.call(do)

    @property
    def is_paused(self) -> bool:
        return self._paused

    def flush_cache(self) -> int:
        """Drop every unlocked cached prefix; returns pages freed. Never fails for running requests:
        their locked prefixes stay until they finish."""
        return self.call(lambda: self.cache.flush() if self.cache is not None else 0)

    def rebalance_experts(self) -> dict[str, float]:
        """EPLB now: replicate and re-place experts by the load since the last rebalance (ep_size > 1);
        returns the max/mean rank load of that window before and after."""
        return self.call(self.runner.rebalance_experts)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int | None = None) -> int:
        return self.weights.update_from_tensors(named_tensors, version)

    def update_weights_from_disk(self, path: str | os.PathLike, version: int | None = None) -> int:
        return self.weights.update_from_disk(path, version)

    def init_weight_group(self, master_addr: str, master_port: int, rank_offset: int, world_size: int,
                          backend: str = "nccl", group_name: str = "gyre-weights") -> None:
        self.weights.init_group(master_addr, master_port, rank_offset, world_size, backend, group_name)

    def update_weights_from_group(self, names: Sequence[str], dtypes: Sequence[Any], shapes: Sequence[Sequence[int]],
                                  version: int | None = None) -> int:
        return self.weights.update_from_group(names, dtypes, shapes, version)

    def release_memory(self, tags: Sequence[str] = ("kv_cache", "weights")) -> None:
        self.weights.release_memory(tags)

    def resume_memory(self, tags: Sequence[str] = ("kv_cache", "weights")) -> None:
        self.weights.resume_memory(tags)

    def set_weight_version(self, version: int) -> None:
        """Loop thread: new weights are in place; nothing computed under older ones is reused."""
        self._weight_version = version
        self.scheduler.set_version(version)
        if self.spec is not None:
            self.spec.on_weights_updated(version)

    def load_draft(self, source: str | os.PathLike | Iterable[tuple[str, torch.Tensor]]) -> None:
        """New weights for the speculative draft (spec_method "draft" or "eagle"): a directory or named
        tensors. Validated before anything changes (a bad draft keeps the old one); re-enables drafting
        after a target weight update disabled it."""
        if self.spec is None:
            raise ValueError("load_draft needs an engine with spec_method set")
        if isinstance(source, (str, os.PathLike)):
            source = str(source)
        else:
            source = list(source)
        self.call(lambda: self.spec.load(source, self._weight_version))

    def check_integrity(self) -> None:
        """Loop thread: page accounting is exact (free + cached + owned by requests = all pages)."""
        pool = self.runner.pool
        owned = [p for r in self.scheduler.running for p in r.owned_pages]
        cached = self.cache.cached_pages() if self.cache is not None else set()
        if self.cache is not None:
            self.cache.check_integrity()
        assert len(owned) == len(set(owned)), "a page is owned by two requests"
        assert not (set(owned) & cached), "a page is both owned by a request and cached"
        assert pool.num_free_pages + len(owned) + len(cached) == pool.num_usable_pages, (
            f"page leak: free {pool.num_free_pages} + owned {len(owned)} + cached {len(cached)} "
            f"!= {pool.num_usable_pages}")

    def stats(self) -> dict[str, Any]:
        s = self.scheduler
        prompt, cached = s.num_prompt_tokens, s.num_cached_tokens
        return {
            "weight_version": self._weight_version,
            "num_running": len(s.running),
            "num_waiting": len(s.waiting),
            "num_sessions": sum(not x.closed for x in self._sessions.values()),
            "num_steps": self._step_count,
            "num_generated_tokens": self._tokens_generated,
            "num_prefill_tokens": s.num_prefill_tokens,
            "num_prompt_tokens": prompt,
            "num_cached_prompt_tokens": cached,
            "prefill_tokens_saved": cached,
            "cache_hit_rate": cached / prompt if prompt else 0.0,
            "num_retractions": s.num_retractions,
            "kv_free_pages": self.runner.pool.num_free_pages,
            "kv_total_pages": self.runner.pool.num_usable_pages,
            "kv_cached_pages": self.cache.num_cached_pages if self.cache is not None else 0,
            "shared_prefix_decode_steps": self.runner.num_shared_prefix_steps,  # decodes reading prefixes once
            "paused": self._paused,
            "uptime_s": time.monotonic() - self._started,
            **(self.runner.experts.stats() if self.runner.experts is not None else {}),  # MoE: expert load
            **(self.spec.stats() if self.spec is not None else {}),  # speculative decoding: acceptance
        }

    def shutdown(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._inbox.put(("stop",))
        self._thread.join(timeout=30)
        self.weights.close()
        self.runner.shutdown()  # stops the worker processes of tp/ep > 1

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    # -- the loop (engine thread) ------------------------------------------------------------------
    def _submit(self, req: Request, on_token: Callable[[Request], None] | None = None) -> Future:
        if self._stopped:
            raise RuntimeError("the engine is shut down")
        fut: Future = Future()
        req.on_finish = fut
        req.on_token = on_token
        self._inbox.put(("add", req))
        return fut

    def _on_finish(self, req: Request) -> None:
        self._requests.pop(req.request_id, None)
        if req.text is None and self.tokenizer is not None:
            req.text = self.tokens.decode(req.output_ids)
        completion = req.to_completion(self._weight_version)
        fut = req.on_finish
        if isinstance(fut, Future) and not fut.done():
            fut.set_result(completion)
        elif callable(fut):
            fut(completion)
