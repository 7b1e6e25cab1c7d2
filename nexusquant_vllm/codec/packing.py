"""Bit packing of E8 stage indices into bytes, with no wasted bit.

A vector's codes are stored stage-major ("planar"): all groups' stage-1 indices (16 bits each, little-endian),
then all groups' stage-2 indices (8 or 16 bits). For d = 64 at 3 bits: 8 x 2 + 8 x 1 = 24 bytes = 3 bits/elem.
Planar layout keeps each stage's indices aligned to their own width, so a GPU kernel loads them as uint16/uint8.
"""

from __future__ import annotations

import torch

from nexusquant_vllm.codec.quantizer import STAGES


def _stage_bytes(bits: int) -> list[int]:
    return [stage.index_bits // 8 for stage in STAGES[bits]]


def pack_codes(codes: list[torch.Tensor], bits: int) -> torch.Tensor:
    """Per-stage int indices ``[..., g]`` -> uint8 ``[..., g * bits]``."""
    parts = []
    for index, nbytes in zip(codes, _stage_bytes(bits), strict=True):
        shifts = torch.arange(nbytes, device=index.device) * 8
        parts.append(((index.long()[..., None] >> shifts) & 0xFF).flatten(-2))
    return torch.cat(parts, -1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> list[torch.Tensor]:
    """Inverse of :func:`pack_codes`: uint8 ``[..., g * bits]`` -> per-stage int64 indices ``[..., g]``."""
    groups = packed.shape[-1] // bits
    codes, offset = [], 0
    for nbytes in _stage_bytes(bits):
        chunk = packed[..., offset : offset + groups * nbytes].long().unflatten(-1, (groups, nbytes))
        shifts = torch.arange(nbytes, device=packed.device) * 8
        codes.append((chunk << shifts).sum(-1))
        offset += groups * nbytes
    return codes
