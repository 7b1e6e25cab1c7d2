"""Benchmark-only KV dtypes ``scalar-k{K}v{V}``: the per-token scalar baseline of ``codec/scalar.py`` in the e8 slot.

Same rotation, the same one fp16 scale per vector (least-squares refit) and the same slot layout and size as the e8
dtype with the same bits; only the codebook differs (Lloyd-Max levels, the MSE-optimal scalar quantizer for a
Gaussian, applied per element). Served only with ``NEXUSQUANT_BENCH_SCALAR=1`` (see ``dtypes.py``), so that
``benchmarks/quality_ppl.py`` can compare E8 against it inside vLLM. Exposes the codec's ``get_format`` /
``encode_kv`` / ``decode_kv_rotated`` / ``rotate`` / ``unrotate`` API.
"""

from __future__ import annotations

import torch

from nexusquant_vllm.codec import rotate, unrotate
from nexusquant_vllm.codec.format import GROUP, KVFormat
from nexusquant_vllm.codec.kv import split_slots
from nexusquant_vllm.codec.scalar import scalar_dequantize, scalar_quantize

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


def _pack(index: torch.Tensor, bits: int) -> torch.Tensor:
    """b-bit indices ``[..., d]`` -> uint8 ``[..., d/8 * b]``: each group of 8 indices is one 8b-bit little-endian int."""
    groups = index.long().unflatten(-1, (-1, GROUP))
    word = (groups << (torch.arange(GROUP, device=index.device) * bits)).sum(-1)
    shifts = torch.arange(bits, device=index.device) * 8
    return ((word[..., None] >> shifts) & 0xFF).flatten(-2).to(torch.uint8)


def _unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    byte_groups = packed.long().unflatten(-1, (-1, bits))
    word = (byte_groups << (torch.arange(bits, device=packed.device) * 8)).sum(-1)
    index = (word[..., None] >> (torch.arange(GROUP, device=packed.device) * bits)) & ((1 << bits) - 1)
    return index.flatten(-2)


def _encode(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    index, scale = scalar_quantize(rotate(x), bits, KIND)
    return _pack(index, bits), scale


def encode_kv(key: torch.Tensor, value: torch.Tensor, fmt: KVFormat, validate: bool = True) -> torch.Tensor:
    if validate and not (torch.isfinite(key).all() and torch.isfinite(value).all()):
        raise ValueError("scalar baseline input contains NaN or inf")
    k_codes, k_scale = _encode(key, fmt.k_bits)
    v_codes, v_scale = _encode(value, fmt.v_bits)
    scales = torch.stack([k_scale, v_scale], -1).contiguous().view(torch.uint8)
    return torch.cat([k_codes, v_codes, scales], -1)


def decode_kv_rotated(slots: torch.Tensor, fmt: KVFormat) -> tuple[torch.Tensor, torch.Tensor]:
    k_codes, v_codes, k_scale, v_scale = split_slots(slots, fmt)
    return (scalar_dequantize(_unpack(k_codes, fmt.k_bits), k_scale, fmt.k_bits, KIND),
            scalar_dequantize(_unpack(v_codes, fmt.v_bits), v_scale, fmt.v_bits, KIND))
