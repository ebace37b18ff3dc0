from __future__ import annotations

import pytest

from gyre.testing import tiny_model


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    return {arch: str(tiny_model(arch, root / arch)) for arch in ("llama", "qwen2", "qwen3", "qwen3_moe")}


@pytest.fixture(scope="session")
def llama_dir(model_dirs) -> str:
    return model_dirs["llama"]


@pytest.fixture(scope="session")
def qwen3_dir(model_dirs) -> str:
    return model_dirs["qwen3"]
