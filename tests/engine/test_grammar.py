"""Grammar-constrained decoding on the CPU with a tiny random-weight model: the mask does all the work.

Every constrained output must finish with "stop" (the grammar completed within max_new_tokens) and be
valid: JSON parsed by `json` and validated by `jsonschema` (formats checked), regexes by re.fullmatch,
EBNF by a recursive-descent parser written here.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import subprocess
import sys
import threading

import pytest
import torch

import gyre.engine.grammar as grammar_module
from gyre import Engine, SamplingParams
from gyre.engine.grammar import (
    GrammarBackend,
    accept_tokens,
    apply_token_mask,
    sampling_from_response_format,
    unpack_bitmask,
)
from gyre.engine.grammar_tools import sampling_from_tools, tool_call_grammar
from gyre.engine.request import Request, Status
from gyre.engine.tool_calls import parse_tool_calls
from gyre.testing import tiny_model

xgr = pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 6},
                    "age": {"type": "integer", "minimum": 0, "maximum": 99},
                },
                "required": ["name", "age"],
            },
            "active": {"type": "boolean"},
        },
        "required": ["user", "active"],
    },
    "arrays": {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
            "scores": {
                "type": "array",
                "items": {"type": "integer", "minimum": -5, "maximum": 5},
                "maxItems": 2,
            },
        },
        "required": ["tags", "scores"],
    },
    "enums": {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "size": {"type": "string", "enum": ["S", "M", "L"]},
            "kind": {"const": "shirt"},
        },
        "required": ["color", "size", "kind"],
    },
    "any_of": {
        "type": "object",
        "properties": {
            "value": {
                "anyOf": [
                    {"type": "integer", "minimum": 0, "maximum": 9},
                    {"type": "string", "maxLength": 3},
                    {"type": "null"},
                ]
            }
        },
        "required": ["value"],
    },
    "formats": {
        "type": "object",
        "properties": {
            "day": {"type": "string", "format": "date"},
            "id": {"type": "string", "format": "uuid"},
            "ip": {"type": "string", "format": "ipv4"},
        },
        "required": ["day", "id", "ip"],
    },
    "numbers": {
        "type": "object",
        "properties": {
            "x": {"type": "number", "minimum": -1.5, "maximum": 2.5},
            "n": {"type": "integer", "exclusiveMinimum": 0, "maximum": 1000},
        },
        "required": ["x", "n"],
    },
    "top_array": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"k": {"type": "integer", "minimum": 0, "maximum": 3}},
            "required": ["k"],
        },
        "minItems": 1,
        "maxItems": 2,
    },
    "optional": {
        "type": "object",
        "properties": {"a": {"type": "boolean"}, "b": {"type": "null"}},
        "additionalProperties": False,
    },
}

REGEXES = [
    r"\d{3}-\d{4}",
    r"(yes|no|maybe)",
    r"[a-z]{2,6}@[a-z]{2,5}\.(com|org)",
    r"-?(0|[1-9][0-9]{0,3})(\.[0-9]{1,2})?",
    r"[A-Z][a-z]{1,8}( [A-Z][a-z]{1,8}){0,2}",
]

# arithmetic with bounded nesting, and nested lists (recursive)
EXPR_EBNF = r"""
root ::= expr
expr ::= term (("+" | "-") term){0,3}
term ::= factor (("*" | "/") factor){0,2}
factor ::= num | "(" inner ")"
inner ::= num (("+" | "-") num){0,2}
num ::= [0-9] | [1-9] [0-9]
"""
LIST_EBNF = r"""
root ::= list
list ::= "[" (item ("," item){0,3})? "]"
item ::= [a-z] | list
"""

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]}, "unit": {"enum": ["c", "f"]}},
                "required": ["city", "unit"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "parameters": {
                "type": "object",
                "properties": {
                    "a": {"type": "integer", "minimum": 0, "maximum": 99},
                    "b": {"type": "integer", "minimum": 0, "maximum": 99},
                },
                "required": ["a", "b"],
            },
        },
    },
]

SAMPLING = [(0.0, 0), (1.0, 0), (1.0, 1), (1.0, 2)]  # greedy, then sampled with three seeds


# -- checkers -----------------------------------------------------------------------------------------
def check_json(text: str, schema: dict) -> None:
    validator = jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )
    validator.validate(json.loads(text))


class _Parser:
    """Recursive descent over EXPR_EBNF / LIST_EBNF; raises ValueError on anything else."""

    def __init__(self, text: str) -> None:
        self.s, self.i = text, 0

    def peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def eat(self, chars: str) -> str:
        c = self.peek()
        if not c or c not in chars:
            raise ValueError(f"expected one of {chars!r} at {self.i} in {self.s!r}")
        self.i += 1
        return c

    def done(self) -> None:
        if self.i != len(self.s):
            raise ValueError(f"trailing text at {self.i} in {self.s!r}")

    def num(self) -> None:
        if self.eat("0123456789") != "0" and self.peek().isdigit():
            self.i += 1

    def repeat(self, ops: str, item, most: int) -> None:
        item()
        for _ in range(most):
            if not self.peek() or self.peek() not in ops:
                return
            self.i += 1
            item()

    def factor(self) -> None:
        if self.peek() == "(":
            self.i += 1
            self.repeat("+-", self.num, 2)
            self.eat(")")
        else:
            self.num()

    def expr(self) -> None:
        self.repeat("+-", lambda: self.repeat("*/", self.factor, 2), 3)

    def lst(self) -> None:
        self.eat("[")
        if self.peek() != "]":
            self.repeat(",", self.item, 3)
        self.eat("]")

    def item(self) -> None:
        if self.peek() == "[":
            self.lst()
        else:
            self.eat("abcdefghijklmnopqrstuvwxyz")


def parse(text: str, rule: str) -> None:
    p = _Parser(text)
    getattr(p, rule)()
    p.done()


# -- fixtures -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(tiny_model("qwen3", tmp_path_factory.mktemp("grammar") / "qwen3"))


@pytest.fixture(scope="module")
def engine(model_dir):
    eng = Engine(model_dir, device="cpu")
    # Random weights pick whitespace as often as anything else (greedy can loop on it): cap its runs so
    # that outputs stay short. test_json_any_whitespace covers the default.
    eng.grammar.json_max_whitespace = 2
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def prompt(engine) -> list[int]:
    return engine.tokenizer.encode("Answer in the requested format:")


def _params(temperature: float, seed: int, max_new_tokens: int = 160, **constraint) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, **constraint)


# -- outputs are valid ----------------------------------------------------------------------------------
def test_json_regex_ebnf_all_valid_in_one_mixed_batch(engine, prompt):
    """Every schema, regex and grammar, greedy and sampled, and unconstrained requests, in one batch."""
    cases = []  # (SamplingParams, checker)
    for schema in SCHEMAS.values():
        cases += [
            (_params(t, s, json_schema=schema), lambda x, sc=schema: check_json(x, sc)) for t, s in SAMPLING
        ]
    for rx in REGEXES:
        cases += [
            (_params(t, s, regex=rx), lambda x, r=rx: re.fullmatch(r, x) or pytest.fail(f"{x!r} !~ {r}"))
            for t, s in SAMPLING
        ]
    for ebnf, rule in ((EXPR_EBNF, "expr"), (LIST_EBNF, "lst")):
        cases += [(_params(t, s, grammar=ebnf), lambda x, r=rule: parse(x, r)) for t, s in SAMPLING]
    free = [_params(t, s, max_new_tokens=24) for t, s in SAMPLING[:2]]
    for sp in free:
        sp.ignore_eos = True
    alone = engine.generate([prompt] * len(free), free)

    outs = engine.generate([prompt] * (len(cases) + len(free)), [sp for sp, _ in cases] + free)

    for (sp, check), out in zip(cases, outs):
        assert out.finish_reason == "stop", (sp, out.text)
        assert out.output_ids[-1] in engine.tokens.eos_ids  # the grammar ends with a stop token
        check(out.text)
    for a, b in zip(alone, outs[len(cases) :]):  # unconstrained rows are untouched by their neighbours' masks
        assert a.output_ids == b.output_ids and b.finish_reason == "length"
    greedy = [o.output_ids for (sp, _), o in zip(cases, outs) if sp.temperature == 0]
    sampled = [o.output_ids for (sp, _), o in zip(cases, outs) if sp.temperature > 0]
    assert len({tuple(x) for x in sampled}) > len(sampled) // 2  # sampling really samples under the mask
    assert len(greedy) == len(SCHEMAS) + len(REGEXES) + 2


def test_json_any_whitespace(engine, prompt):
    """The default JSON grammar (any whitespace between tokens) gives valid JSON too."""
    engine.grammar.json_max_whitespace = None
    try:
        names = ["enums", "numbers", "any_of", "top_array"]
        sps = [
            _params(1.0, seed, max_new_tokens=240, json_schema=SCHEMAS[n]) for n in names for seed in (5, 6)
        ]
        outs = engine.generate([prompt] * len(sps), sps)
    finally:
        engine.grammar.json_max_whitespace = 2
    for sp, out in zip(sps, outs):
        assert out.finish_reason == "stop", out.text
        check_json(out.text, sp.json_schema)


def test_logprobs_are_those_of_the_masked_distribution(engine, prompt):
    sp = _params(1.0, 3, regex="[01]", top_logprobs=5)
    (out,) = engine.generate([prompt], sp)
    tok = engine.tokenizer
    digits = set(tok.convert_tokens_to_ids(["0", "1"]))
    assert out.text in ("0", "1") and out.finish_reason == "stop" and len(out.output_ids) == 2
    first, stop = out.top_logprobs
    assert set(first) == digits  # masked tokens are absent from top_logprobs
    assert set(stop) <= engine.tokens.eos_ids  # once complete, only stop tokens
    for top, token, lp in zip(out.top_logprobs, out.output_ids, out.output_logprobs):
        assert math.isclose(
            sum(math.exp(v) for v in top.values()), 1.0, rel_tol=1e-4
        )  # renormalised by the mask
        assert math.isclose(top[token], lp, abs_tol=1e-5)


# -- tool calls, response_format ------------------------------------------------------------------------
def test_tool_calls_required_and_named(engine):
    tok = engine.tokenizer
    msgs = [{"role": "user", "content": "What is the weather in Paris? And 2 + 3?"}]
    prompt = tok.apply_chat_template(msgs, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    ids = tok.encode(prompt)
    required = sampling_from_tools(TOOLS, "required", parallel_tool_calls=False)
    named = sampling_from_tools(TOOLS, {"type": "function", "function": {"name": "add"}})
    sps = [_params(t, s, **required) for t, s in SAMPLING] + [_params(t, s, **named) for t, s in SAMPLING]
    outs = engine.generate([ids] * len(sps), sps)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for i, out in enumerate(outs):
        assert out.finish_reason == "stop"
        parsed = parse_tool_calls(out.text)
        assert not parsed.invalid and parsed.content.strip() == "" and parsed.tool_calls, out.text
        if i < len(SAMPLING):
            assert len(parsed.tool_calls) == 1  # parallel_tool_calls=False
        for call in parsed.tool_calls:
            assert i < len(SAMPLING) or call.name == "add"
            jsonschema.validate(call.arguments, schemas[call.name])


def _accepts(backend: GrammarBackend, sp: SamplingParams, text: str) -> bool:
    m = backend.new_state(backend.compile(sp), sp).matcher
    return m.accept_string(text) and m.is_completed()


def test_tool_call_auto_grammar(engine):
    """auto: free text, and whatever follows <tool_call> is a valid call of one of the tools."""
    sp = SamplingParams(**sampling_from_tools(TOOLS, "auto"))
    call = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
    assert _accepts(engine.grammar, sp, "Let me think.")
    assert _accepts(engine.grammar, sp, "Sure. " + call + " done")
    assert not _accepts(engine.grammar, sp, call.replace('"b": 3', '"b": 300'))
    assert not _accepts(engine.grammar, sp, call.replace("add", "sub"))
    assert tool_call_grammar(TOOLS, "none") is None and sampling_from_tools([], "required") == {}
    with pytest.raises(ValueError, match="not among the tools"):
        tool_call_grammar(TOOLS, {"type": "function", "function": {"name": "nope"}})


def test_response_format_mapping(engine):
    assert sampling_from_response_format(None) == {} == sampling_from_response_format({"type": "text"})
    schema = SCHEMAS["enums"]
    fields = sampling_from_response_format(
        {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    )
    assert fields == {"json_schema": schema}
    fields = sampling_from_response_format({"type": "json_object"})
    sp = SamplingParams(**fields)
    assert _accepts(engine.grammar, sp, '{"a": [1, {"b": null}], "c": "d"}')
    assert not _accepts(engine.grammar, sp, "[1, 2]")
    with pytest.raises(ValueError):
        sampling_from_response_format({"type": "yaml"})


# -- failures stay with their request -------------------------------------------------------------------
# 400 properties, each a regex or a range: seconds of compilation on a 1500-token vocabulary
SLOW_SCHEMA = {
    "type": "object",
    "properties": {
        f"p{i}": {
            "anyOf": [
                {"type": "string", "pattern": f"[a-z]{{{i % 7},{i % 7 + 5}}}x"},
                {"type": "integer", "minimum": i, "maximum": i * 1000 + 7},
            ]
        }
        for i in range(400)
    },
}
INVALID = [
    (dict(json_schema={"type": "foo"}), "json_schema is invalid"),
    (dict(json_schema='{"type": "object",'), "json_schema is not valid JSON"),
    (dict(json_schema={"type": "integer", "minimum": 5, "maximum": 1}), "json_schema is invalid"),
    (dict(regex="(ab"), "regex is invalid"),
    (dict(regex="a{3,1}"), "regex is invalid"),
    (dict(grammar="root ::= undefined_rule"), "grammar is invalid"),
    (dict(grammar='start ::= "a"'), "grammar is invalid"),
]


def _mixed_requests() -> list[SamplingParams]:
    """20 requests: JSON schemas, regexes, an EBNF grammar and unconstrained, greedy and sampled."""
    good = []
    for i in range(20):
        t, s = SAMPLING[i % len(SAMPLING)]
        if i % 4 == 0:
            good.append(_params(t, s, json_schema=list(SCHEMAS.values())[i % len(SCHEMAS)]))
        elif i % 4 == 1:
            good.append(_params(t, s, regex=REGEXES[i % len(REGEXES)]))
        elif i % 4 == 2:
            good.append(_params(t, s, grammar=LIST_EBNF))
        else:
            good.append(_params(t, s, max_new_tokens=16))
    return good


def _check_finished(good: list[SamplingParams], outs: list) -> None:
    for sp, out in zip(good, outs, strict=True):
        assert not isinstance(out, BaseException), out
        assert out.finish_reason == ("stop" if sp.is_constrained else "length")


def test_invalid_grammars_fail_only_their_request(engine, prompt):
    good = _mixed_requests()

    async def run():
        loop = asyncio.get_running_loop()
        good_tasks = [engine.agenerate(prompt, sp) for sp in good]
        bad_tasks = [
            loop.run_in_executor(None, engine.generate, [prompt], _params(1.0, 0, **f)) for f, _ in INVALID
        ]
        return await asyncio.gather(*good_tasks, return_exceptions=True), await asyncio.gather(
            *bad_tasks, return_exceptions=True
        )

    good_outs, bad_outs = asyncio.run(run())
    _check_finished(good, good_outs)
    for (_, message), err in zip(INVALID, bad_outs, strict=True):
        assert isinstance(err, ValueError) and message in str(err) and str(err).startswith("prompt 0"), err
    # a batch with one bad request queues nothing; the engine goes on
    with pytest.raises(ValueError, match="regex is invalid"):
        engine.generate([prompt, prompt], [_params(0.0, 0, regex="[a-z]"), _params(0.0, 0, regex="(")])
    assert engine.generate([prompt], _params(0.0, 0, regex="[a-z]"))[0].finish_reason == "stop"
    assert engine.stats()["num_running"] == 0


def test_slow_grammar_times_out_while_others_run(engine, prompt):
    good = _mixed_requests()
    for sp in good:  # compiled before the short timeout below
        if sp.is_constrained:
            engine.grammar.compile(sp)
    outs: list = []
    runner = threading.Thread(target=lambda: outs.extend(engine.generate([prompt] * len(good), good)))
    runner.start()
    engine.grammar.compile_timeout_s = 0.05
    try:
        with pytest.raises(ValueError, match="json_schema: the grammar did not compile within 0.05 s"):
            engine.generate([prompt], _params(1.0, 0, json_schema=SLOW_SCHEMA))
    finally:
        engine.grammar.compile_timeout_s = 30.0
    runner.join(timeout=120)
    _check_finished(good, outs)


def test_compile_cache_and_lru(engine):
    backend = GrammarBackend(engine.tokenizer, engine.vocab_size, engine.tokens.eos_ids, cache_size=2)
    a, b, c = (SamplingParams(regex=r) for r in ("a+", "b+", "c+"))
    first = backend.compile(a)
    assert backend.compile(SamplingParams(regex="a+")) is first and backend.num_cached == 1
    backend.compile(b)
    backend.compile(c)
    assert backend.num_cached == 2 and backend.compile(a) is not first  # evicted, compiled again


def test_without_xgrammar_or_tokenizer(engine, monkeypatch):
    with pytest.raises(ValueError, match="needs a tokenizer"):
        GrammarBackend(None, engine.vocab_size, [2]).compile(SamplingParams(regex="a"))
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # import xgrammar -> ImportError
    with pytest.raises(ValueError, match="pip install xgrammar"):
        GrammarBackend(engine.tokenizer, engine.vocab_size, [2]).compile(SamplingParams(regex="a"))


def test_engine_imports_and_runs_without_xgrammar(model_dir):
    code = (
        "import sys; sys.modules['xgrammar'] = None\n"
        "from gyre import Engine, SamplingParams\n"
        f"e = Engine({model_dir!r}, device='cpu')\n"
        "assert e.generate([[5, 6]], SamplingParams(max_new_tokens=3))[0].finish_reason == 'length'\n"
        "try:\n"
        "    e.generate([[5, 6]], SamplingParams(regex='a'))\n"
        "except ValueError as err:\n"
        "    assert 'pip install xgrammar' in str(err)\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
        "e.shutdown()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# -- matcher state: retraction, rollback, no overlap -----------------------------------------------------
def test_retraction_does_not_re_advance_matchers(model_dir):
    """A KV pool too small for the batch: requests are retracted and recomputed mid-grammar."""
    with Engine(model_dir, device="cpu", max_num_tokens=160, page_size=8) as eng:
        eng.grammar.json_max_whitespace = 2
        prompt = eng.tokenizer.encode("Give me JSON:")
        schemas = [SCHEMAS[n] for n in ("nested", "formats", "arrays", "enums")]
        sps = [_params(1.0, seed, max_new_tokens=120, json_schema=s) for seed in range(2) for s in schemas]
        outs = eng.generate([prompt] * len(sps), sps)
        assert eng.stats()["num_retractions"] > 0
    for sp, out in zip(sps, outs):
        assert out.finish_reason == "stop", out.text
        check_json(out.text, sp.json_schema)


def test_without_overlap(model_dir):
    with Engine(model_dir, device="cpu", overlap_schedule=False) as eng:
        prompt = eng.tokenizer.encode("Hi")
        sps = [_params(t, s, regex=REGEXES[2]) for t, s in SAMPLING] + [_params(1.0, 0, grammar=EXPR_EBNF)]
        outs = eng.generate([prompt] * len(sps), sps)
    assert all(o.finish_reason == "stop" for o in outs)
    assert all(re.fullmatch(REGEXES[2], o.text) for o in outs[:-1])
    parse(outs[-1].text, "expr")


def test_n_completions_have_their_own_matchers(engine, prompt):
    sp = _params(1.0, 7, regex=REGEXES[2], n=3)
    outs = engine.generate([prompt], sp)
    assert len(outs) == 3 and len({o.text for o in outs}) > 1
    assert all(o.finish_reason == "stop" and re.fullmatch(REGEXES[2], o.text) for o in outs)


def test_rollback(engine):
    tok = engine.tokenizer
    sp = SamplingParams(regex="ab(c|d)")
    state = engine.grammar.new_state(engine.grammar.compile(sp), sp)
    a, b, c, d = tok.convert_tokens_to_ids(list("abcd"))
    assert state.accept(a) and state.accept(b) and state.accept(c)
    state.rollback(1)  # a rejected speculative token
    assert not state.accept(a) and state.accept(d)
    state.rollback(2)
    assert state.accept(b) and state.accept(c) and state.accept(2) and state.is_terminated


# -- the batched mask path --------------------------------------------------------------------------------
def _running(request_id: str, sp: SamplingParams) -> Request:
    req = Request(request_id, [1, 2], sp, 0, 0)
    req.status = Status.RUNNING
    return req


@pytest.mark.parametrize("native_accept", [True, False], ids=["native-accept", "xgrammar-accept"])
def test_batched_masks_and_accepts_match_per_request(engine, monkeypatch, native_accept):
    """fill_bitmask (one batched fill into reused buffers) and accept_tokens (one batched accept) give,
    step for step, what each request's own matcher gives one call at a time: over JSON schemas, regexes
    and EBNF, rows in a new order each step, unconstrained rows, finished requests and rejected tokens."""
    if not native_accept:
        monkeypatch.setattr(grammar_module, "_native_batch_accept", lambda: None)
    backend = engine.grammar
    sps = [SamplingParams(json_schema=s) for s in SCHEMAS.values()]
    sps += [SamplingParams(regex=r) for r in REGEXES]
    sps += [SamplingParams(grammar=EXPR_EBNF), SamplingParams(grammar=LIST_EBNF)]
    reqs, twins = [], {}  # twins: the same grammar, driven through the per-request calls
    for i, sp in enumerate(sps * 3):
        req = _running(f"c{i}", sp)
        req.grammar = backend.new_state(backend.compile(sp), sp)
        twins[req.request_id] = backend.new_state(backend.compile(sp), sp)
        reqs.append(req)
    free = [_running(f"f{i}", SamplingParams()) for i in range(3)]
    rng = random.Random(0)
    width = (backend.vocab_size + 31) // 32
    num_rejected = num_finished = 0
    for step in range(40):
        active = [r for r in reqs if not r.is_finished]
        if step % 3 == 0:  # every row constrained and running: the fill without row indices
            batch = active
        else:
            batch = rng.sample(reqs, rng.randint(1, len(reqs))) + free[: rng.randint(0, len(free))]
        rng.shuffle(batch)
        got = backend.fill_bitmask(batch)

        want = torch.full((len(batch), width), -1, dtype=torch.int32)
        for i, r in enumerate(batch):
            if r.grammar is not None and not r.is_finished:
                twins[r.request_id].matcher.fill_next_token_bitmask(want, i)
        assert torch.equal(got, want), step

        rows = [i for i, r in enumerate(batch) if r.grammar is not None and not r.is_finished]
        allowed = unpack_bitmask(want, backend.vocab_size)
        tokens = []
        for i in rows:
            ids = allowed[i].nonzero().flatten().tolist()
            if rng.random() < 0.1:  # a token the grammar forbids
                ids = (~allowed[i]).nonzero().flatten().tolist() or ids
            tokens.append(rng.choice(ids))
        accepted = accept_tokens([batch[i].grammar for i in rows], tokens)
        assert accepted == [twins[batch[i].request_id].accept(t) for i, t in zip(rows, tokens)], step
        num_rejected += accepted.count(False)
        for i in rows:
            if batch[i].grammar.is_terminated:
                assert twins[batch[i].request_id].is_terminated
                batch[i].status = Status.FINISHED
                num_finished += 1
    assert num_rejected > 0 and num_finished > 0


def test_bitmask_buffers_are_reused_in_turn(engine):
    """A fill's bitmask stays intact through the next fill (its copy to the device may still be queued);
    the fill after next reuses its memory."""
    sp = SamplingParams(regex="[0-9]{3}")
    req = _running("r", sp)
    req.grammar = engine.grammar.new_state(engine.grammar.compile(sp), sp)
    first = engine.grammar.fill_bitmask([req])
    kept = first.clone()
    second = engine.grammar.fill_bitmask([req, _running("free", SamplingParams())])
    assert torch.equal(first, kept) and second.data_ptr() != first.data_ptr()
    assert engine.grammar.fill_bitmask([req]).data_ptr() == first.data_ptr()


def _bitmask_of(allowed: torch.Tensor) -> torch.Tensor:
    """[B, V] bool -> [B, ceil(V / 32)] int32 bitmask (random bits past V)."""
    b, v = allowed.shape
    width = (v + 31) // 32
    bits = torch.randint(0, 2, (b, width * 32), dtype=torch.int64)
    bits[:, :v] = allowed.long()
    words = (bits.view(b, width, 32) << torch.arange(32)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def test_apply_token_mask_matches_bool_mask():
    g = torch.Generator().manual_seed(0)
    allowed = torch.rand(3, 70, generator=g) < 0.3  # vocab not a multiple of 32
    bitmask = _bitmask_of(allowed)
    assert torch.equal(unpack_bitmask(bitmask, 70), allowed)
    logits = torch.randn(3, 70, generator=g)
    assert torch.equal(apply_token_mask(logits.clone(), bitmask), apply_token_mask(logits, allowed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bitmask_on_cpu_matches_torch_reference(dtype):
    """apply_token_mask of a bitmask on the CPU (in place, numpy's unpack) against unpack_bitmask."""
    torch.manual_seed(0)
    for batch, vocab in [(1, 1), (2, 31), (3, 32), (4, 33), (5, 1000), (2, 151936), (1, 128256)]:
        allowed = torch.rand(batch, vocab) < 0.5
        bitmask = _bitmask_of(allowed)
        logits = torch.randn(batch, vocab).to(dtype)
        want = logits.masked_fill(~unpack_bitmask(bitmask, vocab), float("-inf"))
        got = apply_token_mask(logits, bitmask)
        assert got.data_ptr() == logits.data_ptr()  # in place
        assert torch.equal(got, want), (batch, vocab)
        assert torch.equal(unpack_bitmask(bitmask, vocab), allowed)
    rows = _bitmask_of(torch.rand(6, 70) < 0.5)[::2]  # a strided view of rows
    logits = torch.randn(3, 70)
    want = logits.masked_fill(~unpack_bitmask(rows, 70), float("-inf"))
    assert torch.equal(apply_token_mask(logits, rows), want)


@pytest.mark.gpu
def test_gpu_cuda_graphs_and_bitmask_kernel(model_dir):
    """On the GPU: decode steps replay CUDA graphs, the bitmask is applied on the device."""
    import torch

    g = torch.Generator().manual_seed(1)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (5, 48), generator=g, dtype=torch.int64).to(torch.int32)
    logits = torch.randn(5, 1536, generator=g)
    want = apply_token_mask(logits.clone(), bitmask)
    assert torch.equal(apply_token_mask(logits.cuda(), bitmask.pin_memory()).cpu(), want)
    with Engine(model_dir, device="cuda") as eng:
        eng.grammar.json_max_whitespace = 2
        prompt = eng.tokenizer.encode("JSON please:")
        schemas = list(SCHEMAS.values())
        sps = [_params(t, s, json_schema=sc) for sc in schemas for t, s in SAMPLING]
        sps += [_params(t, s, regex=rx) for rx in REGEXES for t, s in SAMPLING]
        sps += [_params(1.0, s, max_new_tokens=32, ignore_eos=True) for s in range(4)]
        outs = eng.generate([prompt] * len(sps), sps)
    for sp, out in zip(sps, outs):
        if sp.json_schema is not None:
            assert out.finish_reason == "stop", out.text
            check_json(out.text, sp.json_schema)
        elif sp.regex is not None:
            assert out.finish_reason == "stop" and re.fullmatch(sp.regex, out.text), out.text
        else:
            assert out.finish_reason == "length"


@pytest.mark.gpu
def test_gpu_bitmask_is_pinned_and_matches_cpu(engine):
    """With pin=True the reused bitmask buffer is page-locked (its copy to the device is asynchronous),
    and the device kernel masks as the CPU path does."""
    sp = SamplingParams(json_schema=SCHEMAS["nested"])
    req = _running("r", sp)
    req.grammar = engine.grammar.new_state(engine.grammar.compile(sp), sp)
    for _ in range(3):  # both buffers, then the first again
        bitmask = engine.grammar.fill_bitmask([req, _running("free", SamplingParams())], pin=True)
        assert bitmask.is_pinned()
    logits = torch.randn(2, engine.vocab_size, device="cuda")
    want = apply_token_mask(logits.cpu(), bitmask)
    assert torch.equal(apply_token_mask(logits, bitmask).cpu(), want)
