"""Request bodies of the HTTP API, validated by pydantic: bad input is a 400 naming the field.

OpenAI bodies ignore fields gyre does not use (clients send many); fields that would change the
output and are not implemented (penalties, logit_bias) are rejected.
gyre's own bodies (native, sessions, admin) reject unknown fields.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_N = 128  # completions per prompt
MAX_STOP = 16
MAX_IDS = 1 << 20  # token ids in one body

TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]
Finite = Annotated[float, Field(allow_inf_nan=False)]


def _check_unicode(v: Any) -> None:
    """Lone surrogates (valid JSON escapes, invalid text) would fail in the tokenizer: reject them here."""
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("text must be valid Unicode (no lone surrogates)") from None
    elif isinstance(v, dict):
        for k, x in v.items():
            _check_unicode(k)
            _check_unicode(x)
    elif isinstance(v, list):
        for x in v:
            _check_unicode(x)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _unicode(cls, data: Any) -> Any:
        _check_unicode(data)
        return data


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _unicode(cls, data: Any) -> Any:
        _check_unicode(data)
        return data


# -- chat messages and tools ------------------------------------------------------------------------
class FunctionDef(_Lenient):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _is_object_schema(cls, p: dict[str, Any] | None) -> dict[str, Any] | None:
        if p is None:
            return p
        if p.get("type", "object") != "object":
            raise ValueError("function parameters must be a JSON schema with type 'object'")
        if not isinstance(p.get("properties", {}), dict):
            raise ValueError("function parameters: 'properties' must be an object")
        req = p.get("required", [])
        if not isinstance(req, list) or not all(isinstance(r, str) for r in req):
            raise ValueError("function parameters: 'required' must be a list of strings")
        return p


class Tool(_Lenient):
    type: Literal["function"]
    function: FunctionDef


class _FunctionName(_Lenient):
    name: str


class NamedToolChoice(_Lenient):
    type: Literal["function"]
    function: _FunctionName


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ToolCallFunction(_Lenient):
    name: str
    arguments: str | dict[str, Any]


class ToolCallItem(_Lenient):
    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallItem] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _check(self) -> ChatMessage:
        if self.role == "assistant":
            if self.content is None and not self.tool_calls:
                raise ValueError("an assistant message needs content or tool_calls")
        elif self.content is None:
            raise ValueError(f"a {self.role} message needs content")
        elif self.tool_calls:
            raise ValueError("only assistant messages carry tool_calls")
        return self

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)

    def to_template(self) -> dict[str, Any]:
        """The message as chat templates expect it (tool-call arguments as objects where they parse)."""
        m: dict[str, Any] = {
            "role": "system" if self.role == "developer" else self.role,
            "content": self.text,
        }
        if self.tool_calls:
            m["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.function.name, "arguments": _as_object(c.function.arguments)},
                }
                for c in self.tool_calls
            ]
        if self.name is not None:
            m["name"] = self.name
        if self.tool_call_id is not None:
            m["tool_call_id"] = self.tool_call_id
        return m


def _as_object(arguments: str | dict[str, Any]) -> str | dict[str, Any]:
    if isinstance(arguments, dict):
        return arguments
    try:
        obj = json.loads(arguments)
    except ValueError:
        return arguments
    return obj if isinstance(obj, dict) else arguments


# -- OpenAI bodies ----------------------------------------------------------------------------------
class StreamOptions(_Lenient):
    include_usage: bool = False


class JsonSchemaFormat(_Lenient):
    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs json_schema")
        return self


class _Sampling(_Lenient):
    """Sampling fields shared by /v1/chat/completions and /v1/completions (+ gyre extensions)."""

    model: str
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: Finite | None = Field(None, ge=0)
    top_p: Finite | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    max_tokens: int | None = Field(None, ge=1)
    presence_penalty: Finite | None = None
    frequency_penalty: Finite | None = None
    logit_bias: dict[str, Any] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # gyre extensions
    top_k: int = Field(-1, ge=-1, le=2**31 - 1)
    min_p: Finite = Field(0.0, ge=0, le=1)
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = Field(None, max_length=1024)
    return_token_ids: bool = False  # adds prompt_token_ids and each choice's token_ids to the reply

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        v = [v] if isinstance(v, str) else v
        if not v:
            return None
        if len(v) > MAX_STOP or not all(v):
            raise ValueError(f"stop must be up to {MAX_STOP} non-empty strings")
        return v

    @model_validator(mode="after")
    def _unsupported(self) -> _Sampling:
        if self.presence_penalty or self.frequency_penalty:
            raise ValueError("presence_penalty and frequency_penalty are not supported")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        return self


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None

    @model_validator(mode="after")
    def _chat(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        forced = isinstance(self.tool_choice, NamedToolChoice) or self.tool_choice == "required"
        if forced and not self.tools:
            raise ValueError("tool_choice 'required' or a named function needs tools")
        if isinstance(self.tool_choice, NamedToolChoice):
            name = self.tool_choice.function.name
            if not any(t.function.name == name for t in self.tools or []):
                raise ValueError(f"tool_choice names the function {name!r}, which is not in tools")
        if forced and self.response_format is not None and self.response_format.type != "text":
            raise ValueError("give either a forced tool_choice or a response_format, not both")
        return self

    @property
    def forced_tool(self) -> str | None:
        """ "named" or "required" when tool_choice forces a call (the output is constrained to it)."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return "required" if self.tool_choice == "required" else None

    def json_schema(self) -> dict[str, Any] | None:
        """The JSON schema the output is constrained to, if any (response_format or a forced tool call).

        Forced tool calls follow vLLM: a named function's output is its arguments object; "required"
        is a non-empty array of {"name", "parameters"} (no <tool_call> tags)."""
        tools = self.tools or []
        if isinstance(self.tool_choice, NamedToolChoice):
            fn = next(t.function for t in tools if t.function.name == self.tool_choice.function.name)
            return fn.parameters or {"type": "object"}
        if self.tool_choice == "required":
            return {
                "type": "array",
                "minItems": 1,
                "items": {
                    "anyOf": [
                        {
                            "type": "object",
                            "required": ["name", "parameters"],
                            "properties": {
                                "name": {"type": "string", "enum": [t.function.name]},
                                "parameters": t.function.parameters or {"type": "object"},
                            },
                        }
                        for t in tools
                    ]
                },
            }
        rf = self.response_format
        if rf is None or rf.type == "text":
            return None
        if rf.type == "json_object" or rf.json_schema.schema_ is None:
            return {"type": "object"}
        return rf.json_schema.schema_


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _completion(self) -> CompletionRequest:
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of other than n is not supported")
        if self.echo and self.stream:
            raise ValueError("echo with stream is not supported")
        return self


# -- native -----------------------------------------------------------------------------------------
class NativeSampling(_Strict):
    """gyre.SamplingParams as JSON (same names and defaults)."""

    max_new_tokens: int = Field(128, ge=1)
    temperature: Finite = Field(1.0, ge=0)
    top_p: Finite = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, ge=-1, le=2**31 - 1)
    min_p: Finite = Field(0.0, ge=0, le=1)
    stop: list[Annotated[str, Field(min_length=1)]] | None = Field(None, max_length=MAX_STOP)
    stop_token_ids: list[TokenId] | None = Field(None, max_length=1024)
    ignore_eos: bool = False
    n: int = Field(1, ge=1, le=MAX_N)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    top_logprobs: int = Field(0, ge=0, le=20)
    json_schema: str | dict[str, Any] | None = None
    regex: str | None = None
    grammar: str | None = None
    return_routed_experts: bool = False


class GenerateRequest(_Strict):
    """POST /generate: one prompt (token ids) or a batch of them."""

    input_ids: list[TokenId] | list[list[TokenId]]
    sampling_params: NativeSampling = Field(default_factory=NativeSampling)

    @field_validator("input_ids")
    @classmethod
    def _ids(cls, v: list) -> list:
        if not v:
            raise ValueError("input_ids is empty")
        total = sum(len(x) for x in v) if isinstance(v[0], list) else len(v)
        if total > MAX_IDS:
            raise ValueError(f"input_ids holds more than {MAX_IDS} tokens")
        return v


# -- sessions ---------------------------------------------------------------------------------------
class AppendRequest(_Strict):
    """Environment tokens or messages (tool results, other agents' turns); not generated."""

    token_ids: list[TokenId] | None = Field(None, max_length=MAX_IDS)
    messages: list[ChatMessage] | None = None
    trainable: bool = False

    @model_validator(mode="after")
    def _one(self) -> AppendRequest:
        if (self.token_ids is None) == (self.messages is None):
            raise ValueError("give exactly one of token_ids and messages")
        if not (self.token_ids or self.messages):
            raise ValueError("nothing to append")
        return self


# -- admin ------------------------------------------------------------------------------------------
class DiskUpdateRequest(_Strict):
    path: str = Field(min_length=1, max_length=4096)
    version: int | None = Field(None, ge=0, le=INT64_MAX)


class GroupInitRequest(_Strict):
    master_addr: str = Field(min_length=1, max_length=255)
    master_port: int = Field(ge=1, le=65535)
    rank_offset: int = Field(ge=0, le=1 << 20)
    world_size: int = Field(ge=1, le=1 << 20)
    backend: Literal["nccl", "gloo"] = "nccl"
    group_name: str = Field("gyre-weights", min_length=1, max_length=255)


class GroupUpdateRequest(_Strict):
    names: list[str] = Field(min_length=1)
    dtypes: list[str]
    shapes: list[list[Annotated[int, Field(ge=0, le=INT64_MAX)]]]
    version: int | None = Field(None, ge=0, le=INT64_MAX)


class PauseRequest(_Strict):
    mode: Literal["in_place", "abort", "retract"] = "in_place"


class MemoryRequest(_Strict):
    tags: list[Literal["kv_cache", "weights"]] = Field(
        default_factory=lambda: ["kv_cache", "weights"], min_length=1
    )


class AbortRequest(_Strict):
    request_id: str | None = None  # an engine request id or a reply id (chatcmpl-..., cmpl-...); None: all
