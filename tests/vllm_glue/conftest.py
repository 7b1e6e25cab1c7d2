"""Shared helpers for the engine-level tests (CPU, SmolLM2-135M, small max_model_len)."""

from __future__ import annotations

import contextlib
import gc
import os

import pytest

from benchmarks.common import environment as env
from benchmarks.common import kv_capacity_tokens

MAX_MODEL_LEN = 1024
KV_SPACE_GIB = "1"


def _model_path() -> str:
    path = os.environ.get("NEXUSQUANT_TEST_MODEL")
    if path:
        return path
    from nexusquant_vllm.model_store import smollm2_path

    return str(smollm2_path())


@pytest.fixture(scope="session")
def model_path() -> str:
    return _model_path()


@contextlib.contextmanager
def make_llm(model: str, kv_cache_dtype: str, protect: str | None = None, in_process: bool = False, **kwargs):
    """An ``LLM`` that is shut down (and its memory returned) when the block exits.

    ``protect`` sets ``NEXUSQUANT_PROTECT_LAYERS`` while the engine config is built; ``in_process`` runs the engine
    core in this process, so a test can look at the scheduler's block pool.
    """
    from vllm import LLM

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", KV_SPACE_GIB)
    args = dict(model=model, kv_cache_dtype=kv_cache_dtype, max_model_len=MAX_MODEL_LEN, enforce_eager=True, seed=0)
    args.update(kwargs)
    with env(NEXUSQUANT_PROTECT_LAYERS=protect, VLLM_ENABLE_V1_MULTIPROCESSING="0" if in_process else None):
        llm = LLM(**args)
    try:
        yield llm
    finally:
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


@pytest.fixture(scope="session")
def llm_factory():
    """``make_llm`` as a fixture (test modules here are not a package, so they cannot import conftest)."""
    return make_llm


@pytest.fixture(scope="session")
def capacity():
    return kv_capacity_tokens
