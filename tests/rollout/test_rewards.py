"""The math verifier: GSM8K `#### n` and \\boxed{} answers, compared by value."""

from __future__ import annotations

import pytest

from gyre.rollout.rewards import extract_answer, extract_boxed, is_equivalent, math_reward, parse_number

GSM8K_SOLUTION = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nAltogether she sold 48+24 = <<48+24=72>>72.\n#### 72"
)


@pytest.mark.parametrize(
    "pred, ref",
    [
        ("72", "72"),
        ("1,000", "1000"),
        ("1000.00", "1,000"),
        ("$18", "18"),
        ("\\$18.00", "18"),
        ("\\frac{1}{2}", "0.5"),
        ("\\dfrac{3}{4}", "3/4"),
        ("-3/4", "-0.75"),
        ("12 apples", "12"),
        ("\\text{12 apples}", "12"),
        ("50\\%", "50"),
        ("1e3", "1000"),
        ("{7}", "7"),
        ("7.", "7"),
        ("x + 1", "x+1"),
        ("\\frac{\\sqrt{2}}{2}", "\\frac{\\sqrt{2}}{2}"),
    ],
)
def test_equivalent(pred, ref):
    assert is_equivalent(pred, ref)


@pytest.mark.parametrize("pred, ref", [("71", "72"), ("0.33", "1/3"), ("x", "y"), ("", "0"), ("1/0", "0")])
def test_not_equivalent(pred, ref):
    assert not is_equivalent(pred, ref)


def test_extraction():
    assert extract_boxed("so \\boxed{\\frac{1}{\\sqrt{2}}} done") == "\\frac{1}{\\sqrt{2}}"
    assert extract_boxed("first \\boxed{1} then \\boxed{2}") == "2"
    assert extract_boxed("cut off \\boxed{12") is None
    assert extract_answer("work\n#### 1,234\n") == "1,234"
    assert extract_answer("\\boxed{5} and #### 6") == "5"  # boxed wins
    assert extract_answer("no final answer 42") is None
    assert parse_number("\\frac{6}{4}") == parse_number("1.5")


def test_math_reward():
    task = {"answer": GSM8K_SOLUTION}
    assert math_reward("She sold 72 clips. \\boxed{72}", task) == 1.0
    assert math_reward("Total: 24 + 48\n#### 72.0", task) == 1.0
    assert math_reward("\\boxed{71}", task) == 0.0
    assert math_reward("The answer is 72", task) == 0.0  # no marked final answer
    assert math_reward("\\boxed{0.5}", {"answer": "\\frac{1}{2}"}) == 1.0
