"""The native CPU E8 quantizer (``csrc/e8_quantize_cpu.cpp``): ``quantize`` behind the signature of
``codec.quantizer.quantize``, and ``store_kv``, the whole store of one layer (code, pack and write the slots in place).

Same algorithm as the torch reference, one vector at a time in C++ (measured by ``benchmarks/codec_distortion.py``:
see its throughput rows); codes equal the reference's except where two codewords are at exactly the same distance.
The library is a plain C ABI built by ``setup.py`` as ``_e8_quantize_cpu*.so`` next to this file and called through
ctypes; inside one call, rows are split over up to ``torch.get_num_threads()`` threads of torch's own OpenMP team
(``csrc/parallel.h``), which is also the team vLLM's CPU worker runs on.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from nexusquant_vllm.codec import kv as codec_kv
from nexusquant_vllm.codec.e8 import e8p_pattern_lookup, e8p_pattern_parity, e8p_patterns, res8_table
from nexusquant_vllm.codec.format import GROUP, KVFormat, check_bits
from nexusquant_vllm.codec.quantizer import BEAM, SCALE_C, STAGES
from nexusquant_vllm.native.library import check_cpu, check_in_range, check_pages, load, ptr, require

LIBRARY = "_e8_quantize_cpu"
MAX_HEAD_DIM = 512  # kMaxDim of the C++ code
_PARALLEL_MIN_ELEMENTS = 1 << 15  # quantize: below this, one thread
# store_kv: token-heads per thread at least (one costs ~35-45 us at 3+2 bits, an OpenMP hand-off a few us), so a
# decode step's 8 x 3 token-heads already go to two threads
_STORE_MIN_ROWS_PER_THREAD = 4

_P, _I64, _INT, _FLOAT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_CONFIG = (_INT, _INT, _FLOAT, _P, _INT)  # bits, beam, step2, scale_c, m
_TABLES = (_P, _P, _P, _P)  # E8P patterns, parity, RES8, pattern lookup
_SIGNATURE = (
    _P, _I64, _I64,  # x, rows, d
    *_CONFIG, *_TABLES,
    _P, _P, _P, _INT,  # code1, code2, fp16 scale out, threads
)
_STORE_SIGNATURE = (
    _P, _P,  # K, V (the model's domain: the kernel rotates)
    _I64, _I64, _I64,  # rows (token-heads), d, num_kv_heads
    _P, _P, _I64, _I64, _I64, _I64,  # slot_mapping, cache, block / head / token strides (bytes), block_size
    *_CONFIG, *_CONFIG, *_TABLES,  # K, V
    _INT,  # threads
)


def _library() -> ctypes._CFuncPtr | None:
    return load(LIBRARY, "nq_e8_quantize", _SIGNATURE)


def _store_kernel() -> ctypes._CFuncPtr | None:
    return load(LIBRARY, "nq_e8_store", _STORE_SIGNATURE)


def available() -> bool:
    """Whether the native library was built (``pip install`` of this package builds it)."""
    return _library() is not None


@functools.lru_cache(maxsize=None)
def _scale_c(bits: int) -> torch.Tensor:
    return torch.tensor(SCALE_C[bits], dtype=torch.float32)


def _config(bits: int) -> tuple:
    """The C ``Config`` of one bit width: bits, beam, second-stage step, candidate scale multipliers and their count."""
    step2 = STAGES[bits][-1].step if len(STAGES[bits]) > 1 else 1.0
    return bits, BEAM[bits], step2, ptr(_scale_c(bits)), len(SCALE_C[bits])


@functools.lru_cache(maxsize=None)
def _tables() -> tuple[torch.Tensor, ...]:
    """E8P patterns, their sign parity, RES8 points and the lattice-point -> pattern lookup, as the codec builds them."""
    return tuple(t.contiguous() for t in (e8p_patterns(), e8p_pattern_parity(), res8_table("cpu"), e8p_pattern_lookup()))


def quantize(x: torch.Tensor, bits: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Code rotated vectors ``x`` ``[..., d]`` -> (per stage int64 indices ``[..., d/8]``, fp16 scale ``[...]``),
    like ``codec.quantizer.quantize``. CPU tensors only; raises if the library is missing."""
    check_bits(bits)
    kernel = _library()
    if kernel is None:
        raise RuntimeError("the native E8 quantizer is not built; reinstall nexusquant_vllm (pip install -e .)")
    lead, d = x.shape[:-1], x.shape[-1]
    if x.device.type != "cpu" or d % GROUP or d > MAX_HEAD_DIM:
        raise ValueError(f"native quantize needs CPU vectors with head_dim % 8 == 0 and <= {MAX_HEAD_DIM}")
    rows = x.reshape(-1, d).to(torch.float32).contiguous()
    n, groups = rows.shape[0], d // GROUP
    code1 = torch.empty(n, groups, dtype=torch.int32)
    code2 = torch.zeros(n, groups, dtype=torch.int32)
    scale = torch.empty(n, dtype=torch.float16)
    tables = [ptr(t) for t in _tables()]
    threads = min(torch.get_num_threads(), max(1, rows.numel() // _PARALLEL_MIN_ELEMENTS))
    kernel(ptr(rows), n, d, *_config(bits), *tables, ptr(code1), ptr(code2), ptr(scale), threads)
    codes = [code1, code2][: len(STAGES[bits])]
    return [c.long().reshape(*lead, groups) for c in codes], scale.reshape(lead)


encode_kv = functools.partial(codec_kv.encode_kv, quantizer=quantize)
"""``codec.encode_kv`` with the native quantizer (same arguments and bytes layout)."""


def store_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
             fmt: KVFormat) -> None:
    """``kv_cache[slot // bs, :, slot % bs] = encode_kv(key, value, fmt, validate=False)`` for every token whose
    ``slot_mapping`` entry is not negative (vLLM's padding), in one native call: ``key``/``value`` ``[n, Hk, D]``,
    ``kv_cache`` uint8 pages ``[num_blocks, Hk, block_size, fmt.slot_bytes]`` (any strides), CPU tensors."""
    kernel = _store_kernel()
    if kernel is None:
        raise RuntimeError("the native E8 quantizer is not built; reinstall nexusquant_vllm (pip install -e .)")
    _check_store(key, value, kv_cache, slot_mapping, fmt)
    n, num_kv_heads, d = key.shape
    k, v = (t.to(torch.float32).contiguous() for t in (key, value))
    slots = slot_mapping.to(torch.int64).contiguous()
    item = kv_cache.element_size()
    strides = [s * item for s in kv_cache.stride()[:3]]
    tables = [ptr(t) for t in _tables()]
    rows = n * num_kv_heads
    threads = max(1, min(torch.get_num_threads(), rows // _STORE_MIN_ROWS_PER_THREAD))
    kernel(ptr(k), ptr(v), rows, d, num_kv_heads, ptr(slots), ptr(kv_cache), *strides, kv_cache.shape[2],
           *_config(fmt.k_bits), *_config(fmt.v_bits), *tables, threads)


def _check_store(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                 fmt: KVFormat) -> None:
    check_cpu(key=key, value=value, slot_mapping=slot_mapping)
    require(key.dim() == 3 and value.shape == key.shape,
            lambda: f"key and value must both be [n, Hk, D], got {tuple(key.shape)} and {tuple(value.shape)}")
    n, num_kv_heads, d = key.shape
    require(d == fmt.head_dim and d <= MAX_HEAD_DIM,
            lambda: f"head_dim {d} does not match the format's {fmt.head_dim} (at most {MAX_HEAD_DIM})")
    require(slot_mapping.shape == (n,) and not slot_mapping.is_floating_point(),
            lambda: f"slot_mapping must be {n} integer slots, got {slot_mapping.dtype} {tuple(slot_mapping.shape)}")
    check_pages(kv_cache, num_kv_heads, fmt.slot_bytes, {torch.uint8})
    check_in_range(slot_mapping, -1, kv_cache.shape[0] * kv_cache.shape[2], "slot_mapping (-1: padding)")
