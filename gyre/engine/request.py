"""SamplingParams (what a caller asks for), Request (engine-side state), Completion (what comes back)."""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SamplingParams:
    """How to sample one prompt.

    `output_logprobs[i]` of a Completion is the log-probability of the sampled token under
    softmax(logits / temperature) (temperature 0 -> softmax(logits)): what a trainer recomputes. The
    top-k / top-p / min-p truncation is NOT renormalised into it. With a grammar, the logits are masked
    first, so the logprob is that of the masked distribution actually sampled from (a trainer that
    recomputes logprobs without the mask gets other values for those tokens).

    json_schema (a JSON string or dict), regex or grammar (EBNF, root rule `root`): at most one; the
    output is constrained to it (gyre.engine.grammar). Stop tokens are masked until the grammar is
    complete; the request ends with "stop" when it is (or "length" first).
    """

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = 1
    seed: int | None = None
    top_logprobs: int = 0
    json_schema: str | dict | None = None
    regex: str | None = None
    grammar: str | None = None
    return_routed_experts: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"SamplingParams.{name} {why}, got {getattr(self, name)!r}")

        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise bad("max_new_tokens", "must be an integer >= 1")
        if not _is_finite(self.temperature) or self.temperature < 0:
            raise bad("temperature", "must be a finite number >= 0")
        if not _is_finite(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or (self.top_k < 1 and self.top_k not in (-1, 0)):
            raise bad("top_k", "must be -1 (off) or an integer >= 1")
        if not _is_finite(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "must be in [0, 1]")
        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", "must be an integer >= 1")
        if not isinstance(self.top_logprobs, int) or not 0 <= self.top_logprobs <= 20:
            raise bad("top_logprobs", "must be an integer in [0, 20]")
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad("seed", "must be an integer or None")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None and not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "must be a non-empty string or a list of them")
        if self.stop_token_ids is not None and not all(isinstance(t, int) for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be a list of integers")
        if sum(x is not None for x in (self.json_schema, self.regex, self.grammar)) > 1:
            raise ValueError("SamplingParams: give at most one of json_schema, regex, grammar")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplingParams:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown SamplingParams field(s): {', '.join(unknown)}")
        return cls(**d)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def is_constrained(self) -> bool:
        return self.json_schema is not None or self.regex is not None or self.grammar is not None


_dataclass_init = SamplingParams.__init__


def _strict_init(self: SamplingParams, *args: Any, **kwargs: Any) -> None:
    known = {f.name for f in dataclasses.fields(SamplingParams)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(f"unknown SamplingParams field(s): {', '.join(unknown)}")
    _dataclass_init(self, *args, **kwargs)


SamplingParams.__init__ = _strict_init  # unknown keys are a ValueError naming them, not a TypeError


def _is_finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class Status(enum.Enum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


@dataclass
class Completion:
    request_id: str
    prompt_ids: list[int]
    output_ids: list[int]
    output_logprobs: list[float]
    top_logprobs: list[dict[int, float]] | None
    finish_reason: str  # "stop" | "length" | "abort"
    num_cached_tokens: int
    weight_version: int  # version of the weights that produced the last token (or current, if none)
    text: str | None = None
    output_weight_versions: list[int] = field(default_factory=list)  # per output token
    abort_reason: str | None = None
    routed_experts: list[list[list[int]]] | None = None  # [token][moe_layer][k] when asked for


class Request:
    """Engine-side state of one sequence. Mutated only by the engine loop thread.

    Invariant: the KV of all_ids[:num_computed] is in pages page_table[:ceil(num_computed / page_size)].
    A step computes tokens [num_computed, num_computed + chunk); when num_computed reaches num_tokens
    the last position's logits are sampled. Retraction sets num_computed = 0 and frees the pages; the
    recompute runs as an ordinary prefill over prompt + output, so nothing special is needed later.

    Overlapped scheduling: a token sampled by a step still running on the device is `pending` (counted
    in num_tokens, not yet in output_ids); the next step reads it on the device (pending_index into the
    in-flight step's sampled tokens). At most one token is pending when a step is scheduled.
    """

    def __init__(self, request_id: str, prompt_ids: list[int], sampling: SamplingParams, seed: int,
                 arrival: int) -> None:
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.sampling = sampling
        self.seed = seed
        self.arrival = arrival
        self.output_ids: list[int] = []
        self.output_logprobs: list[float] = []
        self.top_logprobs: list[dict[int, float]] = []
        self.output_versions: list[int] = []
        self.routed_experts: list[list[list[int]]] = []
        self.status = Status.WAITING
        self.page_table: list[int] = []
        self.owned_pages: set[int] = set()  # pages this request must free (not owned by the prefix cache)
        self.cache_node: Any = None  # radix node locked by this request
        self.num_computed = 0
        self.num_pending = 0  # sampled on the device, not yet resolved into output_ids
        self.pending_index = -1  # row of the pending token in the in-flight step's sampled tokens
        self.cache_on_resolve = False  # its prefill completed in the in-flight step
        self.is_decoding = False  # a token was sampled since the last admission (so steps are decodes)
        self.kv_stale = False  # weights changed while its KV was live: never insert it into the cache
        self.keep_lock: Any = None  # callable(node): a session takes over the cache lock at finish
        self.num_cached_tokens = -1  # set at first admission
        self.finish_reason: str | None = None
        self.abort_reason: str | None = None
        self.stop_text_offset = 0  # characters of output text already cleared of stop strings
        self.text: str | None = None
        self.on_finish: Any = None  # callable(Completion)
        self.on_token: Any = None  # callable(Request) after each appended token (streaming)
        self.session: Any = None
        self.grammar: Any = None  # GrammarState (gyre.engine.grammar) of a constrained request

    @property
    def all_ids(self) -> list[int]:
        """Resolved tokens (prompt + output); excludes a pending token."""
        return self.prompt_ids + self.output_ids

    def token_range(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output without copying the whole sequence; a pending token
        reads as 0 (the device fills it in)."""
        p = len(self.prompt_ids)
        if start >= p:
            out = self.output_ids[start - p:end - p]
        elif end <= p:
            return self.prompt_ids[start:end]
        else:
            out = self.prompt_ids[start:] + self.output_ids[:end - p]
        return out + [0] * (end - start - len(out))

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids) + self.num_pending

    @property
    def num_generated(self) -> int:
        return len(self.output_ids) + self.num_pending

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED

    def to_completion(self, current_version: int) -> Completion:
        version = self.output_versions[-1] if self.output_versions else current_version
        return Completion(
            request_id=self.request_id,
            prompt_ids=list(self.prompt_ids),
            output_ids=list(self.output_ids),
            output_logprobs=list(self.output_logprobs),
            top_logprobs=list(self.top_logprobs) if self.sampling.top_logprobs else None,
            finish_reason=self.finish_reason or "abort",
            num_cached_tokens=max(self.num_cached_tokens, 0),
            weight_version=version,
            text=self.text,
            output_weight_versions=list(self.output_versions),
            abort_reason=self.abort_reason,
            routed_experts=list(self.routed_experts) if self.sampling.return_routed_experts else None,
        )
