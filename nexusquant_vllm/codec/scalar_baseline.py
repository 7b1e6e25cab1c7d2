"""Benchmark-only KV dtypes ``scalar-k{K}v{V}``: the per-token scalar baseline of ``codec/scalar.py`` in the e8 slot.

Same rotation, the same one fp16 scale per vector (least-squares refit) and the same slot layout and size as the e8
dtype with the same bits; only the codebook differs (Lloyd-Max levels, the MSE-optimal scalar quantizer for a
Gaussian, applied per element). Served only with ``NEXUSQUANT_BENCH_SCALAR=1`` (see ``dtypes.py``), so that
``benchmarks/quality_ppl.py`` can compare E8 against it inside vLLM. The coding itself lives in ``codec/scalar.py``;
this module only names the dtypes and exposes the codec-module API the backend expects (``get_format`` /
``encode_kv`` / ``decode_kv_rotated`` / ``rotate`` / ``unrotate``).
"""

from __future__ import annotations

import torch

from nexusquant_vllm.codec import rotate, unrotate
from nexusquant_vllm.codec.format import KVFormat
from nexusquant_vllm.codec.scalar import decode_kv_rotated_scalar, encode_kv_scalar

KIND = "lloydmax"
SCALAR_DTYPES: dict[str, tuple[int, int]] = {
    "scalar-k4v4": (4, 4),
    "scalar-k3v3": (3, 3),
    "scalar-k4v2": (4, 2),
    "scalar-k3v2": (3, 2),
    "scalar-k2v2": (2, 2),
}

__all__ = ["SCALAR_DTYPES", "decode_kv_rotated", "encode_kv", "get_format", "rotate", "unrotate"]


def get_format(name: str, head_dim: int) -> KVFormat:
    if name not in SCALAR_DTYPES:
        raise ValueError(f"unknown scalar baseline dtype {name!r}; valid: {', '.join(SCALAR_DTYPES)}")
    return KVFormat(name, *SCALAR_DTYPES[name], head_dim)


def encode_kv(key: torch.Tensor, value: torch.Tensor, fmt: KVFormat, validate: bool = True) -> torch.Tensor:
    return encode_kv_scalar(key, value, fmt, KIND, validate)


def decode_kv_rotated(slots: torch.Tensor, fmt: KVFormat) -> tuple[torch.Tensor, torch.Tensor]:
    return decode_kv_rotated_scalar(slots, fmt, KIND)
