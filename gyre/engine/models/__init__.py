"""Model classes by HF `model_type`."""

from __future__ import annotations

from typing import Any

from gyre.engine.models.llama import LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM
from gyre.engine.models.qwen3_moe import Qwen3MoeForCausalLM

MODELS = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "qwen3": Qwen3ForCausalLM,
    "qwen3_moe": Qwen3MoeForCausalLM,
}


def model_class(hf_config: Any) -> type:
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in MODELS:
        raise ValueError(f"unsupported model_type {model_type!r}; gyre supports {sorted(MODELS)}")
    return MODELS[model_type]
