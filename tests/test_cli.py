"""The command line: generate (JSONL in/out), bench, and clear errors."""

from __future__ import annotations

import json

import pytest

from gyre.cli import main


def test_generate_jsonl(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": "12 + 35 ="}) + "\n"
                   + json.dumps({"prompt_ids": [5, 6, 7], "sampling": {"temperature": 0, "max_new_tokens": 3}}) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--tiny", "llama", "--tiny-dir", str(tmp_path), "--input", str(src), "--output",
                 str(out), "--max-new-tokens", "5", "--seed", "1"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 2 and len(rows[0]["output_ids"]) <= 5 and len(rows[1]["output_ids"]) <= 3
    assert rows[1]["prompt_ids"] == [5, 6, 7] and rows[0]["text"] is not None


def test_generate_rejects_bad_rows(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": "x", "sampling": {"temprature": 1}}) + "\n")
    with pytest.raises(SystemExit, match="temprature"):
        main(["generate", "--tiny", "llama", "--tiny-dir", str(tmp_path), "--input", str(src)])
    src.write_text("{not json\n")
    with pytest.raises(SystemExit, match="not JSON"):
        main(["generate", "--tiny", "llama", "--tiny-dir", str(tmp_path), "--input", str(src)])
    with pytest.raises(SystemExit, match="FIELD=VALUE"):
        main(["generate", "--tiny", "llama", "--tiny-dir", str(tmp_path), "--prompt", "x", "--engine", "nope=1"])


def test_bench_prints_json(tmp_path, capsys):
    assert main(["bench", "--tiny", "qwen3", "--tiny-dir", str(tmp_path), "--num-prompts", "4", "--prompt-len", "8",
                 "--output-len", "4"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["output_tokens_per_s"] > 0 and line["num_prompts"] == 4
