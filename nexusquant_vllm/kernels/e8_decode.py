"""In-register decoding of E8-packed slots, shared by the attention kernels (``decode_attention``, ``prefill_attention``).

The codes of a tile of tokens are read as bytes (any alignment), their E8P indices expanded with shifts against the
1 KiB packed pattern table (``tables.e8p_packed_table``), and the second stage (RES8 or E8P) added: the result is the
*unit-scale* codeword; callers fold the per-token fp16 scales into scores and probabilities.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nexusquant_vllm.codec.format import KVFormat


@triton.jit
def _load_u16(ptr, mask):
    """Little-endian uint16 at byte pointers ``ptr`` (any alignment) -> int32."""
    lo = tl.load(ptr, mask=mask, other=0).to(tl.int32)
    hi = tl.load(ptr + 1, mask=mask, other=0).to(tl.int32)
    return lo | (hi << 8)


@triton.jit
def _e8p_points(idx, e8p_ptr, coord):
    """E8P indices ``[N, G]`` (int32) -> points ``[N, G, 8]`` float32 (``codec.e8.e8p_decode``, bit by bit)."""
    code = tl.load(e8p_ptr + (idx & 0xFF))  # packed pattern: 2-bit digits + parity at bit 16
    flags = (idx >> 8) & 0x7F
    par = flags ^ (flags >> 4)
    par = par ^ (par >> 2)
    par = (par ^ (par >> 1)) & 1
    neg_last = (par ^ (code >> 16)) & 1
    c = coord[None, None, :]
    digit = ((code[:, :, None] >> (2 * c)) & 3).to(tl.float32)
    neg = tl.where(c < 7, (idx[:, :, None] >> (8 + c)) & 1, neg_last[:, :, None])
    shift = 0.25 - 0.5 * ((idx >> 15) & 1).to(tl.float32)
    return (digit + 0.5) * (1.0 - 2.0 * neg.to(tl.float32)) + shift[:, :, None]


@triton.jit
def _decode_unit(slot_ptr, mask, e8p_ptr, res8_ptr, step2, BITS: tl.constexpr, D: tl.constexpr):
    """Unit-scale codewords ``[N, D]`` float32 of the codes starting at byte pointers ``slot_ptr`` ``[N]``.

    Planar layout (``codec/packing.py``): G uint16 stage-1 indices, then G stage-2 indices (uint8 or uint16).
    """
    G: tl.constexpr = D // 8
    grp = tl.arange(0, G)
    coord = tl.arange(0, 8)
    m2 = mask[:, None]
    base = slot_ptr[:, None]
    unit = _e8p_points(_load_u16(base + 2 * grp[None, :], m2), e8p_ptr, coord)
    if BITS == 3:
        idx8 = tl.load(base + 2 * G + grp[None, :], mask=m2, other=0).to(tl.int32)
        unit += tl.load(res8_ptr + idx8[:, :, None] * 8 + coord[None, None, :]) * step2
    if BITS == 4:
        idx2 = _load_u16(base + 2 * G + 2 * grp[None, :], m2)
        unit += _e8p_points(idx2, e8p_ptr, coord) * step2
    return tl.reshape(unit, (unit.shape[0], D))


@triton.jit
def _load_fp16_scale(ptr, mask):
    """fp16 at byte pointers ``ptr`` (little-endian) -> float32."""
    bits = _load_u16(ptr, mask).to(tl.uint16)
    return bits.to(tl.float16, bitcast=True).to(tl.float32)


def check_paged_inputs(q: torch.Tensor, kv_cache: torch.Tensor, fmt: KVFormat | None, head_dim: int) -> None:
    """The shape limits shared by the attention kernels (``ValueError`` otherwise)."""
    if head_dim & (head_dim - 1) or not 16 <= head_dim <= 256:
        raise ValueError(f"the Triton attention kernels support power-of-two head_dim in 16..256, got {head_dim}")
    if q.shape[1] % kv_cache.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {kv_cache.shape[1]} KV heads")
    width = fmt.slot_bytes if fmt is not None else 2 * head_dim
    if kv_cache.shape[-1] != width or kv_cache.stride(-1) != 1:
        raise ValueError(f"kv_cache last dim must be contiguous of size {width}, got {tuple(kv_cache.shape)}")
    if fmt is not None and kv_cache.dtype != torch.uint8:
        raise ValueError(f"an E8 cache must be uint8, got {kv_cache.dtype}")
