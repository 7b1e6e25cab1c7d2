"""A faster torch dequantizer for e8 slots: the same result as ``codec.decode_kv_rotated`` with fewer passes.

The codec's reference unpacks indices through int64 shift-and-sum tensors and materializes every stage before
summing. Here the planar stage indices are read in place as little-endian int16/uint8 views of the slot bytes, each
stage is one ``index_select`` from its (pre-scaled) table, and the residual stage and the per-vector scale are
applied in place. Bit-exact against the reference (tests/vllm_glue/test_fast_decode.py); it reads the codec's own
tables and stage constants, so it is not a second quantizer.
"""

from __future__ import annotations

import functools

import torch

from nexusquant_vllm.codec.format import GROUP, KVFormat
from nexusquant_vllm.codec.quantizer import STAGES


@functools.lru_cache(maxsize=None)
def _stage_tables(bits: int, device: torch.device) -> tuple[tuple[torch.Tensor, int], ...]:
    """Per stage: (table * step as float32 [2^index_bits, 8], bytes per index)."""
    return tuple((stage.table(device) * stage.step, stage.index_bits // 8) for stage in STAGES[bits])


def _indices(codes: torch.Tensor, nbytes: int) -> torch.Tensor:
    """uint8 ``[..., g * nbytes]`` planar little-endian indices -> flat int32/int64 index tensor."""
    if nbytes == 1:
        return codes.reshape(-1).to(torch.int32)
    return codes.reshape(-1).view(torch.int16).to(torch.int32) & 0xFFFF


def _decode(codes: torch.Tensor, scale: torch.Tensor, bits: int, head_dim: int) -> torch.Tensor:
    """``codes`` uint8 [N, bits * head_dim / 8] (contiguous rows), ``scale`` [N] fp16 -> float32 [N, head_dim]."""
    n = codes.shape[0]
    groups = head_dim // GROUP
    out = None
    offset = 0
    for table, nbytes in _stage_tables(bits, codes.device):
        part = codes[:, offset : offset + groups * nbytes].contiguous()
        offset += groups * nbytes
        points = torch.index_select(table, 0, _indices(part, nbytes))  # [N * groups, 8]
        out = points if out is None else out.add_(points)
    out = out.view(n, head_dim)
    return out.mul_(scale.to(torch.float32).unsqueeze(-1))


def decode_kv_rotated(slots: torch.Tensor, fmt: KVFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``nexusquant_vllm.codec.decode_kv_rotated`` for e8 formats: (K R, V R) float32."""
    lead = slots.shape[:-1]
    flat = slots.reshape(-1, fmt.slot_bytes)
    scales = flat[:, fmt.k_scale_offset :].contiguous().view(torch.float16)  # [N, 2]
    k = _decode(flat[:, : fmt.k_code_bytes], scales[:, 0], fmt.k_bits, fmt.head_dim)
    v = _decode(flat[:, fmt.k_code_bytes : fmt.k_scale_offset], scales[:, 1], fmt.v_bits, fmt.head_dim)
    return k.view(*lead, fmt.head_dim), v.view(*lead, fmt.head_dim)
