"""Tool-using multi-turn environment: Python functions as tools, Hermes/Qwen tool calls.

Each turn the model's text is parsed for `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
blocks (gyre.engine.tool_calls, shared with the server). Every call runs with a timeout and its result
goes back as a `tool` message (loss mask 0); a malformed block, an unknown tool, bad arguments, an
exception or a timeout go back as an error message in the same place, never as a crash. A turn without
tool calls is the final answer, scored by `reward_fn(text, task)`.

NOTE: a synchronous tool runs in a worker thread; on timeout the episode moves on but the thread cannot
be killed and runs to its end. Tools that may hang should be async (cancellable) or bound themselves.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from gyre.engine.tool_calls import ToolCall, parse_tool_calls
from gyre.rollout.env import Action, Env, Observation, RewardFn, StepResult, call_reward, chat_prompt

_JSON_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean", list: "array", dict: "object"}


@dataclass
class Tool:
    fn: Callable[..., Any]
    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema of the arguments

    @classmethod
    def from_function(
        cls, fn: Callable[..., Any], name: str | None = None, description: str | None = None
    ) -> Tool:
        """Schema from the signature: annotated int/float/str/bool/list/dict parameters; those without a
        default are required. The description is the docstring's first line."""
        hints = typing.get_type_hints(fn)
        props, required = {}, []
        for p in inspect.signature(fn).parameters.values():
            t = hints.get(p.name)
            props[p.name] = {"type": _JSON_TYPES[t]} if t in _JSON_TYPES else {}
            if p.default is inspect.Parameter.empty:
                required.append(p.name)
        doc = (description or inspect.getdoc(fn) or "").strip().split("\n")[0]
        return cls(
            fn, name or fn.__name__, doc, {"type": "object", "properties": props, "required": required}
        )

    @property
    def schema(self) -> dict[str, Any]:
        """What the chat template lists under `tools`."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }

    async def run(self, arguments: dict[str, Any], timeout_s: float) -> str:
        """The result as text; failures come back as "Error: ..." text."""
        try:
            if inspect.iscoroutinefunction(self.fn):
                out = await asyncio.wait_for(self.fn(**arguments), timeout_s)
            else:
                out = await asyncio.wait_for(asyncio.to_thread(self.fn, **arguments), timeout_s)
        except asyncio.TimeoutError:
            return f"Error: tool {self.name!r} timed out after {timeout_s:g} s"
        except TypeError as e:  # wrong / missing arguments
            return f"Error: bad arguments for tool {self.name!r}: {e}"
        except Exception as e:  # noqa: BLE001 - the model sees the error, the episode goes on
            return f"Error: tool {self.name!r} raised {type(e).__name__}: {e}"
        if isinstance(out, str):
            return out
        try:
            return json.dumps(out)
        except (TypeError, ValueError):
            return str(out)


class ToolEnv(Env):
    def __init__(
        self,
        tools: Sequence[Tool | Callable[..., Any]],
        reward_fn: RewardFn,
        system_prompt: str | None = None,
        max_turns: int = 8,
        max_tokens: int = 2048,
        tool_timeout_s: float = 10.0,
        agent: str = "policy",
    ) -> None:
        self.tools = {t.name: t for t in (x if isinstance(x, Tool) else Tool.from_function(x) for x in tools)}
        self.reward_fn = reward_fn
        self.system_prompt = system_prompt
        self.max_turns = max_turns
        self.max_tokens = max_tokens
        self.tool_timeout_s = tool_timeout_s
        self.agent = agent
        self.task: dict[str, Any] = {}

    async def reset(self, task: dict[str, Any]) -> Observation:
        self.task = task
        return Observation(
            self.agent,
            chat_prompt(task["prompt"], self.system_prompt),
            tools=[t.schema for t in self.tools.values()],
        )

    async def step(self, agent: str, action: Action) -> StepResult:
        parsed = parse_tool_calls(action.text)
        if not parsed.tool_calls and not parsed.invalid:
            return StepResult(None, await call_reward(self.reward_fn, action.text, self.task))
        results = await asyncio.gather(*(self._call(c) for c in parsed.tool_calls))
        errors = [
            f"Error: malformed tool call {body.strip()[:200]!r}; expected <tool_call>"
            '{"name": <tool name>, "arguments": {...}}</tool_call>'
            for body in parsed.invalid
        ]
        messages = [{"role": "tool", "content": text} for text in [*results, *errors]]
        info = {
            "num_tool_calls": len(parsed.tool_calls),
            "num_tool_errors": len(errors) + sum(r.startswith("Error:") for r in results),
        }
        return StepResult(Observation(agent, messages), 0.0, info)

    async def _call(self, call: ToolCall) -> str:
        tool = self.tools.get(call.name)
        if tool is None:
            return f"Error: unknown tool {call.name!r}; available: {', '.join(sorted(self.tools))}"
        return await tool.run(call.arguments, self.tool_timeout_s)
