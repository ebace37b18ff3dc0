from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from gyre.testing import tiny_model
from gyre.weight_sync import EngineProcess

TIMEOUT_S = 4.0  # the engines' weight_update_timeout_s


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> str:
    return str(tiny_model("llama", tmp_path_factory.mktemp("ws") / "llama"))


@pytest.fixture(scope="session")
def engine_procs(llama_dir):
    """Two engines, each in its own process; tests leave them serving (any weight version)."""
    with ThreadPoolExecutor(2) as pool:
        procs = list(
            pool.map(
                lambda _: EngineProcess(llama_dir, max_num_tokens=4096, weight_update_timeout_s=TIMEOUT_S),
                range(2),
            )
        )
    yield procs
    for p in procs:
        p.close()
