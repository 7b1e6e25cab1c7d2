"""Store new tokens' K/V into the paged cache: codec encode (torch) + one Triton scatter of the packed slots.

The encode is the codec's exact nearest-codeword search run as torch ops on the tensors' device, so the stored bytes
are the codec's bytes by construction. The scatter kernel writes row ``t`` of every KV head to page
``slot_mapping[t] // block_size``, offset ``slot_mapping[t] % block_size``, skipping ``slot_mapping[t] < 0``
(vLLM's padding) on the device: no host synchronization, no boolean indexing, any cache strides.

Not yet fused (issue 4 asks for rotate + scale + encode + pack in one launch): the codec's encoder uses
``nonzero`` for its rare fallback groups, so this path is neither one launch nor CUDA-graph capturable.
The scatter kernel is generic over the row dtype, so it also stores bf16 ``[K | V]`` rows (``fmt=None``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nexusquant_vllm.codec.format import KVFormat
from nexusquant_vllm.codec.kv import encode_kv


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


def store_kv(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor, fmt: KVFormat | None
) -> None:
    """Encode ``key``/``value`` ``[T, Hk, D]`` (original domain) and write them at ``slot_mapping`` (int64 ``[T]``).

    ``fmt=None`` stores unquantized ``[K | V]`` rows in the cache's dtype. Padding rows (slot -1) are encoded too
    (cheaper than a synchronizing filter) and dropped by the scatter. No NaN/inf check (hot path): a non-finite
    vector gets a NaN scale and decodes to NaN.
    """
    num_tokens = slot_mapping.shape[0]
    key, value = key[:num_tokens], value[:num_tokens]
    if fmt is not None:
        rows = encode_kv(key, value, fmt, validate=False)
    else:
        rows = torch.cat([key, value], -1).to(kv_cache.dtype)
    scatter_rows(rows, kv_cache, slot_mapping)
