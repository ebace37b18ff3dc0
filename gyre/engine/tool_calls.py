"""Tool calls in model output, Hermes / Qwen style: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.

The server turns them into OpenAI `tool_calls`; the rollout layer uses the same parser for its
tool-using environments. Parsing never raises: a block that is not a well-formed call is reported in
`invalid` (and kept in `content`), so an environment can penalise it instead of crashing.

A final block without its closing tag is accepted when its JSON is complete: generation often stops on
the stop string `</tool_call>`, which the returned text does not include.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"

_BLOCK = re.compile(re.escape(TOOL_CALL_START) + r"(.*?)(?:" + re.escape(TOOL_CALL_END) + r"|\Z)", re.DOTALL)


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]

    def to_openai(self, call_id: str) -> dict[str, Any]:
        """The OpenAI `tool_calls` item: arguments as a JSON string."""
        return {
            "id": call_id,
            "type": "function",
            "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)},
        }


@dataclass
class ParsedOutput:
    content: str  # the text outside well-formed tool-call blocks, verbatim (not stripped)
    tool_calls: list[ToolCall] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)  # bodies of blocks that are not a well-formed call


def parse_tool_calls(text: str) -> ParsedOutput:
    """Split `text` into plain content and the tool calls it makes, in order."""
    if TOOL_CALL_START not in text:
        return ParsedOutput(text)
    out = ParsedOutput("")
    pieces: list[str] = []
    pos = 0
    for m in _BLOCK.finditer(text):
        call = _parse_call(m.group(1))
        if call is None:
            out.invalid.append(m.group(1))
            continue  # the malformed block stays in the content
        pieces.append(text[pos : m.start()])
        pos = m.end()
        out.tool_calls.append(call)
    pieces.append(text[pos:])
    out.content = "".join(pieces)
    return out


def _parse_call(body: str) -> ToolCall | None:
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models emit the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], args)


def streamable_prefix(text: str) -> int:
    """How many characters of `text` (a growing output) are certainly plain content: everything before
    the first tool-call block, less a trailing piece that may still become `<tool_call>`."""
    start = text.find(TOOL_CALL_START)
    if start >= 0:
        return start
    return len(text) - partial_suffix(text, TOOL_CALL_START)


def partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
