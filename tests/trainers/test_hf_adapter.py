"""HF adapter: any HF model (fused MoE experts included) or gyre model -> the checkpoint's tensors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from gyre import Engine
from gyre.trainers.adapters.hf import HFAdapter, clean_name

ARCHS = ["llama", "qwen2", "qwen3", "qwen3_moe", "qwen3_tied"]


def checkpoint(path: str) -> dict[str, torch.Tensor]:
    return load_file(f"{path}/model.safetensors")


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_model_gives_checkpoint_tensors(model_dirs, arch):
    path = model_dirs[arch]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if arch == "qwen3_moe":  # transformers 5 holds experts fused; the checkpoint has them one by one
        assert any(n.endswith("mlp.experts.gate_up_proj") for n, _ in model.named_parameters())
    ours = dict(HFAdapter(model).named_tensors())
    ckpt = checkpoint(path)
    with Engine(path, device="cpu", max_num_tokens=256) as eng:
        specs = eng.runner.model.hf_weight_specs()
        assert set(ours) == set(specs)  # exactly what the engine expects, nothing more
        assert all(tuple(t.shape) == tuple(specs[n]) for n, t in ours.items())
        eng.update_weights(ours, version=1)  # and the engine takes them
        assert eng.weight_version == 1
    for name, t in ours.items():
        assert torch.equal(t, ckpt[name]), name
    if arch == "qwen3_tied":
        assert "lm_head.weight" not in ours


def test_gyre_model_and_dtype(model_dirs):
    path = model_dirs["qwen3_moe"]
    ckpt = checkpoint(path)
    with Engine(path, device="cpu", max_num_tokens=256) as eng:
        ours = dict(HFAdapter(eng.runner.model).named_tensors())  # qkv / gate_up / w13 / w2 split back
        half = dict(HFAdapter(eng.runner.model, dtype=torch.bfloat16).named_tensors())
    assert set(ours) == set(ckpt)
    for name in ckpt:
        assert torch.equal(ours[name], ckpt[name]), name
        assert half[name].dtype == torch.bfloat16 and torch.equal(half[name], ckpt[name].bfloat16())


def test_wrapper_prefixes_are_removed():
    assert (
        clean_name("_orig_mod.model.layers.0._checkpoint_wrapped_module.mlp.up_proj.weight")
        == "model.layers.0.mlp.up_proj.weight"
    )
    assert clean_name("module._fsdp_wrapped_module.lm_head.weight") == "lm_head.weight"
