"""Reply formats: OpenAI chat.completion / text_completion (whole and as stream chunks) and the native
/generate completion, built from engine Completions and token events."""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gyre.engine.request import Completion
from gyre.engine.server.generation import TextStream, TokenEvent, TokenText
from gyre.engine.server.protocol import ChatCompletionRequest, CompletionRequest
from gyre.engine.tool_calls import parse_tool_calls

if TYPE_CHECKING:
    from gyre.engine.engine import Engine


def finite(x: float) -> float:
    return x if math.isfinite(x) else -9999.0


def sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode("utf-8", "replace")


# -- chat -------------------------------------------------------------------------------------------
def forced_tool_calls(text: str, name: str | None) -> list[dict[str, Any]] | None:
    """OpenAI tool calls from an output constrained by a forced tool_choice: the arguments object of the
    function `name`, or (name None: "required") an array of {"name", "parameters"}. None if the output
    is not complete JSON of that shape (generation cut by max_tokens)."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if name is not None:
        pairs = [(name, obj)] if isinstance(obj, dict) else []
    elif isinstance(obj, list) and all(isinstance(x, dict) and isinstance(x.get("name"), str) for x in obj):
        pairs = [(x["name"], x.get("parameters", {})) for x in obj]
    else:
        pairs = []
    if not pairs:
        return None
    return [
        {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": n, "arguments": json.dumps(args, ensure_ascii=False)},
        }
        for n, args in pairs
    ]


class ChatReply:
    """Formats chat.completion replies and chat.completion.chunk events for one request."""

    def __init__(
        self,
        engine: Engine,
        model: str,
        body: ChatCompletionRequest,
        prompt_ids: list[int],
        reply_id: str | None = None,
    ) -> None:
        self.engine = engine
        self.model = model
        self.body = body
        self.prompt_ids = prompt_ids
        self.id = reply_id or f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.tools = bool(body.tools) and body.tool_choice != "none"
        self.forced = body.forced_tool  # "named" | "required": the whole output is the call (JSON)
        self.token_text = TokenText(engine.tokenizer)
        # extension fields of the reply (and of each choice's last chunk)
        self.extra: Callable[[Completion], dict[str, Any]] = lambda c: {"weight_version": c.weight_version}

    def logprob(self, tok: int, lp: float, top: dict[int, float] | None) -> dict[str, Any]:
        tt = self.token_text
        tops = sorted((top or {}).items(), key=lambda kv: -kv[1])
        return {
            "token": tt.text(tok),
            "logprob": finite(lp),
            "bytes": tt.bytes(tok),
            "top_logprobs": [
                {"token": tt.text(t), "logprob": finite(v), "bytes": tt.bytes(t)} for t, v in tops
            ],
        }

    def logprobs(self, c: Completion, start: int = 0) -> dict[str, Any] | None:
        if not self.body.logprobs:
            return None
        tops = c.top_logprobs or [None] * len(c.output_ids)
        return {
            "content": [
                self.logprob(t, lp, top)
                for t, lp, top in zip(c.output_ids[start:], c.output_logprobs[start:], tops[start:])
            ],
            "refusal": None,
        }

    def message(self, c: Completion) -> tuple[dict[str, Any], str, str]:
        """(the assistant message, finish_reason, its content unstripped)."""
        text = c.text or ""
        reason = c.finish_reason
        if self.forced is not None:
            name = self.body.tool_choice.function.name if self.forced == "named" else None
            calls = forced_tool_calls(text, name)
            if calls is not None:
                return (
                    {"role": "assistant", "content": None, "tool_calls": calls},
                    "tool_calls" if reason == "stop" else reason,
                    "",
                )
        elif self.tools:
            parsed = parse_tool_calls(text)
            if parsed.tool_calls:
                calls = [call.to_openai(f"call_{uuid.uuid4().hex[:24]}") for call in parsed.tool_calls]
                content = parsed.content.strip() or None
                return (
                    {"role": "assistant", "content": content, "tool_calls": calls},
                    "tool_calls" if reason == "stop" else reason,
                    parsed.content,
                )
        return {"role": "assistant", "content": text}, reason, text

    def usage(self, completions: list[Completion]) -> dict[str, Any]:
        out = sum(len(c.output_ids) for c in completions)
        prompt = len(completions[0].prompt_ids) if completions else len(self.prompt_ids)
        cached = completions[0].num_cached_tokens if completions else 0
        return {
            "prompt_tokens": prompt,
            "completion_tokens": out,
            "total_tokens": prompt + out,
            "prompt_tokens_details": {"cached_tokens": cached},
        }

    def response(self, completions: list[Completion]) -> dict[str, Any]:
        choices = []
        for j, c in enumerate(completions):
            message, reason, _ = self.message(c)
            choice = {"index": j, "message": message, "logprobs": self.logprobs(c), "finish_reason": reason}
            if self.body.return_token_ids:
                choice["token_ids"] = c.output_ids
            choices.append(choice)
        reply = {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint(completions),
            "choices": choices,
            "usage": self.usage(completions),
            **self.extra(completions[0]),
        }
        if self.body.return_token_ids:
            reply["prompt_token_ids"] = completions[0].prompt_ids
        return reply

    def fingerprint(self, completions: list[Completion]) -> str:
        version = max((c.weight_version for c in completions), default=self.engine.weight_version)
        return f"gyre-w{version}"

    # -- streaming ----------------------------------------------------------------------------------
    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": f"gyre-w{self.engine.weight_version}",
            "choices": choices,
            **extra,
        }

    def opening(self) -> list[dict[str, Any]]:
        return [
            self.chunk(
                [
                    {
                        "index": j,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ]
            )
            for j in range(self.body.n)
        ]

    def token_chunk(self, ev: TokenEvent, delta: str) -> dict[str, Any] | None:
        if not delta and not self.body.logprobs and not self.body.return_token_ids:
            return None
        choice: dict[str, Any] = {
            "index": ev.index,
            "delta": {"content": delta},
            "finish_reason": None,
            "logprobs": {"content": [self.logprob(ev.token_id, ev.logprob, ev.top)], "refusal": None}
            if self.body.logprobs
            else None,
        }
        if self.body.return_token_ids:
            choice["token_ids"] = [ev.token_id]
        return self.chunk([choice])

    def final_chunk(self, index: int, c: Completion, stream: TextStream) -> dict[str, Any]:
        message, reason, content = self.message(c)
        delta: dict[str, Any] = {}
        tail = stream.finish(content)
        if tail:
            delta["content"] = tail
        if "tool_calls" in message:
            delta["tool_calls"] = [{"index": k, **call} for k, call in enumerate(message["tool_calls"])]
        choice: dict[str, Any] = {
            "index": index,
            "delta": delta,
            "logprobs": self.logprobs(c, len(stream.ids)),
            "finish_reason": reason,
        }
        if self.body.return_token_ids:
            choice["token_ids"] = c.output_ids[len(stream.ids) :]
        return self.chunk([choice], **self.extra(c))

    def usage_chunk(self, completions: list[Completion]) -> dict[str, Any]:
        return self.chunk([], usage=self.usage(completions))

    def text_streams(self) -> list[TextStream]:
        return [
            TextStream(self.engine.tokens, self.body.stop, self.tools, hold_all=self.forced is not None)
            for _ in range(self.body.n)
        ]


# -- legacy completions -----------------------------------------------------------------------------
class CompletionReply:
    def __init__(self, engine: Engine, model: str, body: CompletionRequest, prompts: list[list[int]]) -> None:
        self.engine = engine
        self.model = model
        self.body = body
        self.prompts = prompts
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.token_text = TokenText(engine.tokenizer)
        self.offsets = [0] * (len(prompts) * body.n)  # text offset reached by each streamed choice

    def prompt_of(self, index: int) -> list[int]:
        return self.prompts[index // self.body.n]

    def logprobs(
        self, tokens: list[int], lps: list[float], tops: list[dict[int, float] | None] | None, offset: int
    ) -> dict[str, Any] | None:
        if self.body.logprobs is None:
            return None
        tt = self.token_text
        texts = [tt.text(t) for t in tokens]
        offsets = []
        for s in texts:
            offsets.append(offset)
            offset += len(s)
        top = None
        if self.body.logprobs:
            top = [
                {tt.text(t): finite(v) for t, v in (d or {}).items()} for d in (tops or [None] * len(tokens))
            ]
        return {
            "tokens": texts,
            "token_logprobs": [finite(x) for x in lps],
            "top_logprobs": top,
            "text_offset": offsets,
        }

    def usage(self, completions: list[Completion]) -> dict[str, Any]:
        prompt = sum(len(p) for p in self.prompts)
        out = sum(len(c.output_ids) for c in completions)
        return {"prompt_tokens": prompt, "completion_tokens": out, "total_tokens": prompt + out}

    def response(self, completions: list[Completion]) -> dict[str, Any]:
        choices = []
        for i, c in enumerate(completions):
            text = c.text or ""
            if self.body.echo:
                text = self.engine.tokens.decode(self.prompt_of(i)) + text
            choice = {
                "index": i,
                "text": text,
                "finish_reason": c.finish_reason,
                "logprobs": self.logprobs(c.output_ids, c.output_logprobs, c.top_logprobs, 0),
            }
            if self.body.return_token_ids:
                choice["token_ids"] = c.output_ids
                choice["prompt_token_ids"] = self.prompt_of(i)
            choices.append(choice)
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": f"gyre-w{self.engine.weight_version}",
            "choices": choices,
            "usage": self.usage(completions),
        }

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }

    def opening(self) -> list[dict[str, Any]]:
        return []

    def token_chunk(self, ev: TokenEvent, delta: str) -> dict[str, Any] | None:
        if not delta and self.body.logprobs is None and not self.body.return_token_ids:
            return None
        lp = self.logprobs([ev.token_id], [ev.logprob], [ev.top], self.offsets[ev.index])
        self.offsets[ev.index] += len(self.token_text.text(ev.token_id))
        choice = {"index": ev.index, "text": delta, "logprobs": lp, "finish_reason": None}
        if self.body.return_token_ids:
            choice["token_ids"] = [ev.token_id]
        return self.chunk([choice])

    def final_chunk(self, index: int, c: Completion, stream: TextStream) -> dict[str, Any]:
        k = len(stream.ids)
        tops = c.top_logprobs[k:] if c.top_logprobs else None
        choice = {
            "index": index,
            "text": stream.finish(c.text or ""),
            "finish_reason": c.finish_reason,
            "logprobs": self.logprobs(c.output_ids[k:], c.output_logprobs[k:], tops, self.offsets[index]),
        }
        if self.body.return_token_ids:
            choice["token_ids"] = c.output_ids[k:]
        return self.chunk([choice])

    def usage_chunk(self, completions: list[Completion]) -> dict[str, Any]:
        return self.chunk([], usage=self.usage(completions))

    def text_streams(self) -> list[TextStream]:
        return [TextStream(self.engine.tokens, self.body.stop, False) for _ in self.offsets]


def native(c: Completion, prompt_index: int, index: int) -> dict[str, Any]:
    out = {
        "prompt_index": prompt_index,
        "index": index,
        "request_id": c.request_id,
        "output_ids": c.output_ids,
        "output_logprobs": [finite(x) for x in c.output_logprobs],
        "top_logprobs": None
        if c.top_logprobs is None
        else [[[t, finite(v)] for t, v in sorted(d.items(), key=lambda kv: -kv[1])] for d in c.top_logprobs],
        "finish_reason": c.finish_reason,
        "abort_reason": c.abort_reason,
        "num_cached_tokens": c.num_cached_tokens,
        "weight_version": c.weight_version,
        "output_weight_versions": c.output_weight_versions,
        "text": c.text,
    }
    if c.routed_experts is not None:
        out["routed_experts"] = c.routed_experts
    return out
