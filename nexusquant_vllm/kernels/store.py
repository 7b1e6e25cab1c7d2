"""Store new tokens' K/V into the paged cache: one fused Triton launch rotates, scales, E8-codes, packs and scatters.

Grid ``(cdiv(T, BLOCK_T), Hk, 2)``: a program owns ``BLOCK_T`` tokens (``launch.store``) of one KV head, for K
(axis 2 = 0) or V (axis 2 = 1), and

1. loads the vectors (any float dtype, any token/head strides) and rotates them, ``x @ R`` in IEEE fp32
   (``codec.rotation.rotation_matrix``): a ``tl.dot`` for tiles of 16 tokens (the dot's M), broadcast sums for the
   smaller tiles of head_dim 256;
2. codes them exactly like ``codec.quantizer.quantize`` (``e8_encode.quantize_tile``: candidate search scales,
   exact E8P / RES8 searches, 3-bit beam, least-squares scale refit, lowest-error candidate, fp16 clamp);
3. gives a vector holding NaN or inf a NaN scale (``codec.kv.encode_vectors``) and the codes of a zero vector
   (the codec's codes for such a vector are whatever its search makes of NaN);
4. writes the planar codes (``codec/packing.py``) and the fp16 scale into its part of the slot
   ``[K codes | V codes | K scale | V scale]`` at ``slot_mapping[t]``, skipping ``slot_mapping[t] < 0`` (vLLM's
   padding) and rows past T.

No host synchronization, no ``nonzero``, no shape that depends on the data: the store can be captured in a CUDA
graph. The bytes equal the codec's except on floating-point near-ties (the rotation and the distance sums round
in another order), so the distortion is the codec's (``tests/kernels/test_store.py``). The scatter kernel of bf16
``[K | V]`` rows (``fmt=None``, the backend's protected layers) is kept as is.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nexusquant_vllm.codec.format import KVFormat
from nexusquant_vllm.codec.quantizer import _TINY, BEAM, FP16_MAX, SCALE_C
from nexusquant_vllm.codec.rotation import rotation_matrix
from nexusquant_vllm.config import triton_interpreter
from nexusquant_vllm.kernels import launch
from nexusquant_vllm.kernels.e8_encode import quantize_tile
from nexusquant_vllm.kernels.tables import (
    e8p_packed_table,
    res8_flat_table,
    scale_c_table,
    stage2_index_bits,
    stage2_step,
)

# Elements of one [groups, CHUNK, 8] search tensor: ~32 fp32 registers per thread at 4 warps on a GPU (twice that
# spills the 3-bit store at head_dim 128 on sm_90: benchmarks/compile_gate.py); the interpreter runs each op as one
# numpy call, so it takes bigger chunks (fewer calls).
CHUNK_ELEMENTS = {"gpu": 1 << 12, "interpreter": 1 << 16}


@triton.jit
def _scatter_rows_kernel(
    rows_ptr,  # [T, Hk, W] contiguous
    slot_mapping_ptr,  # int64 [T]
    cache_ptr, stride_cb, stride_ch, stride_ct,  # cache strides in elements
    W: tl.constexpr, BLOCK_W: tl.constexpr, PAGE: tl.constexpr,
):
    tok = tl.program_id(0)
    head = tl.program_id(1)
    num_heads = tl.num_programs(1)
    cols = tl.arange(0, BLOCK_W)
    slot = tl.load(slot_mapping_ptr + tok + cols * 0).to(tl.int64)  # broadcast: a vector mask for every column
    ok = (cols < W) & (slot >= 0)
    row = tl.load(rows_ptr + (tok * num_heads + head) * W + cols, mask=ok)
    dst = cache_ptr + (slot // PAGE) * stride_cb + head * stride_ch + (slot % PAGE) * stride_ct
    tl.store(dst + cols, row, mask=ok)


def scatter_rows(rows: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write ``rows`` ``[T, Hk, W]`` into ``kv_cache`` ``[num_blocks, Hk, block_size, W]`` at ``slot_mapping``."""
    num_tokens, num_heads, width = rows.shape
    if kv_cache.shape[1] != num_heads or kv_cache.shape[-1] != width or kv_cache.stride(-1) != 1:
        raise ValueError(f"rows {tuple(rows.shape)} do not fit cache {tuple(kv_cache.shape)} (contiguous last dim)")
    if rows.dtype != kv_cache.dtype:
        raise ValueError(f"rows dtype {rows.dtype} != cache dtype {kv_cache.dtype}")
    if num_tokens == 0:
        return
    _scatter_rows_kernel[(num_tokens, num_heads)](
        rows.contiguous(), slot_mapping, kv_cache, kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        W=width, BLOCK_W=triton.next_power_of_2(width), PAGE=kv_cache.shape[2],
    )


@triton.jit
def _store_u16(ptr, value, mask):
    """Little-endian low 16 bits of int32 ``value`` at byte pointers ``ptr``."""
    tl.store(ptr, (value & 0xFF).to(tl.uint8), mask=mask)
    tl.store(ptr + 1, ((value >> 8) & 0xFF).to(tl.uint8), mask=mask)


@triton.jit
def _rotated_tile(src, row_ok, rot_ptr, D: tl.constexpr, BLOCK_K: tl.constexpr):
    """Vectors at row pointers ``src`` ``[BLOCK_T]`` -> (``x @ R`` float32 ``[BLOCK_T, D]``, row all finite). A tile
    of 16 rows or more rotates on tensor cores (``tl.dot``, IEEE fp32); a smaller one by broadcast sums over
    ``BLOCK_K``-wide slices of ``R`` (the dot's M is at least 16)."""
    cols = tl.arange(0, D)
    x_rot = tl.zeros([src.shape[0], D], tl.float32)
    bad = tl.zeros([src.shape[0]], tl.int32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(src[:, None] + kk[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
        bad += tl.sum(tl.where(tl.abs(x) < float("inf"), 0, 1), 1)  # NaN compares false
        r = tl.load(rot_ptr + kk[:, None] * D + cols[None, :])
        if src.shape[0] >= 16:
            x_rot += tl.dot(x, r, input_precision="ieee")
        else:
            x_rot += tl.sum(x[:, :, None] * r[None, :, :], 1)
    return x_rot, bad == 0


@triton.jit
def _encode_store(
    src_ptr, stride_st, stride_sh, slot_mapping_ptr, num_tokens,
    cache_ptr, stride_cb, stride_ch, stride_ct,
    rot_ptr, scale_c_ptr, e8p_ptr, res8_ptr, step2, tiny, fp16_max,
    D: tl.constexpr, PAGE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr,
    NUM_C: tl.constexpr, STAGE2: tl.constexpr, BEAM: tl.constexpr, CODE_OFF: tl.constexpr, SCALE_OFF: tl.constexpr,
):
    """Encode ``BLOCK_T`` vectors of one head (K or V) and write their codes and scales into their slots."""
    head = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    in_range = rows < num_tokens
    src = src_ptr + rows.to(tl.int64) * stride_st + head * stride_sh
    x_rot, finite = _rotated_tile(src, in_range, rot_ptr, D, BLOCK_K)
    x_rot = tl.where(finite[:, None], x_rot, 0.0)  # a non-finite vector is coded as zeros (its scale is NaN)
    index1, index2, scale = quantize_tile(
        x_rot, scale_c_ptr, e8p_ptr, res8_ptr, step2, tiny, fp16_max, NUM_C, STAGE2, BEAM, CHUNK
    )
    scale = tl.where(finite, scale.to(tl.float32), float("nan")).to(tl.float16)

    slot = tl.load(slot_mapping_ptr + rows, mask=in_range, other=-1).to(tl.int64)
    ok = in_range & (slot >= 0)
    slot = tl.where(ok, slot, 0)
    dst = cache_ptr + (slot // PAGE) * stride_cb + head * stride_ch + (slot % PAGE) * stride_ct
    G: tl.constexpr = D // 8
    grp = tl.arange(0, G)[None, :]
    codes = dst[:, None] + CODE_OFF
    _store_u16(codes + 2 * grp, index1, ok[:, None])
    if STAGE2 == 8:
        tl.store(codes + 2 * G + grp, index2.to(tl.uint8), mask=ok[:, None])
    if STAGE2 == 16:
        _store_u16(codes + 2 * G + 2 * grp, index2, ok[:, None])
    _store_u16(dst + SCALE_OFF, scale.to(tl.int16, bitcast=True).to(tl.int32), ok)


@triton.jit
def _store_kernel(
    key_ptr, stride_kt, stride_kh, value_ptr, stride_vt, stride_vh,  # [T, Hk, D], contiguous last dim
    slot_mapping_ptr, num_tokens,
    cache_ptr, stride_cb, stride_ch, stride_ct,  # uint8 cache strides (bytes)
    rot_ptr, k_scale_c_ptr, v_scale_c_ptr, e8p_ptr, res8_ptr, k_step2, v_step2, tiny, fp16_max,
    D: tl.constexpr, PAGE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr,
    K_NUM_C: tl.constexpr, K_STAGE2: tl.constexpr, K_BEAM: tl.constexpr,
    V_NUM_C: tl.constexpr, V_STAGE2: tl.constexpr, V_BEAM: tl.constexpr,
    V_OFF: tl.constexpr, KS_OFF: tl.constexpr, VS_OFF: tl.constexpr,
):
    if tl.program_id(2) == 0:
        _encode_store(
            key_ptr, stride_kt, stride_kh, slot_mapping_ptr, num_tokens, cache_ptr, stride_cb, stride_ch, stride_ct,
            rot_ptr, k_scale_c_ptr, e8p_ptr, res8_ptr, k_step2, tiny, fp16_max,
            D, PAGE, BLOCK_T, BLOCK_K, CHUNK, K_NUM_C, K_STAGE2, K_BEAM, 0, KS_OFF,
        )
    else:
        _encode_store(
            value_ptr, stride_vt, stride_vh, slot_mapping_ptr, num_tokens, cache_ptr, stride_cb, stride_ch, stride_ct,
            rot_ptr, v_scale_c_ptr, e8p_ptr, res8_ptr, v_step2, tiny, fp16_max,
            D, PAGE, BLOCK_T, BLOCK_K, CHUNK, V_NUM_C, V_STAGE2, V_BEAM, V_OFF, VS_OFF,
        )


def _check_e8(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, fmt: KVFormat) -> None:
    head_dim = fmt.head_dim
    if head_dim & (head_dim - 1) or not 16 <= head_dim <= 256:
        raise ValueError(f"the fused store supports power-of-two head_dim in 16..256, got {head_dim}")
    if key.shape != value.shape or key.shape[1:] != (kv_cache.shape[1], head_dim):
        raise ValueError(f"key {tuple(key.shape)} / value {tuple(value.shape)} do not fit cache {tuple(kv_cache.shape)}")
    if kv_cache.dtype != torch.uint8 or kv_cache.shape[-1] != fmt.slot_bytes or kv_cache.stride(-1) != 1:
        raise ValueError(f"an E8 cache must be uint8 [..., {fmt.slot_bytes}] with a contiguous last dim, got "
                         f"{kv_cache.dtype} {tuple(kv_cache.shape)}")


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def store_kv(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor, fmt: KVFormat | None
) -> None:
    """Encode ``key``/``value`` ``[T, Hk, D]`` (original domain) and write them at ``slot_mapping`` (int ``[T]``).

    ``kv_cache`` is ``[num_blocks, Hk, block_size, fmt.slot_bytes]`` uint8 with any strides but a contiguous last
    dim. ``fmt=None`` stores unquantized ``[K | V]`` rows in the cache's dtype. Rows with slot -1 (padding) are
    skipped on the device. No NaN/inf check (hot path): a non-finite vector gets a NaN scale and decodes to NaN.
    """
    num_tokens = slot_mapping.shape[0]
    key, value = key[:num_tokens], value[:num_tokens]
    if fmt is None:
        scatter_rows(torch.cat([key, value], -1).to(kv_cache.dtype), kv_cache, slot_mapping)
        return
    _check_e8(key, value, kv_cache, fmt)
    if num_tokens == 0:
        return
    key, value = _last_dim_contiguous(key), _last_dim_contiguous(value)
    device, head_dim, num_heads = key.device, fmt.head_dim, key.shape[1]
    params = launch.store(fmt)
    groups = params.block_t * head_dim // 8
    chunk = max(2, min(256, CHUNK_ELEMENTS["interpreter" if triton_interpreter() else "gpu"] // (8 * groups)))
    grid = (triton.cdiv(num_tokens, params.block_t), num_heads, 2)
    _store_kernel[grid](
        key, key.stride(0), key.stride(1), value, value.stride(0), value.stride(1),
        slot_mapping, num_tokens,
        kv_cache, kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        rotation_matrix(head_dim, device), scale_c_table(fmt.k_bits, device), scale_c_table(fmt.v_bits, device),
        e8p_packed_table(device), res8_flat_table(device),
        stage2_step(fmt.k_bits), stage2_step(fmt.v_bits), _TINY, FP16_MAX,
        D=head_dim, PAGE=kv_cache.shape[2], BLOCK_T=params.block_t, BLOCK_K=params.block_k, CHUNK=chunk,
        K_NUM_C=len(SCALE_C[fmt.k_bits]), K_STAGE2=stage2_index_bits(fmt.k_bits), K_BEAM=BEAM[fmt.k_bits],
        V_NUM_C=len(SCALE_C[fmt.v_bits]), V_STAGE2=stage2_index_bits(fmt.v_bits), V_BEAM=BEAM[fmt.v_bits],
        V_OFF=fmt.k_code_bytes, KS_OFF=fmt.k_scale_offset, VS_OFF=fmt.v_scale_offset, **params.kwargs(),
    )
