"""The KV-cache dtype names the plugin serves, and the codec module behind each.

Product dtypes: the e8 ones (``nexusquant_vllm.codec``). Benchmark-only: with ``bench_scalar`` in the configuration
(``NEXUSQUANT_BENCH_SCALAR=1`` in the environment of every vLLM process; see ``nexusquant_vllm.config``), the
per-token scalar baseline (``codec/scalar_baseline.py``: same rotation, scale and slot layout, scalar levels instead
of E8) is served too (``scalar-k3v2``, ...), so that ``benchmarks/quality_ppl.py`` can compare both inside vLLM.
Without it those names do not exist.
"""

from __future__ import annotations

import functools
from types import ModuleType

from nexusquant_vllm.codec.format import DEFAULT_DTYPE, E8_DTYPES, KVFormat

SCALAR_PREFIX = "scalar-"

__all__ = ["DEFAULT_DTYPE", "E8_DTYPES", "SCALAR_PREFIX", "codec_for", "dtype_names", "get_format", "is_e8",
           "is_served", "scalar_names"]


@functools.cache
def scalar_names() -> tuple[str, ...]:
    """The scalar-baseline dtype names (benchmark-only; empty unless ``bench_scalar`` is configured)."""
    from nexusquant_vllm.config import NexusQuantConfig

    if not NexusQuantConfig.from_env().bench_scalar:
        return ()
    from nexusquant_vllm.codec.scalar_baseline import SCALAR_DTYPES

    return tuple(SCALAR_DTYPES)


def dtype_names() -> tuple[str, ...]:
    return tuple(E8_DTYPES) + scalar_names()


def is_e8(dtype: object) -> bool:
    """A product E8 dtype (the kernels serve these; the scalar baselines are torch-only)."""
    return isinstance(dtype, str) and dtype in E8_DTYPES


def is_served(dtype: object) -> bool:
    return is_e8(dtype) or (isinstance(dtype, str) and dtype in scalar_names())


def codec_for(dtype: str) -> ModuleType:
    """The module with ``get_format``/``encode_kv``/``decode_kv_rotated``/``rotate``/``unrotate`` for this dtype."""
    if dtype.startswith(SCALAR_PREFIX):
        from nexusquant_vllm.codec import scalar_baseline

        return scalar_baseline
    import nexusquant_vllm.codec as codec

    return codec


def get_format(dtype: str, head_dim: int) -> KVFormat:
    return codec_for(dtype).get_format(dtype, head_dim)
