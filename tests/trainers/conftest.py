from __future__ import annotations

import pytest

from gyre.testing import tiny_model


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, str]:
    """Tiny HF models; "qwen3_tied" ties the LM head to the embedding (as Qwen3-0.6B does)."""
    root = tmp_path_factory.mktemp("trainer_models")
    dirs = {arch: str(tiny_model(arch, root / arch)) for arch in ("llama", "qwen2", "qwen3", "qwen3_moe")}
    dirs["qwen3_tied"] = str(tiny_model("qwen3", root / "qwen3_tied", tie_word_embeddings=True))
    dirs["llama4"] = str(tiny_model("llama", root / "llama4", num_hidden_layers=4))  # for virtual pipeline
    return dirs
