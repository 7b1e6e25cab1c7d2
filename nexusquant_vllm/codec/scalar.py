"""Per-element scalar quantizers: the baselines the E8 codec is measured against.

Same rotation, same one-fp16-scale-per-vector and the same least-squares scale refit as the E8 codec, so the only
difference is the codebook: 2^bits levels per element instead of 2^(8 bits) points per 8-dim group.

- ``uniform``: 2^b evenly spaced levels with the step that minimizes MSE on N(0, 1) (optimal clipping);
- ``lloydmax``: the 2^b Lloyd-Max levels of N(0, 1) (the MSE-optimal scalar quantizer for a Gaussian).

Levels are derived numerically at first use, not hard-coded. ``encode_kv_scalar`` / ``decode_kv_rotated_scalar``
store the baseline in the e8 slot layout (same size at the same bits), so it can be compared inside vLLM.
"""

from __future__ import annotations

import functools
import math

import torch

from nexusquant_vllm.codec.format import GROUP, KVFormat, check_bits
from nexusquant_vllm.codec.kv import check_kv, join_slots, split_slots
from nexusquant_vllm.codec.quantizer import FP16_MAX
from nexusquant_vllm.codec.rotation import rotate

SCALAR_KINDS = ("uniform", "lloydmax")
_TINY = 1e-30


def _phi(x: float) -> float:
    return math.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _cdf(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def _gaussian_mse(levels: list[float]) -> float:
    """Expected squared error of nearest-level quantization of N(0, 1)."""
    edges = [-math.inf] + [(a + b) / 2 for a, b in zip(levels, levels[1:])] + [math.inf]
    total = 0.0
    for level, lo, hi in zip(levels, edges, edges[1:]):
        mass = _cdf(hi) - _cdf(lo)
        first = _phi(lo) - _phi(hi)  # integral of x phi(x)
        lo_t = lo * _phi(lo) if math.isfinite(lo) else 0.0
        hi_t = hi * _phi(hi) if math.isfinite(hi) else 0.0
        second = mass + lo_t - hi_t  # integral of x^2 phi(x)
        total += second - 2 * level * first + level * level * mass
    return total


def _uniform(step: float, n: int) -> list[float]:
    return [(i - (n - 1) / 2) * step for i in range(n)]


@functools.lru_cache(maxsize=None)
def scalar_levels(bits: int, kind: str) -> torch.Tensor:
    """The 2^bits levels (unit-variance units) of a scalar quantizer, float32 ``[2^bits]``."""
    check_bits(bits)
    n = 1 << bits
    if kind == "uniform":
        lo, hi = 0.01, 2.0
        for _ in range(100):  # golden-section search of the MSE-optimal step
            a, b = hi - (hi - lo) / 1.618034, lo + (hi - lo) / 1.618034
            if _gaussian_mse(_uniform(a, n)) < _gaussian_mse(_uniform(b, n)):
                hi = b
            else:
                lo = a
        levels = _uniform((lo + hi) / 2, n)
    elif kind == "lloydmax":
        levels = _uniform(4.0 / n, n)
        for _ in range(500):
            edges = [-math.inf] + [(a + b) / 2 for a, b in zip(levels, levels[1:])] + [math.inf]
            levels = [(_phi(lo) - _phi(hi)) / (_cdf(hi) - _cdf(lo)) for lo, hi in zip(edges, edges[1:])]
    else:
        raise ValueError(f"unknown scalar quantizer {kind!r}; valid: {SCALAR_KINDS}")
    return torch.tensor(levels, dtype=torch.float32)


def scalar_quantize(x: torch.Tensor, bits: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated vectors ``[..., d]`` -> (level indices uint8 ``[..., d]``, fp16 scale ``[...]``)."""
    levels = scalar_levels(bits, kind).to(x.device)
    x = x.to(torch.float32)
    unit_scale = x.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(_TINY)
    index = ((x / unit_scale)[..., None] - levels).abs().argmin(-1)
    decoded = levels[index]
    fitted = (x * decoded).sum(-1, keepdim=True) / (decoded * decoded).sum(-1, keepdim=True)
    scale = torch.where(fitted > 0, fitted, unit_scale).clamp_max(FP16_MAX)
    return index.to(torch.uint8), scale.squeeze(-1).to(torch.float16)


def scalar_dequantize(index: torch.Tensor, scale: torch.Tensor, bits: int, kind: str) -> torch.Tensor:
    """Inverse of :func:`scalar_quantize`: float32 rotated vectors ``[..., d]``."""
    levels = scalar_levels(bits, kind).to(index.device)
    return levels[index.long()] * scale.to(torch.float32)[..., None]


def pack_bits(index: torch.Tensor, bits: int) -> torch.Tensor:
    """b-bit indices ``[..., d]`` -> uint8 ``[..., d/8 * b]``; each group of 8 indices is one little-endian int."""
    groups = index.long().unflatten(-1, (-1, GROUP))
    word = (groups << (torch.arange(GROUP, device=index.device) * bits)).sum(-1)
    shifts = torch.arange(bits, device=index.device) * 8
    return ((word[..., None] >> shifts) & 0xFF).flatten(-2).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`."""
    byte_groups = packed.long().unflatten(-1, (-1, bits))
    word = (byte_groups << (torch.arange(bits, device=packed.device) * 8)).sum(-1)
    index = (word[..., None] >> (torch.arange(GROUP, device=packed.device) * bits)) & ((1 << bits) - 1)
    return index.flatten(-2)


def encode_kv_scalar(
    key: torch.Tensor, value: torch.Tensor, fmt: KVFormat, kind: str = "lloydmax", validate: bool = True
) -> torch.Tensor:
    """Like ``codec.encode_kv`` with per-element scalar levels instead of E8 codes (same slot layout and size)."""
    check_kv(key, value, fmt, validate)

    def encode(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        index, scale = scalar_quantize(rotate(x), bits, kind)
        return pack_bits(index, bits), scale

    return join_slots(*encode(key, fmt.k_bits), *encode(value, fmt.v_bits))


def decode_kv_rotated_scalar(
    slots: torch.Tensor, fmt: KVFormat, kind: str = "lloydmax"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`encode_kv_scalar` up to the rotation, like ``codec.decode_kv_rotated``."""
    k_codes, v_codes, k_scale, v_scale = split_slots(slots, fmt)
    return (
        scalar_dequantize(unpack_bits(k_codes, fmt.k_bits), k_scale, fmt.k_bits, kind),
        scalar_dequantize(unpack_bits(v_codes, fmt.v_bits), v_scale, fmt.v_bits, kind),
    )
