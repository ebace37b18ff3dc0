"""Tool-call arguments constrained to the tools' JSON schemas (Hermes / Qwen `<tool_call>` blocks).

`sampling_from_tools(tools, tool_choice)` gives the SamplingParams fields (an EBNF grammar, built from
an xgrammar structural tag) for an OpenAI chat request's `tools` / `tool_choice`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from gyre.engine.grammar import json_string_fix, load_xgrammar, xgr_message
from gyre.engine.tool_calls import TOOL_CALL_END, TOOL_CALL_START


def tool_call_grammar(
    tools: Sequence[Any] | None, tool_choice: Any = "auto", parallel_tool_calls: bool = True
) -> str | None:
    """EBNF (for SamplingParams.grammar) constraining tool calls, Hermes / Qwen style, to the tools' JSON
    schemas: `<tool_call>\\n{"name": NAME, "arguments": ARGS}\\n</tool_call>`, ARGS valid for NAME's
    `parameters`. tool_choice "auto": free text, and any `<tool_call>` in it is a valid call; "required":
    only calls, at least one, separated by newlines; {"type": "function", "function": {"name": X}}: only
    calls of X. parallel_tool_calls=False: at most one call. None for "none" or no tools.
    """
    if hasattr(tool_choice, "model_dump"):
        tool_choice = tool_choice.model_dump()
    if tool_choice is None:
        tool_choice = "auto"
    schemas: dict[str, Any] = {}
    for tool in tools or ():
        tool = tool.model_dump() if hasattr(tool, "model_dump") else tool
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(
                "each tool must be {'type': 'function', 'function': {'name': ..., 'parameters': ...}}"
            )
        schemas[fn["name"]] = fn.get("parameters") or {"type": "object"}
    if tool_choice == "none" or not schemas:
        return None
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        if name not in schemas:
            raise ValueError(f"tool_choice names {name!r}, which is not among the tools")
        schemas, tool_choice = {name: schemas[name]}, "required"
    if tool_choice not in ("auto", "required"):
        raise ValueError(
            f"tool_choice must be none | auto | required | a named function, got {tool_choice!r}"
        )
    tags = [
        {
            "type": "tag",
            "begin": f'{TOOL_CALL_START}\n{{"name": {json.dumps(name)}, "arguments": ',
            "content": {"type": "json_schema", "json_schema": schema},
            "end": f"}}\n{TOOL_CALL_END}",
        }
        for name, schema in schemas.items()
    ]
    if tool_choice == "auto":
        fmt = {
            "type": "triggered_tags",
            "triggers": [TOOL_CALL_START],
            "tags": tags,
            "stop_after_first": not parallel_tool_calls,
        }
    else:
        fmt = {
            "type": "tags_with_separator",
            "tags": tags,
            "separator": "\n",
            "at_least_one": True,
            "stop_after_first": not parallel_tool_calls,
        }
    try:
        grammar = load_xgrammar().Grammar.from_structural_tag(
            json.dumps({"type": "structural_tag", "format": fmt})
        )
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"tool parameters are not a valid JSON schema: {xgr_message(e)}") from None
    return json_string_fix(str(grammar))


def sampling_from_tools(
    tools: Sequence[Any] | None, tool_choice: Any = "auto", parallel_tool_calls: bool = True
) -> dict[str, Any]:
    """SamplingParams fields constraining tool-call arguments to the tools' schemas ({} when none)."""
    grammar = tool_call_grammar(tools, tool_choice, parallel_tool_calls)
    return {} if grammar is None else {"grammar": grammar}
