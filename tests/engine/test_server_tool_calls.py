"""Tool-call parsing (gyre.engine.tool_calls) and the server's incremental text: what streams is never
taken back, whatever the tokens."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gyre.engine.tokens import TokenizerHelper
from gyre.engine.tool_calls import ToolCall, parse_tool_calls, partial_suffix, streamable_prefix
from gyre.testing import tiny_tokenizer

CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'


def test_parse_plain_text():
    out = parse_tool_calls("Hello there.")
    assert out.content == "Hello there." and out.tool_calls == [] and out.invalid == []


def test_parse_qwen_style_calls():
    text = f'Let me check.\n<tool_call>\n{CALL}\n</tool_call>\n<tool_call>{{"name": "search", "arguments": {{}}}}</tool_call>'
    out = parse_tool_calls(text)
    assert out.tool_calls == [ToolCall("get_weather", {"city": "Paris"}), ToolCall("search", {})]
    assert out.content == "Let me check.\n\n" and out.invalid == []
    item = out.tool_calls[0].to_openai("call_1")
    assert item["type"] == "function" and json.loads(item["function"]["arguments"]) == {"city": "Paris"}


def test_parse_unterminated_and_stringified_arguments():
    # generation stopped on the stop string "</tool_call>", which the text does not include
    assert parse_tool_calls(f"<tool_call>\n{CALL}\n").tool_calls == [
        ToolCall("get_weather", {"city": "Paris"})
    ]
    stringified = '<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>'
    assert parse_tool_calls(stringified).tool_calls == [ToolCall("f", {"x": 1})]


@pytest.mark.parametrize(
    "body",
    [
        "{not json}",
        '{"arguments": {}}',
        '{"name": "", "arguments": {}}',
        '{"name": "f", "arguments": [1]}',
        '["f"]',
        '{"name": 3}',
        '{"name": "f", "arguments": "not json"}',
    ],
)
def test_malformed_calls_stay_in_the_content(body):
    text = f"a<tool_call>{body}</tool_call>b<tool_call>{CALL}</tool_call>"
    out = parse_tool_calls(text)
    assert out.invalid == [body]
    assert out.tool_calls == [ToolCall("get_weather", {"city": "Paris"})]
    assert out.content == f"a<tool_call>{body}</tool_call>b"


def test_streamable_prefix():
    assert streamable_prefix("Hello <tool") == len("Hello ")
    assert streamable_prefix("Hello <tool_call>{") == len("Hello ")
    assert streamable_prefix("a < b") == len("a < b")
    assert partial_suffix("abc<", "<tool_call>") == 1 and partial_suffix("abc", "<tool_call>") == 0


@given(st.text(alphabet='ab<tol_c>{}"', max_size=40))
def test_parse_never_raises(text):
    out = parse_tool_calls(text)
    assert isinstance(out.content, str)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> TokenizerHelper:
    path = tmp_path_factory.mktemp("tok")
    tiny_tokenizer(path)
    return TokenizerHelper(str(path), SimpleNamespace(eos_token_id=2))


def _stream(
    tokens: TokenizerHelper, ids: list[int], stop: list[str] | None, tools: bool
) -> tuple[str, str, str]:
    """(the text streamed token by token, that plus the final piece, the final content of the reply)."""
    pytest.importorskip("fastapi")
    from gyre.engine.server.generation import TextStream

    s = TextStream(tokens, stop, tools)
    sent = "".join(s.push(t) for t in ids)
    final = tokens.decode(ids)  # as the engine ends it: cut before a stop string, tool calls parsed out
    cuts = [final.find(x) for x in stop or [] if x in final]
    final = final[: min(cuts)] if cuts else final
    if tools:
        final = parse_tool_calls(final).content
    return sent, sent + s.finish(final), final


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_streamed_text_is_never_taken_back(tokens, data):
    """Random token ids (partial UTF-8, special tokens, tool-call markers, stop strings spanning tokens):
    the streamed deltas plus the final piece are exactly the final content."""
    pieces = ["Hello", " world", "<tool_call>", "</tool_call>", CALL, "é", "日本", "\n", "<|im_end|>"]
    vocab = [t for p in pieces for t in tokens.encode(p)] + list(range(3, 1500))
    ids = data.draw(st.lists(st.sampled_from(vocab), max_size=30))
    stop = data.draw(
        st.one_of(
            st.none(), st.lists(st.sampled_from(["wor", "ld", "<tool", "\n", "é"]), min_size=1, max_size=2)
        )
    )
    texts = [tokens.decode([t]) for t in ids]
    spans = [a[-1] + b[:2] for a, b in zip(texts, texts[1:]) if a and b and "\ufffd" not in a + b]
    if spans and data.draw(st.booleans()):  # a stop string across a token boundary
        stop = [data.draw(st.sampled_from(spans))]
    tools = data.draw(st.booleans())
    sent, full, final = _stream(tokens, ids, stop, tools)
    assert full == final
    assert not any(s in sent for s in stop or [])
    assert not (tools and "<tool_call>" in sent)


def test_tool_call_is_held_back_while_streaming(tokens):
    ids = tokens.encode("Sure.") + tokens.encode(f"<tool_call>\n{CALL}\n</tool_call>")
    sent, full, _ = _stream(tokens, ids, None, True)
    assert sent == full == "Sure."
