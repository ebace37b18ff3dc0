"""Reward functions. A reward function is `fn(text, task) -> float` (or an async one): `text` is what
the model wrote, `task` the dataset row (for math: `task["answer"]`).

The math verifier reads the model's final answer from its last `\\boxed{...}` or, failing that, its last
GSM8K-style `#### <answer>` line, and the reference from `task["answer"]` (a GSM8K solution ending in
`#### n`, or a bare answer). Numbers compare by value: "1,000" == "1000.0", "\\frac{1}{2}" == "0.5",
"$18" == "18"; anything else compares as normalised text.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any

_GSM8K = re.compile(r"####\s*([^\n]*)")
_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mathbf|operatorname)\s*\{([^{}]*)\}")
_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_UNIT_TAIL = re.compile(r"^([-+]?[\d.]+(?:/[\d.]+)?)\s*[a-zA-Z][a-zA-Z\s.]*$")


def extract_boxed(text: str) -> str | None:
    """Contents of the last \\boxed{...} (or \\fbox{...}), braces balanced; None if there is none."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j].strip()
    return None  # unbalanced: the answer was cut off


def extract_gsm8k(text: str) -> str | None:
    """The answer after the last `####`; None if there is none."""
    found = _GSM8K.findall(text)
    return found[-1].strip() if found else None


def extract_answer(text: str) -> str | None:
    boxed = extract_boxed(text)
    return boxed if boxed is not None else extract_gsm8k(text)


def parse_number(s: str) -> Fraction | None:
    """Exact value of a numeric answer ("1,234.50", "$5", "-3/4", "\\frac{3}{4}", "12 apples"), else None."""
    s = _clean(s)
    m = _FRAC.fullmatch(s)
    if m:
        num, den = parse_number(m.group(1)), parse_number(m.group(2))
        return num / den if num is not None and den else None
    m = _UNIT_TAIL.match(s)
    if m:
        s = m.group(1)
    if "/" in s:
        num, _, den = s.partition("/")
        a, b = _to_fraction(num), _to_fraction(den)
        return a / b if a is not None and b else None
    return _to_fraction(s)


def is_equivalent(pred: str, ref: str, rel_tol: float = 1e-6) -> bool:
    a, b = parse_number(pred), parse_number(ref)
    if a is not None and b is not None:
        return a == b or abs(a - b) <= rel_tol * max(abs(a), abs(b))
    return _normalise_text(pred) == _normalise_text(ref)


def math_reward(text: str, task: dict[str, Any]) -> float:
    """1.0 if the final answer in `text` equals task["answer"] (GSM8K `#### n` or bare), else 0.0."""
    ref = str(task["answer"])
    ref = extract_gsm8k(ref) if "####" in ref else (extract_boxed(ref) or ref)
    pred = extract_answer(text)
    return float(pred is not None and ref is not None and is_equivalent(pred, ref))


def _clean(s: str) -> str:
    s = s.strip().strip("$").strip()
    s = s.removeprefix("\\(").removesuffix("\\)").strip()
    prev = None
    while prev != s:
        prev, s = s, _WRAPPERS.sub(r"\1", s)
    for junk in (
        "\\!",
        "\\,",
        "\\;",
        "\\ ",
        "\\$",
        "\\%",
        "%",
        "$",
        "^\\circ",
        "^{\\circ}",
        "\\left",
        "\\right",
    ):
        s = s.replace(junk, "")
    s = s.replace("{,}", "").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"(?<=\d),(?=\d{3}\b)", "", s)  # thousands separators
    s = s.strip().rstrip(".").strip()
    if s.startswith("{") and s.endswith("}"):
        s = s[1:-1].strip()
    return s


def _to_fraction(s: str) -> Fraction | None:
    s = s.strip()
    if not _NUMBER.fullmatch(s):
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def _normalise_text(s: str) -> str:
    return re.sub(r"\s+", "", _clean(s)).lower()
