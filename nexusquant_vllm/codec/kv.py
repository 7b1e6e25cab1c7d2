"""Encode/decode the K and V vectors of token-heads to and from packed slots (the layout of ``format.py``).

This is the pure-torch reference of the store and dequantize paths that the kernels and the vLLM backend follow.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from nexusquant_vllm.codec.format import GROUP, KVFormat
from nexusquant_vllm.codec.packing import pack_codes
from nexusquant_vllm.codec.quantizer import STAGES, check_finite, quantize
from nexusquant_vllm.codec.rotation import rotate, unrotate


def _check_input(x: torch.Tensor, fmt: KVFormat, what: str) -> None:
    if x.shape[-1] != fmt.head_dim:
        raise ValueError(f"{what} has last dimension {x.shape[-1]}, expected head_dim {fmt.head_dim}")
    if not x.is_floating_point():
        raise ValueError(f"{what} must be a floating-point tensor, got {x.dtype}")


Quantizer = Callable[[torch.Tensor, int], tuple[list[torch.Tensor], torch.Tensor]]


def encode_vectors(x: torch.Tensor, bits: int, quantizer: Quantizer = quantize) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate and code vectors ``[..., d]`` -> (uint8 codes ``[..., d/8 * bits]``, fp16 scales ``[...]``).

    ``quantizer`` is ``quantizer.quantize`` (the torch reference) or a kernel with its signature and output.
    A vector holding NaN or inf gets a NaN scale, so it decodes to NaN (the rotation spreads a lone inf over the
    whole vector, whose search scale would otherwise saturate into plausible finite values)."""
    codes, scale = quantizer(rotate(x), bits)
    scale = scale.masked_fill(~torch.isfinite(x).all(-1), float("nan"))
    return pack_codes(codes, bits), scale


@functools.lru_cache(maxsize=None)
def _scaled_tables(bits: int, device: torch.device) -> tuple[tuple[torch.Tensor, int], ...]:
    """Per stage: (decoding table times the stage step, float32 ``[2^index_bits, 8]``; bytes per index)."""
    return tuple((stage.table(device) * stage.step, stage.index_bits // 8) for stage in STAGES[bits])


def decode_vectors_rotated(packed: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`encode_vectors` up to the rotation: float32 ``x @ R`` estimates ``[..., d]``.

    Equal, bit for bit, to ``quantizer.dequantize(packing.unpack_codes(packed), scale)`` (tested), but reads each
    stage's planar indices in place as little-endian uint16/uint8 and does one table gather per stage.
    """
    lead, groups = packed.shape[:-1], packed.shape[-1] // bits
    rows = packed.reshape(-1, packed.shape[-1])
    out, offset = None, 0
    for table, nbytes in _scaled_tables(bits, packed.device):
        part = rows[:, offset : offset + groups * nbytes].contiguous().view(-1)
        offset += groups * nbytes
        index = part.to(torch.int32) if nbytes == 1 else part.view(torch.int16).to(torch.int32) & 0xFFFF
        points = torch.index_select(table, 0, index)  # [rows * groups, 8]
        out = points if out is None else out.add_(points)
    out = out.view(rows.shape[0], groups * GROUP).mul_(scale.reshape(-1, 1).to(torch.float32))
    return out.view(*lead, groups * GROUP)


def check_kv(key: torch.Tensor, value: torch.Tensor, fmt: KVFormat, validate: bool) -> None:
    """Shapes and dtypes of a store; with ``validate``, NaN/inf -> ``ValueError`` (a full pass and a device sync)."""
    _check_input(key, fmt, "key")
    _check_input(value, fmt, "value")
    if key.shape != value.shape:
        raise ValueError(f"key shape {tuple(key.shape)} != value shape {tuple(value.shape)}")
    if validate:
        check_finite(key)
        check_finite(value)


def encode_kv(
    key: torch.Tensor, value: torch.Tensor, fmt: KVFormat, validate: bool = True, quantizer: Quantizer = quantize
) -> torch.Tensor:
    """Pack keys and values ``[..., head_dim]`` into uint8 slots ``[..., fmt.slot_bytes]``.

    ``validate`` rejects NaN/inf with a ``ValueError`` (it synchronizes the device; a hot path may turn it off,
    in which case a non-finite vector gets a NaN scale and decodes to NaN, never to plausible garbage).
    """
    check_kv(key, value, fmt, validate)
    return join_slots(*encode_vectors(key, fmt.k_bits, quantizer), *encode_vectors(value, fmt.v_bits, quantizer))


def join_slots(
    k_codes: torch.Tensor, k_scale: torch.Tensor, v_codes: torch.Tensor, v_scale: torch.Tensor
) -> torch.Tensor:
    """Assemble packed codes ``[..., bytes]`` and fp16 scales ``[...]`` into slots ``[K codes | V codes | scales]``."""
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


def decode_kv(
    slots: torch.Tensor, fmt: KVFormat, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots -> (K, V), ``[..., head_dim]`` each, in the original domain."""
    k_rot, v_rot = decode_kv_rotated(slots, fmt)
    return unrotate(k_rot).to(dtype), unrotate(v_rot).to(dtype)
