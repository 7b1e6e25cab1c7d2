"""Encode/decode the K and V vectors of token-heads to and from packed slots (the layout of ``format.py``).

This is the pure-torch reference of the store and dequantize paths that the kernels and the vLLM backend follow.
"""

from __future__ import annotations

import torch

from nexusquant_vllm.codec.format import KVFormat
from nexusquant_vllm.codec.packing import pack_codes, unpack_codes
from nexusquant_vllm.codec.quantizer import check_finite, dequantize, quantize
from nexusquant_vllm.codec.rotation import rotate, unrotate


def _check_input(x: torch.Tensor, fmt: KVFormat, what: str) -> None:
    if x.shape[-1] != fmt.head_dim:
        raise ValueError(f"{what} has last dimension {x.shape[-1]}, expected head_dim {fmt.head_dim}")
    if not x.is_floating_point():
        raise ValueError(f"{what} must be a floating-point tensor, got {x.dtype}")


def encode_vectors(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate and code vectors ``[..., d]`` -> (uint8 codes ``[..., d/8 * bits]``, fp16 scales ``[...]``)."""
    codes, scale = quantize(rotate(x), bits)
    return pack_codes(codes, bits), scale


def decode_vectors_rotated(packed: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`encode_vectors` up to the rotation: float32 ``x @ R`` estimates ``[..., d]``."""
    return dequantize(unpack_codes(packed, bits), scale, bits)


def encode_kv(key: torch.Tensor, value: torch.Tensor, fmt: KVFormat, validate: bool = True) -> torch.Tensor:
    """Pack keys and values ``[..., head_dim]`` into uint8 slots ``[..., fmt.slot_bytes]``.

    ``validate`` rejects NaN/inf with a ``ValueError`` (it synchronizes the device; a hot path may turn it off,
    in which case a non-finite vector gets a NaN scale and decodes to NaN, never to plausible garbage).
    """
    _check_input(key, fmt, "key")
    _check_input(value, fmt, "value")
    if key.shape != value.shape:
        raise ValueError(f"key shape {tuple(key.shape)} != value shape {tuple(value.shape)}")
    if validate:
        check_finite(key)
        check_finite(value)
    k_codes, k_scale = encode_vectors(key, fmt.k_bits)
    v_codes, v_scale = encode_vectors(value, fmt.v_bits)
    scales = torch.stack([k_scale, v_scale], -1).contiguous().view(torch.uint8)
    return torch.cat([k_codes, v_codes, scales], -1)


def split_slots(slots: torch.Tensor, fmt: KVFormat) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """View uint8 slots ``[..., slot_bytes]`` as (K codes, V codes, K scale fp16, V scale fp16)."""
    if slots.dtype != torch.uint8 or slots.shape[-1] != fmt.slot_bytes:
        raise ValueError(f"expected uint8 slots [..., {fmt.slot_bytes}], got {slots.dtype} {tuple(slots.shape)}")
    k_codes = slots[..., : fmt.k_code_bytes]
    v_codes = slots[..., fmt.k_code_bytes : fmt.k_scale_offset]
    scales = slots[..., fmt.k_scale_offset :].contiguous().view(torch.float16)
    return k_codes, v_codes, scales[..., 0], scales[..., 1]


def decode_kv_rotated(
    slots: torch.Tensor, fmt: KVFormat, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots -> (K R, V R), ``[..., head_dim]`` each, in the rotated domain attention can use directly."""
    k_codes, v_codes, k_scale, v_scale = split_slots(slots, fmt)
    return (
        decode_vectors_rotated(k_codes, k_scale, fmt.k_bits).to(dtype),
        decode_vectors_rotated(v_codes, v_scale, fmt.v_bits).to(dtype),
    )


def decode_kv(slots: torch.Tensor, fmt: KVFormat, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots -> (K, V), ``[..., head_dim]`` each, in the original domain."""
    k_rot, v_rot = decode_kv_rotated(slots, fmt)
    return unrotate(k_rot).to(dtype), unrotate(v_rot).to(dtype)
