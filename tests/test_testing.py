from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers / huggingface_hub are imported

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from gyre.testing import ADDED_TOKENS, ARCHS, save_sharded, tiny_model, tiny_tokenizer

PROMPT = [[1, 872, 198, 20, 21, 220, 10, 221, 2]]
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: tiny_model(arch, root / arch) for arch in ARCHS}


def load(path: Path) -> torch.nn.Module:
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    # A missing key would be silently re-initialised by HF: the files must cover every parameter.
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def saved_keys(path: Path) -> set[str]:
    with safe_open(path / "model.safetensors", framework="pt") as f:
        return set(f.keys())


@torch.no_grad()
def logits_of(model: torch.nn.Module, ids: list[list[int]] = PROMPT) -> torch.Tensor:
    return model(torch.tensor(ids)).logits


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_arch_loads_runs_and_generates(models, arch):
    path = models[arch]
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in path.iterdir()
    }
    model = load(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.vocab_size == 1536 and len(tok) <= 1536
    assert model.config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert model.generation_config.eos_token_id == [2, 0] and not model.generation_config.do_sample

    logits = logits_of(model)  # [1, T, V]
    assert logits.shape == (1, len(PROMPT[0]), 1536)
    assert logits.std(-1).min() > 0.3  # well spread, not the near-flat logits of HF's default init
    top2 = logits[0].topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-4  # no near-ties in greedy decoding

    prompt = torch.tensor(PROMPT)
    out = model.generate(prompt, max_new_tokens=6, do_sample=False)[0, prompt.shape[1] :].tolist()
    assert 1 <= len(out) <= 6
    ids = list(PROMPT[0])
    for _ in out:  # the KV-cached generate matches a full forward per step
        ids.append(int(logits_of(model, [ids])[0, -1].argmax()))
    assert ids[len(PROMPT[0]) :] == out


def test_architectural_parameters(models):
    llama, qwen2, qwen3, moe = (saved_keys(models[a]) for a in ARCHS)
    assert not any("bias" in k or "q_norm" in k for k in llama)
    assert {f"model.layers.1.self_attn.{p}_proj.bias" for p in "qkv"} <= qwen2
    assert "model.layers.1.self_attn.o_proj.bias" not in qwen2
    assert {"model.layers.0.self_attn.q_norm.weight", "model.layers.0.self_attn.k_norm.weight"} <= qwen3
    # transformers 5 fuses experts in memory but saves them per expert, as the hub checkpoints are.
    per_expert = {
        f"model.layers.{i}.mlp.experts.{e}.{p}_proj.weight"
        for i in range(2)
        for e in range(8)
        for p in ("gate", "up", "down")
    }
    assert per_expert <= moe
    assert {"model.layers.0.mlp.gate.weight", "model.layers.1.mlp.gate.weight"} <= moe
    assert not any("gate_up_proj" in k for k in moe)
    cfg = json.loads((models["qwen3_moe"] / "config.json").read_text())
    assert cfg["num_experts_per_tok"] == 2 and cfg["moe_intermediate_size"] == 32 and cfg["norm_topk_prob"]


def test_overrides(tmp_path):
    path = tiny_model("qwen3", tmp_path / "m", num_hidden_layers=3, tie_word_embeddings=True)
    keys = saved_keys(path)
    assert "model.layers.2.mlp.up_proj.weight" in keys and "lm_head.weight" not in keys
    model = load(path)
    assert model.config.num_hidden_layers == 3
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_llama3_rope_scaling(models, tmp_path):
    path = tiny_model("llama", tmp_path / "m", rope_scaling=LLAMA3_ROPE)
    model = load(path)
    assert model.config.rope_parameters["rope_type"] == "llama3"
    ids = [list(range(3, 200))]
    scaled, plain = logits_of(model, ids), logits_of(load(models["llama"]), ids)
    assert torch.equal(scaled[:, 0], plain[:, 0])  # same weights; position 0 does not rotate
    assert not torch.allclose(scaled, plain)


def test_deterministic(tmp_path):
    a, b = tiny_model("qwen3_moe", tmp_path / "a", seed=3), tiny_model("qwen3_moe", tmp_path / "b", seed=3)
    c = tiny_model("qwen3_moe", tmp_path / "c", seed=4)
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_tokenizer_is_deterministic_across_processes():
    from gyre.testing import _tokenizer_json

    code = "import hashlib; from gyre.testing import _tokenizer_json as t; print(hashlib.sha256(t().encode()).hexdigest())"
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == hashlib.sha256(_tokenizer_json().encode()).hexdigest()


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_save_sharded(models, tmp_path, arch):
    path = tiny_model(arch, tmp_path / "m")
    keys, before = saved_keys(path), logits_of(load(path))
    save_sharded(path, max_shard_bytes=100_000)
    assert not (path / "model.safetensors").exists()
    index = json.loads((path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files == sorted(p.name for p in path.glob("model-*-of-*.safetensors"))
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert set(index["weight_map"]) == keys
    assert index["metadata"]["total_size"] == sum(4 * p.numel() for p in load(path).parameters())
    assert torch.equal(logits_of(load(path)), before)
    save_sharded(path, max_shard_bytes=10**9)  # re-sharding a sharded directory
    assert (
        len(set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values())) == 1
    )
    assert torch.equal(logits_of(load(path)), before)


def test_tokenizer_vocab_and_special_tokens():
    tok = tiny_tokenizer()
    assert 1000 <= len(tok) <= 2000
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    assert tok.encode("hi there") == tok.encode("hi there", add_special_tokens=False)  # no BOS
    added = tok.convert_tokens_to_ids(list(ADDED_TOKENS))
    assert len(set(added)) == 6 and max(added) == len(tok) - 1
    ids = tok.encode("<|im_start|>assistant\n<think>\nok\n</think>\n<tool_call>\n{}\n</tool_call><|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2 and set(added[:2] + added[4:]) <= set(ids)
    # <tool_call> and <think> are ordinary added tokens (kept), ChatML markers are special (skipped).
    assert tok.decode(ids, skip_special_tokens=True).startswith(
        "assistant\n<think>\nok\n</think>\n<tool_call>"
    )


def test_digits_are_single_tokens():
    tok = tiny_tokenizer()
    assert all(len(t) == 1 for t in tok.get_vocab() if any(c.isdigit() for c in t))
    tokens = tok.tokenize("12 + 35 = 47; x=2024")
    assert [t for t in tokens if t.strip("Ġ").isdigit()] == list("1235472024")


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(max_codepoint=127)))
def test_tokenizer_round_trip_ascii(text):
    tok = tiny_tokenizer()
    assert tok.decode(tok.encode(text)) == text


def test_tokenizer_round_trip_samples():
    tok = tiny_tokenizer()
    for text in [
        "  leading spaces\n\n\ttabs  ",
        "héllo wörld 世界 🙂",
        '{"a": [1, 2.5, -3e4]}',
        "<tool_call>x</tool_call>",
    ]:
        assert tok.decode(tok.encode(text)) == text


def test_tokenizer_saves_and_loads(tmp_path):
    tok = tiny_tokenizer(tmp_path)
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= {
        p.name for p in tmp_path.iterdir()
    }
    assert "chat_template" in json.loads((tmp_path / "tokenizer_config.json").read_text())
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tok.get_vocab() and loaded.chat_template == tok.chat_template
    text = "Natalia sold 48/2 = 24 clips. <|im_end|><tool_response>"
    assert loaded.encode(text) == tok.encode(text)
    assert (loaded.eos_token_id, loaded.pad_token_id) == (2, 0)


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
CONVERSATION = [
    {"role": "system", "content": "You are careful."},
    {"role": "user", "content": "Weather in Paris and Oslo?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
        ],
    },
    {"role": "tool", "content": '{"temp": 18}'},
    {"role": "tool", "content": '{"temp": 3}'},
    {"role": "assistant", "content": "Paris 18, Oslo 3."},
    {"role": "user", "content": "And 12 + 35?"},
    {
        "role": "assistant",
        "content": "Let me check.",
        "tool_calls": [{"name": "calc", "arguments": {"e": "12+35"}}],
    },
    {"role": "tool", "content": "47"},
    {"role": "assistant", "content": "12 + 35 = 47"},
]


def render(messages, tools=None, add_generation_prompt=False) -> str:
    return tiny_tokenizer().apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def test_chat_template_plain():
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    # No default system prompt is injected.
    assert render(msgs) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
    assert (
        render(msgs[:1], add_generation_prompt=True)
        == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    system = [{"role": "system", "content": "Be brief."}]
    assert (
        render(system + msgs[:1])
        == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    )


def test_chat_template_tools():
    tools_block = (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        + json.dumps(TOOLS[0])
        + "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
        'within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, '
        '"arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
    )
    assert render(CONVERSATION[1:2], TOOLS).startswith("<|im_start|>system\n# Tools\n\n")
    assert render(CONVERSATION[:6], TOOLS) == (
        "<|im_start|>system\nYou are careful.\n\n"
        + tools_block
        + "<|im_start|>user\nWeather in Paris and Oslo?<|im_end|>\n"
        "<|im_start|>assistant\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>\n'
        '<|im_start|>user\n<tool_response>\n{"temp": 18}\n</tool_response>\n'
        '<tool_response>\n{"temp": 3}\n</tool_response><|im_end|>\n'
        "<|im_start|>assistant\nParis 18, Oslo 3.<|im_end|>\n"
    )
    assert render(CONVERSATION[6:9], TOOLS).endswith(
        "<|im_start|>assistant\nLet me check.\n"
        '<tool_call>\n{"name": "calc", "arguments": {"e": "12+35"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n47\n</tool_response><|im_end|>\n"
    )
    ids = tiny_tokenizer().encode(render(CONVERSATION, TOOLS))
    assert (
        ids.count(tiny_tokenizer().convert_tokens_to_ids("<tool_call>")) == 5
    )  # 3 calls + 2 in the instruction


@pytest.mark.parametrize("tools", [None, TOOLS])
def test_chat_template_is_append_only(tools):
    for k in range(1, len(CONVERSATION)):
        longer = render(CONVERSATION[: k + 1], tools)
        # NOTE: consecutive tool messages share one user turn (as in Qwen2.5), so a cut between two of
        # them is the one place where rendering is not append-only.
        if not (CONVERSATION[k - 1]["role"] == CONVERSATION[k]["role"] == "tool"):
            assert longer.startswith(render(CONVERSATION[:k], tools)), k
        if CONVERSATION[k]["role"] == "assistant":
            assert longer.startswith(render(CONVERSATION[:k], tools, add_generation_prompt=True)), k
