"""EAGLE head training: the data formats, training itself, the save format the engine serves, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig

from gyre.cli import main
from gyre.engine.kv_pool import KVPool
from gyre.engine.layers.attention import AttentionMetadata, TorchBackend
from gyre.engine.model_runner import ForwardContext
from gyre.engine.spec.eagle import eagle_config, load_eagle
from gyre.engine.spec.train import EagleTrainModule, load_token_data, save_head, train_eagle
from gyre.testing import tiny_model, tiny_tokenizer

SMALL = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
             num_hidden_layers=1)


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory) -> str:
    return str(tiny_model("llama", tmp_path_factory.mktemp("spec_train") / "llama", **SMALL))


def _repeating_data(n: int = 4, length: int = 16) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, 1400, (n, length), generator=g).tolist()


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# -- data -----------------------------------------------------------------------------------------------


def test_load_token_data_formats(tmp_path):
    tok = tiny_tokenizer()
    txt = tmp_path / "docs.txt"
    txt.write_text("first document\nstill the first\n\n\nsecond one\n\n  \n")
    docs = load_token_data(txt, tok)
    assert docs == [tok.encode("first document\nstill the first", add_special_tokens=False),
                    tok.encode("second one", add_special_tokens=False)]

    rows = [{"token_ids": [5, 6, 7]}, {"prompt_ids": [1, 2], "output_ids": [3, 4, 5], "weight_version": 2},
            {"text": "hello there"}, {"token_ids": [9]},  # one token: nothing to train on, dropped
            {"question": "What is 2+3?", "answer": "2+3 = <<2+3=5>>5\n#### 5"}]  # GSM8K: a chat
    docs = load_token_data(_jsonl(tmp_path / "rows.jsonl", rows), tok)
    chat = tok.apply_chat_template([{"role": "user", "content": rows[4]["question"]},
                                    {"role": "assistant", "content": rows[4]["answer"]}], tokenize=False)
    assert docs == [[5, 6, 7], [1, 2, 3, 4, 5], tok.encode("hello there", add_special_tokens=False),
                    tok.encode(chat, add_special_tokens=False)]
    assert load_token_data(tmp_path / "rows.jsonl", tok, max_len=2)[:2] == [[5, 6], [1, 2]]
    # token ids need no tokenizer
    assert load_token_data(_jsonl(tmp_path / "ids.jsonl", rows[:2])) == [[5, 6, 7], [1, 2, 3, 4, 5]]


@pytest.mark.parametrize("name,content,match", [
    ("d.csv", "a,b\n", "unknown data format '.csv'"),
    ("d.jsonl", "", "no sequence of 2 tokens"),
    ("d.txt", "\n\n  \n", "no sequence of 2 tokens"),
    ("d.jsonl", '{"prompt": "x"}\n', r"d.jsonl:1: a row needs 'token_ids'.*got keys \['prompt'\]"),
    ("d.jsonl", '{"token_ids": [1, 2]}\n{oops\n', "d.jsonl:2: not JSON"),
    ("d.jsonl", '{"token_ids": [1, "a"]}\n', "non-negative integers"),
    ("d.jsonl", "[1, 2]\n", "expected a JSON object"),
])
def test_load_token_data_errors(tmp_path, name, content, match):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=match):
        load_token_data(tmp_path / name, tiny_tokenizer())


def test_load_token_data_needs_a_tokenizer_for_text_and_a_file(tmp_path):
    with pytest.raises(ValueError, match="needs a tokenizer"):
        load_token_data(_jsonl(tmp_path / "t.jsonl", [{"text": "hi there"}]))
    with pytest.raises(FileNotFoundError, match="no such data file"):
        load_token_data(tmp_path / "missing.jsonl")


# -- training -------------------------------------------------------------------------------------------


def test_train_eagle_learns_and_writes_a_loadable_head(target_dir, tmp_path):
    rng = torch.get_rng_state()
    data = _repeating_data()
    out = train_eagle(target_dir, data, tmp_path / "head", steps=20, batch_size=4, seq_len=16, lr=1e-2,
                      log_every=5)
    assert out["loss"] < 0.8 * out["loss_first"]  # the mean of the last 5 steps
    assert out["steps"] == 20 and out["tokens"] == 20 * 4 * 15 and 0.0 <= out["accuracy"] <= 1.0
    assert torch.equal(torch.get_rng_state(), rng)  # a trainer's RNG stream is left alone
    head = load_eagle(tmp_path / "head", torch.float32, "cpu")
    assert head.config.hidden_size == 32 and head.config.architectures == ["GyreEagleHead"]
    # warm start (an online refresh) starts where the last training stopped
    again = train_eagle(target_dir, data, tmp_path / "head2", steps=2, batch_size=4, seq_len=16,
                        init_from=tmp_path / "head")
    assert again["loss_first"] < 0.8 * out["loss_first"]


def test_train_eagle_on_a_loaded_policy_leaves_it_untouched(target_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32)
    policy.train()
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    train_eagle(policy, _repeating_data(), tmp_path / "head", steps=2, batch_size=2, seq_len=16)
    assert policy.training and all(p.grad is None for p in policy.parameters())
    assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())
    load_eagle(tmp_path / "head", torch.float32, "cpu")


def test_train_eagle_errors(target_dir, tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        train_eagle(target_dir, [[1, 10**6]], tmp_path / "h", steps=1)
    with pytest.raises(ValueError, match="2 tokens or more"):
        train_eagle(target_dir, [[1]], tmp_path / "h", steps=1)
    with pytest.raises(FileNotFoundError, match="not an EAGLE head"):
        train_eagle(target_dir, [[1, 2, 3]], tmp_path / "h", steps=1, init_from=tmp_path)
    other = tiny_model("llama", tmp_path / "wide", **{**SMALL, "hidden_size": 48, "head_dim": 12})
    train_eagle(str(other), [[1, 2, 3]], tmp_path / "wide_head", steps=1)
    with pytest.raises(ValueError, match="another model"):
        train_eagle(target_dir, [[1, 2, 3]], tmp_path / "h", steps=1, init_from=tmp_path / "wide_head")


# -- the save format: the training module and the served head compute the same features ------------------


@pytest.mark.parametrize("rope", [None, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64}])
def test_training_module_matches_the_served_head(tmp_path, rope):
    target = tiny_model("llama", tmp_path / "t", **SMALL, rope_scaling=rope)
    cfg = eagle_config(AutoConfig.from_pretrained(target))
    torch.manual_seed(0)
    module = EagleTrainModule(cfg)
    with torch.no_grad():  # every weight random, norms included: a swapped or misnamed one shows
        for name, p in module.named_parameters():
            p.copy_((1.0 if name.endswith("norm.weight") else 0.0) + 0.2 * torch.randn_like(p))
    save_head(module, cfg, tmp_path / "head", torch.float32)
    head = load_eagle(tmp_path / "head", torch.float32, "cpu")

    t, h, start = 11, cfg.hidden_size, 3  # positions start..start+t-1, as a request past its first tokens
    embeds, hidden = torch.randn(t, h), torch.randn(t, h)
    page_size = 4
    pool = KVPool(8, page_size, 1, cfg.num_key_value_heads, cfg.head_dim, torch.float32, torch.device("cpu"))
    backend = TorchBackend(pool)
    pages = pool.alloc(pool.pages_needed(start + t))
    page_table = torch.tensor([pages], dtype=torch.int32)
    # the first `start` positions' KV come from an earlier step of the head (not compared); then two chunks
    pre_e, pre_h = torch.randn(start, h), torch.randn(start, h)
    got = []
    for lo, hi, e, x in ((0, start, pre_e, pre_h), (start, start + 7, embeds[:7], hidden[:7]),
                         (start + 7, start + t, embeds[7:], hidden[7:])):
        pos = torch.arange(lo, hi)
        meta = AttentionMetadata(
            slot_mapping=page_table[0, pos // page_size].long() * page_size + pos % page_size,
            page_table=page_table, seq_lens=torch.tensor([hi], dtype=torch.int32),
            cu_seqlens_q=torch.tensor([0, hi - lo], dtype=torch.int32), max_q_len=hi - lo,
            seq_lens_cpu=[hi], q_lens_cpu=[hi - lo], is_decode=hi - lo == 1)
        backend.prepare(meta)
        with torch.no_grad():
            got.append(head(e, x, pos, ForwardContext(backend, meta)))
    with torch.no_grad():  # the reference sees the same prefix: [T, H]
        ref = module(torch.cat([pre_e, embeds])[None], torch.cat([pre_h, hidden])[None],
                     torch.arange(start + t)[None])[0, start:]
    torch.testing.assert_close(torch.cat(got[1:]), ref, atol=1e-4, rtol=1e-4)


# -- CLI ----------------------------------------------------------------------------------------------


def test_cli_train_draft(target_dir, tmp_path, capsys):
    rows = [{"prompt_ids": r[:8], "output_ids": r[8:]} for r in _repeating_data()]
    data = _jsonl(tmp_path / "rollouts.jsonl", rows)
    out = tmp_path / "head"
    assert main(["train-draft", "--model", target_dir, "--data", data, "--out", str(out), "--steps", "3",
                 "--batch-size", "2", "--seq-len", "16", "--lr", "1e-3"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["steps"] == 3 and line["tokens"] > 0 and line["out"] == str(out)
    load_eagle(out, torch.float32, "cpu")
    assert main(["train-draft", "--model", target_dir, "--data", data, "--out", str(tmp_path / "h2"),
                 "--steps", "1", "--init-from", str(out)]) == 0
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(SystemExit, match="unknown data format"):
        main(["train-draft", "--model", target_dir, "--data", str(tmp_path / "x.csv"), "--out", str(out)])
