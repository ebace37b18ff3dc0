"""Tiny models with real architectures and random weights, written as HF-format directories.

Every test in the project builds its models here, and users can try gyre without a download:

    path = tiny_model("qwen3", tmp_path / "m")        # config.json, model.safetensors, tokenizer files
    save_sharded(path, max_shard_bytes=64 * 1024)     # model-0000k-of-0000n.safetensors + index

The tokenizer is a byte-level BPE trained here on a fixed corpus (no download, no data file), with
digits split into single-digit tokens and a ChatML (Qwen2.5-style) chat template that supports tools.
NOTE: the corpus must stay free of anything process-dependent (set order, hash seeds, files on disk):
the same code must give the same vocabulary on every machine.
"""

from __future__ import annotations

import functools
import json
import random
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # transformers takes seconds to import: only the functions that need it do
    import torch
    from transformers import PretrainedConfig, PreTrainedTokenizerFast

ARCHS = ("llama", "qwen2", "qwen3", "qwen3_moe")
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)  # ids 0, 1, 2
ADDED_TOKENS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>")
BPE_VOCAB_SIZE = 1500  # + the 6 added tokens; the model's vocab_size rounds len(tokenizer) up to 64

CHAT_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0].role == 'system' %}\n"
    "        {{- messages[0].content + '\\n\\n' }}\n"
    "    {%- endif %}\n"
    '    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n'
    'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}\n'
    "    {%- for tool in tools %}\n"
    '        {{- "\\n" }}\n'
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and '
    "arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n"
    '{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n'
    "{%- elif messages[0].role == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == 'user') or (message.role == 'system' and not loop.first)"
    " or (message.role == 'assistant' and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == 'assistant' %}\n"
    "        {{- '<|im_start|>assistant' }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    '            {{- \'\\n<tool_call>\\n{"name": "\' + tool_call.name + \'", "arguments": \' }}\n'
    "            {%- if tool_call.arguments is string %}\n"
    "                {{- tool_call.arguments }}\n"
    "            {%- else %}\n"
    "                {{- tool_call.arguments | tojson }}\n"
    "            {%- endif %}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == 'tool' %}\n"
    "        {%- if loop.first or (messages[loop.index0 - 1].role != 'tool') %}\n"
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}\n"
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

_NAMES = ["Alice", "Bob", "Carla", "David", "Emma", "Farid", "Grace", "Hiro", "Ines", "James", "Natalia"]
_THINGS = ["apples", "books", "pencils", "cookies", "marbles", "stickers", "coins", "eggs", "tickets", "cups"]
_PLACES = ["Paris", "London", "Tokyo", "Berlin", "Madrid", "Cairo", "Lima", "Oslo", "Seoul", "Toronto"]
_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time, there was a little girl who lived in a village near the forest.",
    "She walked to the store and bought some bread, milk and fresh fruit for the week.",
    "It is important to think step by step before giving the final answer.",
    "The weather today is sunny with a light breeze and a high of twenty degrees.",
    "Please write a short poem about the sea, the wind and the stars at night.",
    "The model generates one token at a time, and each token depends on the previous ones.",
    "A language model assigns a probability to every possible next token in the vocabulary.",
    "We should check the result again, because a small mistake can change the whole answer.",
    "Hello! How can I help you today? I am a helpful assistant.",
    "Thank you very much. Let me know if you have any other questions.",
    "The function returns a list of numbers sorted from the smallest to the largest.",
    "In the morning they went to school, and in the afternoon they played football in the park.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The answer is correct. Great job, you solved the problem!",
]
_WORDS = (
    "time year people way day man woman child world life hand part place case week company system program "
    "question work government number night point home water room mother area money story fact month lot "
    "right study book eye job word business issue side kind head house service friend father power hour "
    "game line end member law car city community name president team minute idea kid body information "
    "back parent face others level office door health person art war history party result change morning "
    "reason research girl guy moment air teacher force education garden river mountain window table chair "
    "be have do say get make go know take see come think look want give use find tell ask seem feel try "
    "leave call keep let begin help talk turn start show hear play run move like live believe hold bring "
    "happen write provide sit stand lose pay meet include continue set learn lead understand watch follow "
    "stop create speak read allow add spend grow open walk win offer remember love consider appear buy wait "
    "serve die send expect build stay fall cut reach kill remain suggest raise pass sell require report "
    "good new first last long great little own other old right big high different small large next early "
    "young important few public bad same able free sure clear whole strong possible simple happy green "
    "always never often usually sometimes because although however therefore while before after during "
    "between under above without within through across about against among toward every each many several"
).split()
_TOOLS = [
    ("get_weather", "Get the current weather in a given city.", {"city": "string", "unit": "string"}),
    ("calculator", "Evaluate an arithmetic expression and return the result.", {"expression": "string"}),
    ("search", "Search the web and return the top results.", {"query": "string", "max_results": "integer"}),
    ("python", "Run a Python program and return what it prints.", {"code": "string"}),
]


def _corpus() -> list[str]:
    """A fixed training corpus: English-ish prose, arithmetic, word problems, chat, tool calls, JSON."""
    rng = random.Random(0)
    lines = list(_SENTENCES) * 4
    for _ in range(600):
        words = rng.sample(_WORDS, 12)
        lines.append(f"{words[0].capitalize()} {' '.join(words[1:6])}, {' '.join(words[6:])}.")
    for _ in range(400):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        op = rng.choice("+-*")
        res = a + b if op == "+" else a - b if op == "-" else a * b
        lines.append(f"{a} {op} {b} = {res}")
        lines.append(f"What is {a} {op} {b}? Let's compute: {a} {op} {b} = {res}. The answer is {res}.")
    for _ in range(300):
        name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
        n, k, price = rng.randint(10, 90), rng.randint(2, 9), rng.randint(1, 20)
        lines.append(
            f"{name} has {n} {thing}. She gives {k} {thing} to each of her {k} friends. How many {thing} "
            f"does she have left?\n{name} gives away {k} x {k} = <<{k}*{k}={k * k}>>{k * k} {thing}.\n"
            f"She has {n} - {k * k} = <<{n}-{k * k}={n - k * k}>>{n - k * k} {thing} left.\n#### {n - k * k}"
        )
        lines.append(f"Each of the {n} {thing} costs ${price}. The total cost is ${n * price}.")
    for name, desc, params in _TOOLS:
        tool = {
            "type": "function",
            "function": {
                "name": name,
                "description": desc,
                "parameters": {"type": "object", "properties": {p: {"type": t} for p, t in params.items()}},
                "required": list(params),
            },
        }
        lines += [json.dumps(tool)] * 5
    for _ in range(200):
        city, name = rng.choice(_PLACES), rng.choice(_NAMES)
        temp = rng.randint(-10, 35)
        call = json.dumps({"name": "get_weather", "arguments": {"city": city, "unit": "celsius"}})
        result = json.dumps({"city": city, "temperature": temp, "condition": rng.choice(["sunny", "rainy"])})
        lines.append(
            f"{IM_START}user\nHi, I am {name}. What is the weather in {city}?{IM_END}\n"
            f"{IM_START}assistant\n<think>\nI should call the weather tool.\n</think>\n"
            f"<tool_call>\n{call}\n</tool_call>{IM_END}\n"
            f"{IM_START}user\n<tool_response>\n{result}\n</tool_response>{IM_END}\n"
            f"{IM_START}assistant\nIt is {temp} degrees in {city} right now.{IM_END}\n{ENDOFTEXT}"
        )
        lines.append(
            json.dumps({"id": rng.randint(1, 9999), "name": name, "tags": [city, "user"], "ok": True})
        )
    return lines


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """Train the byte-level BPE once per process; returns its tokenizer.json text."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # Digits first, so that numbers are always single-digit tokens (arithmetic stays learnable).
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    markers = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS + ADDED_TOKENS))
    texts = [piece for line in _corpus() for piece in markers.split(line) if piece]
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED_TOKENS])
    return tok.to_str()


def tiny_tokenizer(path: str | Path | None = None) -> PreTrainedTokenizerFast:
    """The shared tiny tokenizer (trained once per process; each call returns a fresh wrapper).

    `<|endoftext|>` (id 0) is the pad token, `<|im_end|>` (id 2) the eos; no BOS is prepended.
    When `path` is given, the tokenizer files are written there (chat template in tokenizer_config.json).
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        extra_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
    )
    if path is not None:
        path = Path(path)
        tok.save_pretrained(path, save_jinja_files=False)
        # transformers 5 no longer writes special_tokens_map.json; write it as transformers 4 did,
        # for readers that still look for it.
        flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
        special_map = {
            "additional_special_tokens": [IM_START, IM_END],
            "eos_token": {"content": IM_END, **flags},
            "pad_token": {"content": ENDOFTEXT, **flags},
        }
        (path / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    return tok


def _config(arch: str, tok: PreTrainedTokenizerFast, overrides: dict) -> PretrainedConfig:
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig

    classes = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "qwen3_moe": Qwen3MoeConfig}
    if arch not in classes:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    eot, im_end = tok.convert_tokens_to_ids([ENDOFTEXT, IM_END])
    fields = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        max_position_embeddings=1024,
        vocab_size=-(-len(tok) // 64) * 64,  # ids past the tokenizer are valid but never produced
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        bos_token_id=eot,
        eos_token_id=im_end,
        pad_token_id=eot,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        fields["rope_scaling"] = None
    if arch == "qwen3_moe":
        fields.update(
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
    fields.update(overrides)
    if fields["vocab_size"] < len(tok):
        raise ValueError(f"vocab_size {fields['vocab_size']} < tokenizer size {len(tok)}")
    return classes[arch](**fields)


def _reinit_(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter from `seed` alone: matrices N(0, 0.1) so that logits are well spread
    (greedy comparisons between implementations do not hit near-ties), norm weights 1 + N(0, 0.05),
    biases N(0, 0.05)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.05 * noise)
            elif name.endswith(".bias"):
                param.copy_(0.05 * noise)
            else:
                param.copy_(0.1 * noise)


def tiny_model(arch: str, path: str | Path, *, seed: int = 0, **overrides) -> Path:
    """Write a tiny random-weight `arch` model ("llama", "qwen2", "qwen3", "qwen3_moe") to `path`.

    `overrides` are HF config fields (num_hidden_layers=3, tie_word_embeddings=True, rope_scaling=...).
    Writes config.json, model.safetensors (float32, HF parameter names; per-expert names for MoE),
    generation_config.json and the tokenizer files. Same arch, seed and overrides give identical bytes.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.utils import logging as hf_logging

    path = Path(path)
    tok = tiny_tokenizer(path)
    cfg = _config(arch, tok, overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    _reinit_(model, seed)
    model.generation_config = GenerationConfig(
        bos_token_id=cfg.bos_token_id,
        eos_token_id=[tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(ENDOFTEXT)],
        pad_token_id=cfg.pad_token_id,
        do_sample=False,
    )
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(path, safe_serialization=True)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    return path


def save_sharded(path: str | Path, max_shard_bytes: int) -> None:
    """Re-save the weights of the model directory `path` as HF shards of at most `max_shard_bytes`
    each (a larger tensor gets a shard of its own) plus model.safetensors.index.json; the single
    model.safetensors (or a previous sharding) is removed."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = Path(path)
    index_file = path / "model.safetensors.index.json"
    if (path / "model.safetensors").exists():
        sources = [path / "model.safetensors"]
    else:
        sources = sorted({path / f for f in json.loads(index_file.read_text())["weight_map"].values()})
    tensors = {}
    for src in sources:
        with safe_open(src, framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})

    shards: list[dict] = [{}]
    shard_bytes = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensors[name]
        shard_bytes += nbytes

    for src in sources:
        src.unlink()
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    metadata = {
        "total_parameters": sum(t.numel() for t in tensors.values()),
        "total_size": sum(t.numel() * t.element_size() for t in tensors.values()),
    }
    index_file.write_text(json.dumps({"metadata": metadata, "weight_map": weight_map}, indent=2) + "\n")
