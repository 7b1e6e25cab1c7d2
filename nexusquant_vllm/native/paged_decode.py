"""Native CPU paged decode attention (``csrc/e8_decode_attention_cpu.cpp``) over E8-packed pages or the dense
``[K | V]`` pages of the protected boundary layers.

The decode rows of a step (one query token per request) attend to their cached context, read from the pages inside
the kernel (E8 codes decoded chunk by chunk, never dequantized to memory), and to their own raw K/V; the same math
as ``attention/paged.attend`` (float32, vLLM's null block masked). The (request, KV head) pairs are split over up to
``torch.get_num_threads()`` threads of torch's OpenMP team (``csrc/parallel.h``).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from nexusquant_vllm.codec.e8 import e8p_pattern_parity, e8p_patterns, res8_table
from nexusquant_vllm.codec.format import KVFormat
from nexusquant_vllm.codec.quantizer import STAGES
from nexusquant_vllm.native.library import check_cpu, check_in_range, check_pages, load, ptr, require

LIBRARY = "_e8_decode_attention_cpu"
MAX_HEAD_DIM, MAX_GQA = 512, 16  # kMaxDim, kMaxGqa of the C++ code
DENSE_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # DenseDtype of the C++ code

_I64, _INT, _FLOAT, _P = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
_COMMON = (
    _P, _P, _P, _P,  # q, k_new, v_new, cache
    _I64, _I64, _I64, _INT,  # block, head and token strides (bytes), block_size
    _P, _I64, _P, _I64, _FLOAT,  # block_table, its width, cached lengths, window (0: none), softcap (0: none)
    _I64,  # num_kv_heads
    _INT, _INT, _FLOAT,  # gqa, head_dim, softmax scale
)
# bits, E8P patterns, parity, RES8, rotate; pairs, out, threads
_E8_SIGNATURE = (*_COMMON, _INT, _INT, _P, _P, _P, _INT, _I64, _P, _INT)
_DENSE_SIGNATURE = (*_COMMON, _INT, _I64, _P, _INT)  # dtype; pairs, out, threads


def _e8_kernel() -> ctypes._CFuncPtr | None:
    return load(LIBRARY, "nq_e8_decode_attention", _E8_SIGNATURE)


def _dense_kernel() -> ctypes._CFuncPtr | None:
    return load(LIBRARY, "nq_dense_decode_attention", _DENSE_SIGNATURE)


def available() -> bool:
    return _e8_kernel() is not None


def supports(head_dim: int, num_heads: int, num_kv_heads: int) -> bool:
    """Whether the kernel handles these shapes (E8 and dense pages alike; ``head_dim % 8 == 0`` is the backend's)."""
    return available() and head_dim <= MAX_HEAD_DIM and num_heads // num_kv_heads <= MAX_GQA


@functools.lru_cache(maxsize=None)
def _tables() -> tuple[torch.Tensor, ...]:
    """E8P patterns, their sign parity (uint8) and RES8 points times the second-stage step (exact: a power of two),
    as the codec builds them."""
    step = STAGES[3][1].step
    return (e8p_patterns().contiguous(), e8p_pattern_parity().to(torch.uint8).contiguous(),
            (res8_table("cpu") * step).contiguous())


def decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cached_len: torch.Tensor,
    scale: float,
    fmt: KVFormat | None = None,
    rotate: bool = False,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """``query`` ``[R, Hq, D]`` and the current token's raw ``key``/``value`` ``[R, Hk, D]``, in the pages' domain
    (rotated for E8 pages), attend over ``kv_cache`` ``[num_blocks, Hk, block_size, C]`` (any strides) through
    ``block_table`` ``[R, W]`` for ``cached_len`` ``[R]`` positions, softmax scale ``scale`` -> float32 ``[R, Hq, D]``.

    ``fmt`` given: uint8 E8 pages, ``C = fmt.slot_bytes``; with ``rotate``, ``query``/``key``/``value`` are in the
    model's domain instead and so is the result (the kernel applies the codec's rotation and its inverse, which
    spares the caller three small matmuls per layer). ``fmt`` None: dense pages of ``[K | V]`` rows (``C = 2 * D``,
    float32, float16 or bfloat16). ``window``: a sliding-window layer's window; the query (at position ``cached_len``)
    sees the cached positions ``>= cached_len - window + 1`` only. ``softcap``: logit soft-capping, each scaled score
    s becomes ``softcap * tanh(s / softcap)``."""
    _check_decode(query, key, value, kv_cache, block_table, cached_len, fmt, window, softcap)
    r, num_heads, d = query.shape
    num_kv_heads = key.shape[1]
    q, k, v = (t.to(torch.float32).contiguous() for t in (query, key, value))
    table = block_table.to(torch.int64).contiguous()
    cached = cached_len.to(torch.int64).contiguous()
    out = torch.empty(r, num_heads, d, dtype=torch.float32)
    item = kv_cache.element_size()
    common = (ptr(q), ptr(k), ptr(v), ptr(kv_cache), *(s * item for s in kv_cache.stride()[:3]), kv_cache.shape[2],
              ptr(table), table.shape[1], ptr(cached), window or 0, softcap or 0.0,
              num_kv_heads, num_heads // num_kv_heads, d, scale)
    if fmt is not None:
        kernel, extra = _e8_kernel(), (fmt.k_bits, fmt.v_bits, *(ptr(t) for t in _tables()), int(rotate))
    else:
        kernel, extra = _dense_kernel(), (DENSE_DTYPES[kv_cache.dtype],)
    pairs = r * num_kv_heads
    kernel(*common, *extra, pairs, ptr(out), min(torch.get_num_threads(), pairs))
    return out


def _check_decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                  block_table: torch.Tensor, cached_len: torch.Tensor, fmt: KVFormat | None, window: int | None,
                  softcap: float | None) -> None:
    check_cpu(query=query, key=key, value=value, block_table=block_table, cached_len=cached_len)
    shapes = (query.shape, key.shape, value.shape)
    require(query.dim() == 3 and key.dim() == 3 and value.shape == key.shape,
            lambda: "query must be [R, Hq, D] and key, value [R, Hk, D], got {}, {}, {}".format(*map(tuple, shapes)))
    r, num_heads, d = query.shape
    num_kv_heads = key.shape[1]
    require(key.shape[0] == r and key.shape[2] == d, lambda: "key {1} does not fit query {0}".format(*map(tuple, shapes)))
    require(num_heads % num_kv_heads == 0 and num_heads // num_kv_heads <= MAX_GQA,
            lambda: f"{num_heads} query heads over {num_kv_heads} KV heads: need a multiple, at most {MAX_GQA} "
                    "per KV head")
    require(d % 8 == 0 and d <= MAX_HEAD_DIM, lambda: f"head_dim {d} must be a multiple of 8, at most {MAX_HEAD_DIM}")
    if fmt is not None:
        require(fmt.head_dim == d, lambda: f"head_dim {d} does not match the format's {fmt.head_dim}")
        check_pages(kv_cache, num_kv_heads, fmt.slot_bytes, {torch.uint8})
    else:
        check_pages(kv_cache, num_kv_heads, 2 * d, DENSE_DTYPES)
    require(window is None or window > 0, lambda: f"window must be positive, got {window}")
    require(softcap is None or softcap > 0, lambda: f"softcap must be positive, got {softcap}")
    require(block_table.dim() == 2 and block_table.shape[0] == r and cached_len.shape == (r,),
            lambda: f"block_table must be [{r}, W] and cached_len [{r}], got {tuple(block_table.shape)} and "
                    f"{tuple(cached_len.shape)}")
    block_size = kv_cache.shape[2]
    longest = check_in_range(cached_len, 0, block_table.shape[1] * block_size + 1, "cached_len")
    used = -(-longest // block_size)  # the block-table columns the kernel reads
    check_in_range(block_table[:, :used], 0, kv_cache.shape[0], "block ids")
