"""Kernel tests run the Triton kernels on the CPU interpreter unless a GPU is present.

``TRITON_INTERPRET`` is read by ``triton.jit`` when a kernel is *defined*, so it must be set before
``nexusquant_vllm.kernels`` is imported; this conftest runs before any test module of this folder is collected.
"""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _kernels_runnable() -> str | None:
    """Why the kernels cannot run here, or None."""
    if torch.cuda.is_available():
        return None
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA and TRITON_INTERPRET is not 1"
    module = sys.modules.get("nexusquant_vllm.kernels.decode_attention")
    if module is not None and type(module._split_kernel).__name__ != "InterpretedFunction":
        return "nexusquant_vllm.kernels was imported before TRITON_INTERPRET=1 was set; run tests/kernels alone"
    return None


@pytest.fixture
def device() -> str:
    reason = _kernels_runnable()
    if reason:
        pytest.skip(reason)
    return DEVICE
