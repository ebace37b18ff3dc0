"""Kernel tests run twice: on the CPU through the Triton interpreter (float32, tight tolerances) and on
CUDA with compiled kernels (bfloat16, marked gpu).

Triton fixes interpreter or compiler when it is first imported (its own tl.sum etc. are jit functions
too), so TRITON_INTERPRET=1 is set here on a machine without CUDA, before anything imports triton.
NOTE: if another test package imported triton first (collection runs tests/engine before
tests/kernels), the CPU cases fail with a message: set TRITON_INTERPRET=1 in tests/conftest.py then.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import pytest
import torch

_TRITON_IMPORTED_BEFORE = False
if not torch.cuda.is_available():
    _TRITON_IMPORTED_BEFORE = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class Case:
    device: str
    dtype: torch.dtype
    atol: float
    rtol: float

    def close(self, actual: torch.Tensor, expected: torch.Tensor, **kw) -> None:
        torch.testing.assert_close(actual.float(), expected.float(), atol=self.atol, rtol=self.rtol, **kw)


CPU = Case("cpu", torch.float32, 1e-5, 1e-5)
GPU = Case("cuda", torch.bfloat16, 2e-2, 2e-2)


@pytest.fixture(
    params=[pytest.param(CPU, id="cpu-f32"), pytest.param(GPU, id="cuda-bf16", marks=pytest.mark.gpu)]
)
def case(request) -> Case:
    """The device/dtype a kernel test runs on, with its tolerances."""
    c = request.param
    if c.device == "cpu" and _TRITON_IMPORTED_BEFORE:
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set: set it in tests/conftest.py")
    if c.device == "cpu" and not INTERPRET:
        pytest.skip("CPU kernel tests need TRITON_INTERPRET=1")
    if c.device == "cuda" and (INTERPRET or not torch.cuda.is_available()):
        pytest.skip("needs a CUDA GPU and compiled Triton kernels")
    return c
