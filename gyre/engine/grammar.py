"""Grammar-constrained decoding with xgrammar: JSON schema, regex, EBNF, tool-call arguments.

A constrained request (SamplingParams.json_schema / regex / grammar) carries a GrammarState: its own
xgrammar matcher over a compiled grammar shared by every request with the same source.

- Compile: `Engine.make_requests` compiles in the caller's thread, through GrammarBackend's worker
  threads and with a timeout; compiled grammars are cached by source (LRU). An invalid grammar, or one
  that does not compile in time, is a ValueError for that request only: the engine thread never compiles.
- Mask: a step that samples constrained requests queues its forward first; the engine then resolves the
  previous step (matchers accept its tokens) and fills the next-token bitmask on the CPU while the device
  runs the forward; the sampler applies it to the logits before anything else, so the sampled token and
  its logprob come from the masked distribution. Steps with no constrained row stay fully overlapped.
  A step's grammar work is two native calls that release the GIL: one batched accept, and one batched
  fill, in xgrammar's thread pool, into a bitmask buffer allocated once (pinned for the device).
- Advance: `Scheduler.resolve` feeds each token appended to output_ids to its matcher exactly once, a
  step's worth at a time (`accept_tokens`); a recompute after retraction appends nothing, so it never
  re-feeds them. A matcher that terminates (the
  grammar is complete and it accepted a stop token) finishes its request with "stop". `rollback(n)`
  undoes accepted tokens (speculative decoding).

xgrammar is imported lazily: gyre.engine imports without it, and a constrained request then fails with
a ValueError that says so.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import queue
import re
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from gyre.engine.request import Request, SamplingParams

log = logging.getLogger("gyre.engine.grammar")

_RAW_CHARS, _JSON_CHARS = r"[^\"\\\r\n]", r"[^\0-\x1f\"\\]"  # EBNF character classes: string characters
_XGR_PREFIX = re.compile(r"^\[[0-9:]+\] \S+:\d+: ")  # "[23:07:28] /project/cpp/x.cc:83: " on xgrammar errors


def load_xgrammar():
    """The xgrammar module, or a ValueError saying that constrained decoding needs it."""
    try:
        import xgrammar
    except ImportError:
        raise ValueError(
            "constrained decoding (json_schema / regex / grammar) needs the xgrammar package: "
            "pip install xgrammar"
        ) from None
    return xgrammar


def xgr_message(e: Exception) -> str:
    """The first line of an xgrammar error, without its "[time] file:line: " prefix."""
    text = str(e).strip()
    return _XGR_PREFIX.sub("", text.splitlines()[0]) if text else type(e).__name__


def json_string_fix(ebnf: str) -> str:
    """xgrammar 0.2 lets raw control characters into length-bounded JSON strings (invalid JSON): an EBNF
    printed from its JSON-schema grammar, with those strings' characters limited to what JSON allows."""
    return ebnf.replace(_RAW_CHARS, _JSON_CHARS)


def grammar_source(sp: SamplingParams) -> tuple[str, str]:
    """(kind, source text) of a constrained request: the cache key of its compiled grammar."""
    if sp.json_schema is not None:
        schema = sp.json_schema
        if isinstance(schema, dict):
            try:
                return "json_schema", json.dumps(schema)  # NOTE: key order kept: it orders the properties
            except (TypeError, ValueError) as e:
                raise ValueError(f"SamplingParams.json_schema is not JSON-serialisable: {e}") from None
        if not isinstance(schema, str):
            raise ValueError(
                f"SamplingParams.json_schema must be a JSON string or a dict, got {type(schema).__name__}"
            )
        try:
            parsed = json.loads(schema)
        except ValueError as e:
            raise ValueError(f"SamplingParams.json_schema is not valid JSON: {e}") from None
        if not isinstance(parsed, dict):
            raise ValueError("SamplingParams.json_schema must be a JSON object")
        return "json_schema", schema
    for kind in ("regex", "grammar"):
        source = getattr(sp, kind)
        if source is not None:
            if not isinstance(source, str) or not source:
                raise ValueError(f"SamplingParams.{kind} must be a non-empty string")
            return kind, source
    raise ValueError("SamplingParams has no json_schema, regex or grammar")


class GrammarState:
    """One request's matcher (engine thread only, after creation)."""

    __slots__ = ("matcher",)

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher

    def accept(self, token: int) -> bool:
        """Advance over one sampled token; False if the grammar does not allow it."""
        return self.matcher.accept_token(token)

    def rollback(self, num_tokens: int = 1) -> None:
        """Undo the last num_tokens accepted tokens (rejected speculative tokens)."""
        self.matcher.rollback(num_tokens)

    @property
    def is_terminated(self) -> bool:
        return self.matcher.is_terminated()


class GrammarBackend:
    """One per engine: tokenizer info, compiler, the cache of compiled grammars, the compile workers and
    the bitmask filler. `tokenizer_info` is built from the tokenizer on first use; set it before the first
    constrained request to use another vocabulary (a model directory without a tokenizer, benchmarks).

    JSON schemas allow any whitespace between tokens (xgrammar's default, as in vLLM and SGLang), so the
    model keeps its own layout; json_any_whitespace=False forces json.dumps' layout (", " and ": "), and
    json_max_whitespace caps runs of whitespace (a policy that loops on newlines). fill_threads: xgrammar's
    threads filling a step's bitmasks (default: half the CPUs this process may run on).
    """

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        stop_token_ids: Iterable[int],
        *,
        cache_size: int = 128,
        compile_timeout_s: float = 30.0,
        num_workers: int = 2,
        fill_threads: int | None = None,
        json_any_whitespace: bool = True,
        json_max_whitespace: int | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(set(stop_token_ids))
        self.cache_size = cache_size
        self.compile_timeout_s = compile_timeout_s
        self.num_workers = num_workers
        self.fill_threads = fill_threads or max(1, _num_cpus() // 2)
        self.json_any_whitespace = json_any_whitespace
        self.json_max_whitespace = json_max_whitespace
        self.tokenizer_info: Any = None
        self._compiler: Any = None
        self._cache: OrderedDict[tuple, Future] = OrderedDict()
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._workers: list[threading.Thread] = []
        self._filler: Any = None  # xgrammar BatchGrammarMatcher: its thread pool fills the bitmasks
        self._bitmasks = [torch.empty(0, 0, dtype=torch.int32)] * 2  # [rows, ceil(V / 32)], used in turn
        self._pinned = [False, False]
        self._turn = 0

    @property
    def num_cached(self) -> int:
        return len(self._cache)

    # -- compiling (callers' threads) ---------------------------------------------------------------
    def compile(self, sp: SamplingParams) -> Any:
        """The compiled grammar of a constrained SamplingParams; ValueError if it is invalid or does not
        compile within compile_timeout_s (a slow compile goes on in the background: once done, the same
        source is served from the cache)."""
        kind, source = grammar_source(sp)
        options = (self.json_any_whitespace, self.json_max_whitespace) if kind == "json_schema" else ()
        key = (kind, source, *options)
        with self._lock:
            self._ensure_compiler()
            fut = self._cache.get(key)
            if fut is None:
                fut = self._cache[key] = Future()
                self._jobs.put((fut, kind, source, options))
                if len(self._workers) < self.num_workers:
                    t = threading.Thread(
                        target=self._work, name=f"gyre-grammar-{len(self._workers)}", daemon=True
                    )
                    t.start()
                    self._workers.append(t)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(key)
        try:
            return fut.result(timeout=self.compile_timeout_s)
        except FutureTimeout:
            raise ValueError(
                f"SamplingParams.{kind}: the grammar did not compile within {self.compile_timeout_s:g} s"
            ) from None

    def new_state(self, compiled: Any, sp: SamplingParams) -> GrammarState:
        """A fresh matcher for one request. Stop tokens: the model's eos ids and sp.stop_token_ids; they
        are allowed only where the grammar is complete (and ignore_eos does not apply to them)."""
        xgr = load_xgrammar()
        stops = sorted(set(self.stop_token_ids) | set(sp.stop_token_ids or ()))
        if stops:
            return GrammarState(xgr.GrammarMatcher(compiled, override_stop_tokens=stops))
        return GrammarState(xgr.GrammarMatcher(compiled, terminate_without_stop_token=True))

    def _ensure_compiler(self) -> None:
        if self._compiler is not None:
            return
        xgr = load_xgrammar()
        if self.tokenizer_info is None:
            if self.tokenizer is None:
                raise ValueError(
                    "constrained decoding needs a tokenizer and the model directory has none "
                    "(or set engine.grammar.tokenizer_info)"
                )
            self.tokenizer_info = xgr.TokenizerInfo.from_huggingface(
                self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids or None
            )
        if self.tokenizer_info.vocab_size != self.vocab_size:
            raise ValueError(
                f"grammar tokenizer_info has vocab_size {self.tokenizer_info.vocab_size}, "
                f"the model {self.vocab_size}"
            )
        # our LRU is the cache: xgrammar's own would keep every grammar ever compiled
        threads = min(8, os.cpu_count() or 1)
        self._compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=threads, cache_enabled=False)

    def _work(self) -> None:
        while True:
            fut, kind, source, options = self._jobs.get()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(self._compile_now(kind, source, options))
            except Exception as e:  # noqa: BLE001 - the error goes to the requests that asked
                fut.set_exception(ValueError(f"SamplingParams.{kind} is invalid: {xgr_message(e)}"))

    def _compile_now(self, kind: str, source: str, options: tuple) -> Any:
        if kind == "json_schema":
            any_whitespace, max_whitespace = options
            grammar = load_xgrammar().Grammar.from_json_schema(
                source, any_whitespace=any_whitespace, max_whitespace_cnt=max_whitespace
            )
            text = str(grammar)
            if _RAW_CHARS in text:
                grammar = load_xgrammar().Grammar.from_ebnf(json_string_fix(text))
            return self._compiler.compile_grammar(grammar)
        if kind == "regex":
            return self._compiler.compile_regex(source)
        return self._compiler.compile_grammar(source)

    # -- masks (engine thread) ----------------------------------------------------------------------
    def fill_bitmask(self, reqs: Sequence[Request], pin: bool = False) -> torch.Tensor:
        """Next-token bitmask [len(reqs), ceil(V / 32)] int32 of a step's sampling rows: a constrained
        request's row from its matcher; all ones for the others and for requests already finished.
        pin: in page-locked memory, for an asynchronous copy to the device. The tensor is a view of a
        buffer that the fill after next rewrites."""
        rows = [i for i, r in enumerate(reqs) if r.grammar is not None and not r.is_finished]
        bitmask = self._next_buffer(len(reqs), pin)
        if len(rows) < len(reqs):  # a matcher writes its whole row; only the others need ones
            free = np.ones(len(reqs), dtype=bool)
            free[rows] = False
            bitmask.numpy()[free] = -1  # numpy: torch's threaded fill_ costs milliseconds on a busy host
        if len(rows) == 1:
            reqs[rows[0]].grammar.matcher.fill_next_token_bitmask(bitmask, rows[0])
        elif rows:  # in xgrammar's threads
            matchers = [reqs[i].grammar.matcher for i in rows]
            indices = rows if len(rows) < len(reqs) else None
            self._batch_filler().batch_fill_next_token_bitmask(matchers, bitmask, indices)
        return bitmask

    def _next_buffer(self, num_rows: int, pin: bool) -> torch.Tensor:
        # NOTE: two buffers in turn. The device copy of a bitmask is queued with its step's sampling, and
        # the engine waits for that step (resolves it) before the fill after next, so a buffer is never
        # rewritten while a copy may still read it.
        i = self._turn = self._turn ^ 1
        buf = self._bitmasks[i]
        if buf.shape[0] < num_rows or (pin and not self._pinned[i]):
            rows = max(num_rows, 2 * buf.shape[0], 8)  # grows rarely: page-locked allocations are slow
            width = (self.vocab_size + 31) // 32
            buf = self._bitmasks[i] = torch.empty((rows, width), dtype=torch.int32, pin_memory=pin)
            self._pinned[i] = pin
        return buf[:num_rows]

    def _batch_filler(self) -> Any:
        if self._filler is None:
            self._filler = load_xgrammar().BatchGrammarMatcher(self.fill_threads)
        return self._filler


def _num_cpus() -> int:
    """CPUs this process may run on (xgrammar's own default counts the host's, cgroups aside)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def accept_tokens(states: Sequence[GrammarState], tokens: Sequence[int]) -> list[bool]:
    """Advance each matcher over its token (a step's worth, one native call); False where the grammar
    rejects the token."""
    if len(states) <= 1:
        return [s.accept(t) for s, t in zip(states, tokens)]
    batch_accept = _native_batch_accept()
    if batch_accept is None:
        return load_xgrammar().BatchGrammarMatcher.batch_accept_token(
            [s.matcher for s in states], list(tokens)
        )
    accepted = batch_accept([s.matcher._handle for s in states], list(tokens), False)
    # NOTE: xgrammar's wrapper reads its result element by element through the FFI (about 1 us each, a
    # quarter of a millisecond at batch 128); one containment test covers the usual step, where every
    # token was sampled under its mask.
    if 0 not in accepted:
        return [True] * len(states)
    return [bool(a) for a in accepted]


@functools.cache
def _native_batch_accept() -> Any:
    """xgrammar's native batch_accept_token (on matcher handles), or None where this xgrammar has none."""
    core = getattr(getattr(load_xgrammar(), "base", None), "_core", None)
    fn = getattr(getattr(core, "BatchGrammarMatcher", None), "batch_accept_token", None)
    return fn if callable(fn) else None


# -- applying a mask (any thread; no xgrammar needed) ------------------------------------------------
_SHIFTS: dict[torch.device, torch.Tensor] = {}
_use_xgr_kernel = True


def apply_token_mask(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """logits [B, V] float; mask [B, V] bool (True = allowed) or a bitmask [B, ceil(V / 32)] int32 whose
    bit j of word w allows token 32 * w + j. Returns the logits with -inf where not allowed (a bitmask is
    applied in place: by xgrammar's kernel on CUDA when it is available)."""
    global _use_xgr_kernel
    mask = mask.to(logits.device, non_blocking=True)
    if mask.dtype == torch.bool:
        return logits.masked_fill(~mask, float("-inf"))
    if logits.is_cuda and _use_xgr_kernel:
        try:
            load_xgrammar().apply_token_bitmask_inplace(
                logits, mask, vocab_size=logits.shape[1], backend="triton"
            )
            return logits
        except Exception as e:  # noqa: BLE001 - fall back to ours for good
            _use_xgr_kernel = False
            log.warning("xgrammar's bitmask kernel is unavailable (%s: %s); using torch", type(e).__name__, e)
    if logits.device.type == "cpu" and sys.byteorder == "little":  # numpy unpacks bits several times faster
        # [B, 4 W] bytes: bit j of word w is bit j % 8 of byte 4 w + j // 8
        words = mask.contiguous().numpy().view(np.uint8)
        bits = np.unpackbits(words, axis=1, count=logits.shape[1], bitorder="little")  # [B, V] uint8
        return logits.masked_fill_(torch.from_numpy(bits == 0), float("-inf"))
    return logits.masked_fill_(~unpack_bitmask(mask, logits.shape[1]), float("-inf"))


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, W] int32 bitmask -> [B, vocab_size] bool (True = allowed)."""
    shifts = _SHIFTS.get(bitmask.device)
    if shifts is None:
        shifts = _SHIFTS[bitmask.device] = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # [B, W, 32]
    return bits.view(bitmask.shape[0], -1)[:, :vocab_size].bool()


# -- OpenAI request fields -> SamplingParams fields --------------------------------------------------
def sampling_from_response_format(response_format: Any) -> dict[str, Any]:
    """OpenAI `response_format` (a dict, or a pydantic model) -> SamplingParams fields.

    None or {"type": "text"} -> {}; {"type": "json_object"} -> any JSON object;
    {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}} -> that schema.
    Properties and items a schema does not declare are not generated (OpenAI's strict mode), unless the
    schema allows them (additionalProperties). Raises ValueError for anything else.
    """
    if response_format is None:
        return {}
    if hasattr(response_format, "model_dump"):
        response_format = response_format.model_dump()
    if not isinstance(response_format, dict):
        raise ValueError("response_format must be an object")
    kind = response_format.get("type")
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"json_schema": {"type": "object"}}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise ValueError("response_format json_schema needs a 'json_schema' object")
        schema = spec.get("schema", spec.get("schema_"))
        if schema is None:
            return {"json_schema": {"type": "object"}}
        if not isinstance(schema, (dict, str)):
            raise ValueError("response_format json_schema.schema must be a JSON schema object")
        return {"json_schema": schema}
    raise ValueError(f"response_format type must be text | json_object | json_schema, got {kind!r}")
