"""Native CPU paged decode attention over E8-packed pages (``csrc/e8_decode_attention_cpu.cpp``).

The decode rows of a step (one query token per request) attend to their cached context, decoded from the packed
codes inside the kernel, and to their own raw K/V; the same math as ``vllm_glue/paged_attention.attend`` (rotated
domain, float32, vLLM's null block masked), without dequantizing the context to memory. The (request, KV head) pairs
are split over ``torch.get_num_threads()`` threads.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from nexusquant_vllm.codec.e8 import e8p_table, res8_table
from nexusquant_vllm.codec.format import KVFormat
from nexusquant_vllm.native.library import load, ptr, run_split

LIBRARY = "_e8_decode_attention_cpu"
MAX_HEAD_DIM, MAX_GQA, MAX_BLOCK_SIZE = 512, 16, 256  # kMaxDim, kMaxGqa, kMaxBlock of the C++ code

_I64, _INT, _P = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
_SIGNATURE = (
    _P, _P, _P, _P,  # q, k_new, v_new, cache
    _I64, _I64, _I64, _INT,  # block, head and token strides (bytes), block_size
    _P, _I64, _P, _I64,  # block_table, its width, cached lengths, num_kv_heads
    _INT, _INT, _INT, _INT,  # gqa, head_dim, k_bits, v_bits
    _P, _P,  # all E8P points, RES8 points
    _I64, _I64, _P,  # pair range, out
)


def _library() -> ctypes._CFuncPtr | None:
    return load(LIBRARY, "nq_e8_decode_attention", _SIGNATURE)


def available() -> bool:
    return _library() is not None


def supports(fmt: KVFormat, num_heads: int, num_kv_heads: int) -> bool:
    return available() and fmt.head_dim <= MAX_HEAD_DIM and num_heads // num_kv_heads <= MAX_GQA


@functools.lru_cache(maxsize=None)
def _tables() -> tuple[torch.Tensor, ...]:
    return e8p_table("cpu").contiguous(), res8_table("cpu").contiguous()


def decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cached_len: torch.Tensor,
    fmt: KVFormat,
) -> torch.Tensor:
    """Rotated ``query`` ``[R, Hq, D]`` (already times the softmax scale) and the current token's rotated raw
    ``key``/``value`` ``[R, Hk, D]`` attend over uint8 pages ``kv_cache`` ``[num_blocks, Hk, block_size, slot]`` (any
    strides) through ``block_table`` ``[R, W]`` for ``cached_len`` ``[R]`` positions -> float32 ``[R, Hq, D]``."""
    kernel = _library()
    if kv_cache.shape[2] > MAX_BLOCK_SIZE:
        raise ValueError(f"native decode attention supports block sizes up to {MAX_BLOCK_SIZE}, got {kv_cache.shape[2]}")
    r, num_heads, d = query.shape
    num_kv_heads = key.shape[1]
    q, k, v = (t.to(torch.float32).contiguous() for t in (query, key, value))
    table = block_table.to(torch.int64).contiguous()
    cached = cached_len.to(torch.int64).contiguous()
    out = torch.empty(r, num_heads, d, dtype=torch.float32)
    e8p, res8 = _tables()
    item = kv_cache.element_size()
    strides = [s * item for s in kv_cache.stride()[:3]]

    def run(begin: int, end: int) -> None:
        kernel(
            ptr(q), ptr(k), ptr(v), ptr(kv_cache), *strides, kv_cache.shape[2], ptr(table), table.shape[1],
            ptr(cached), num_kv_heads, num_heads // num_kv_heads, d, fmt.k_bits, fmt.v_bits, ptr(e8p), ptr(res8),
            begin, end, ptr(out),
        )

    pairs = r * num_kv_heads
    run_split(run, pairs, min(torch.get_num_threads(), pairs))
    return out
