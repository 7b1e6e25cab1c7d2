"""The KV-cache dtype names the plugin serves, and the codec module behind each.

Product dtypes: the e8 ones (``nexusquant_vllm.codec``). Benchmark-only: with ``NEXUSQUANT_BENCH_SCALAR=1`` in the
environment of every vLLM process, the per-token scalar baseline (``scalar_baseline.py``, built on
``nexusquant_vllm.codec.scalar``) is served too (``scalar-k3v2``, ...; same rotation, scale and slot layout, scalar
levels instead of E8), so that ``benchmarks/quality_ppl.py`` can compare both inside vLLM. Without the variable
those names do not exist.
"""

from __future__ import annotations

import os
from types import ModuleType

from nexusquant_vllm import native
from nexusquant_vllm.codec.format import DEFAULT_DTYPE, E8_DTYPES, KVFormat

BENCH_SCALAR_ENV = "NEXUSQUANT_BENCH_SCALAR"
SCALAR_PREFIX = "scalar-"

__all__ = ["DEFAULT_DTYPE", "E8_DTYPES", "codec_for", "dtype_names", "get_format", "is_served", "scalar_names",
           "uses_native_cpu"]


def scalar_names() -> tuple[str, ...]:
    """The scalar-baseline dtype names (benchmark-only; empty unless NEXUSQUANT_BENCH_SCALAR=1)."""
    if os.environ.get(BENCH_SCALAR_ENV, "") in ("", "0"):
        return ()
    from nexusquant_vllm.vllm_glue.scalar_baseline import SCALAR_DTYPES

    return tuple(SCALAR_DTYPES)


def dtype_names() -> tuple[str, ...]:
    return tuple(E8_DTYPES) + scalar_names()


def is_served(dtype: object) -> bool:
    return isinstance(dtype, str) and (dtype in E8_DTYPES or (dtype.startswith(SCALAR_PREFIX) and dtype in scalar_names()))


def codec_for(dtype: str) -> ModuleType:
    """The module with ``encode_kv``/``decode_kv_rotated``/``rotate``/``unrotate`` for this dtype."""
    if dtype.startswith(SCALAR_PREFIX):
        from nexusquant_vllm.vllm_glue import scalar_baseline

        return scalar_baseline
    import nexusquant_vllm.codec as codec

    return codec


def uses_native_cpu(dtype: str) -> bool:
    """E8 layers on CPU store and decode-attend through the native kernels (csrc/) when they are built; the torch
    codec and attention path otherwise."""
    return dtype in E8_DTYPES and native.available()


def get_format(dtype: str, head_dim: int) -> KVFormat:
    return codec_for(dtype).get_format(dtype, head_dim)


BACKEND_MODULE = "nexusquant_vllm.vllm_glue.backend"


def backend_class_name(dtype: str) -> str:
    """``e8-k3v2`` -> ``E8_K3V2_Backend`` (one backend class per dtype: ``customize_spec`` does not see the dtype)."""
    return dtype.replace("-", "_").upper() + "_Backend"


def backend_path(dtype: str) -> str:
    return f"{BACKEND_MODULE}.{backend_class_name(dtype)}"
