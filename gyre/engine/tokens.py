"""Tokenizer-side helpers: loading, eos ids, decode, stop checks and chat rendering."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from gyre.engine.request import Request

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class TokenizerHelper:
    def __init__(self, model_path: str, hf_config: Any) -> None:
        self.tokenizer = None
        if any(os.path.exists(os.path.join(model_path, f)) for f in _TOKENIZER_FILES):
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.eos_ids = self._eos_ids(model_path, hf_config)

    def _eos_ids(self, model_path: str, hf_config: Any) -> set[int]:
        ids: set[int] = set()

        def add(x: Any) -> None:
            if isinstance(x, int):
                ids.add(x)
            elif isinstance(x, (list, tuple)):
                ids.update(i for i in x if isinstance(i, int))

        add(getattr(hf_config, "eos_token_id", None))
        gen = os.path.join(model_path, "generation_config.json")
        if os.path.exists(gen):
            with open(gen) as f:
                add(json.load(f).get("eos_token_id"))
        if self.tokenizer is not None:
            add(self.tokenizer.eos_token_id)
        return ids

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def check_stop_fn(self, max_model_len: int) -> Callable[[Request], str | None]:
        def check(req: Request) -> str | None:
            sp = req.sampling
            tok = req.output_ids[-1]
            if not sp.ignore_eos and tok in self.eos_ids:
                return "stop"
            if sp.stop_token_ids and tok in sp.stop_token_ids:
                return "stop"
            if sp.stop and self._hit_stop_string(req):
                return "stop"
            if len(req.output_ids) >= sp.max_new_tokens or len(req.prompt_ids) + len(req.output_ids) >= max_model_len:
                return "length"
            return None

        return check

    def _hit_stop_string(self, req: Request) -> bool:
        """Stop strings: the tokens stay exactly as generated; the text ends before the stop string."""
        longest = max(len(s) for s in req.sampling.stop)
        tail_ids = req.output_ids[-(longest + 2):]
        tail = self.decode(tail_ids)
        if not any(s in tail for s in req.sampling.stop):
            return False
        text = self.decode(req.output_ids)
        cut = min((text.find(s) for s in req.sampling.stop if s in text), default=-1)
        if cut < 0:
            return False
        req.text = text[:cut]
        return True

    # -- chat -------------------------------------------------------------------------------------
    def render_chat(self, messages: list[dict], add_generation_prompt: bool, tools: list | None = None) -> str:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("chat messages need a tokenizer with a chat template")
        kwargs: dict[str, Any] = {"tokenize": False, "add_generation_prompt": add_generation_prompt}
        if tools:
            kwargs["tools"] = tools
        return self.tokenizer.apply_chat_template(messages, **kwargs)
