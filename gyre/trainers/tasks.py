"""Task data for the recipes: generated arithmetic (CPU main job) and GSM8K-format JSONL.

A dataset is an index-addressable stream of task dicts ({"prompt", "answer", "index"}), so that a
resumed run continues from a saved position.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def arith_problem(seed: int, index: int, max_operand: int) -> tuple[str, str]:
    rng = random.Random(seed * 1_000_003 + index)
    a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
    return f"{a}+{b}=", str(a + b)


def arith_stream(seed: int, start: int, max_operand: int, tokenizer: Any) -> Iterator[dict[str, Any]]:
    """Raw-text arithmetic prompts as token ids (no chat template: short sequences for the CPU)."""
    i = start
    while True:
        q, a = arith_problem(seed, i, max_operand)
        yield {"prompt": tokenizer.encode(q, add_special_tokens=False), "answer": a, "index": i, "question": q}
        i += 1


def arith_reward(text: str, task: dict[str, Any]) -> float:
    """1 if the first number of the answer equals the sum, else 0."""
    m = re.match(r"\s*(-?\d+)", text)
    return 1.0 if m is not None and m.group(1) == task["answer"] else 0.0


def gsm8k_rows(path: str | Path) -> list[dict[str, Any]]:
    """GSM8K-format JSONL: {"question": ..., "answer": "... #### 42"} -> {"prompt", "answer"}."""
    rows = []
    with open(path) as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                answer = row["answer"].split("####")[-1].strip().replace(",", "")
                rows.append({"prompt": row["question"], "answer": answer})
            except (json.JSONDecodeError, KeyError, AttributeError) as e:
                raise ValueError(f"{path}:{i + 1}: not a GSM8K row ({e})") from None
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def cycle_stream(rows: list[dict[str, Any]], seed: int, start: int) -> Iterator[dict[str, Any]]:
    """Epochs over rows, each shuffled by (seed, epoch); task i is the same on every run."""
    i = start
    while True:
        epoch, pos = divmod(i, len(rows))
        order = list(range(len(rows)))
        random.Random(seed * 7919 + epoch).shuffle(order)
        yield {**rows[order[pos]], "index": i}
        i += 1
