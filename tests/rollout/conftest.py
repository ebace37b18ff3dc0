from __future__ import annotations

import pytest

from gyre.testing import tiny_model


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory) -> str:
    return str(tiny_model("qwen3", tmp_path_factory.mktemp("rollout-models") / "qwen3"))
