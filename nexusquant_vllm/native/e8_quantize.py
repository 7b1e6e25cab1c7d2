"""The native CPU E8 quantizer (``csrc/e8_quantize_cpu.cpp``) behind the signature of ``codec.quantizer.quantize``.

Same algorithm as the torch reference, one vector at a time in C++ (measured by ``benchmarks/codec_distortion.py``:
see its throughput rows); codes equal the reference's except where two codewords are at exactly the same distance.
The library is a plain C ABI built by ``setup.py`` as ``_e8_quantize_cpu*.so`` next to this file and called through
ctypes, which releases the GIL, so large batches are split over ``torch.get_num_threads()`` threads.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from nexusquant_vllm.codec import kv as codec_kv
from nexusquant_vllm.codec.e8 import e8p_pattern_lookup, e8p_pattern_parity, e8p_patterns, res8_table
from nexusquant_vllm.codec.format import GROUP, check_bits
from nexusquant_vllm.codec.quantizer import BEAM, SCALE_C, STAGES

LIBRARY = "_e8_quantize_cpu"
MAX_HEAD_DIM = 512  # kMaxDim of the C++ code
_PARALLEL_MIN_ELEMENTS = 1 << 15  # below this, one thread (a decode step's few vectors)

_c_float_p, _c_int32_p, _c_int64_p = (ctypes.POINTER(t) for t in (ctypes.c_float, ctypes.c_int32, ctypes.c_int64))
_SIGNATURE = [
    _c_float_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,  # x, row_begin, row_end, d
    ctypes.c_int, ctypes.c_int, ctypes.c_float,  # bits, beam, step2
    _c_float_p, ctypes.c_int,  # scale_c, m
    _c_float_p, _c_int64_p, _c_float_p, _c_int64_p,  # E8P patterns, parity, RES8 points, pattern lookup
    _c_int32_p, _c_int32_p, ctypes.c_void_p,  # code1, code2, fp16 scale out
]


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL | None:
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"{LIBRARY}{suffix}"
        if path.exists():
            lib = ctypes.CDLL(str(path))
            lib.nq_e8_quantize.argtypes = _SIGNATURE
            lib.nq_e8_quantize.restype = None
            return lib
    return None


def available() -> bool:
    """Whether the native library was built (``pip install`` of this package builds it)."""
    return _library() is not None


@functools.lru_cache(maxsize=None)
def _tables() -> tuple[torch.Tensor, ...]:
    """E8P patterns, their sign parity, RES8 points and the lattice-point -> pattern lookup, as the codec builds them."""
    return tuple(t.contiguous() for t in (e8p_patterns(), e8p_pattern_parity(), res8_table("cpu"), e8p_pattern_lookup()))


def _ptr(t: torch.Tensor, kind):
    return ctypes.cast(t.data_ptr(), kind)


@functools.lru_cache(maxsize=None)
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nq-e8-quantize")


def quantize(x: torch.Tensor, bits: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Code rotated vectors ``x`` ``[..., d]`` -> (per stage int64 indices ``[..., d/8]``, fp16 scale ``[...]``),
    like ``codec.quantizer.quantize``. CPU tensors only; raises if the library is missing."""
    check_bits(bits)
    lib = _library()
    if lib is None:
        raise RuntimeError("the native E8 quantizer is not built; reinstall nexusquant_vllm (pip install -e .)")
    lead, d = x.shape[:-1], x.shape[-1]
    if x.device.type != "cpu" or d % GROUP or d > MAX_HEAD_DIM:
        raise ValueError(f"native quantize needs CPU vectors with head_dim % 8 == 0 and <= {MAX_HEAD_DIM}")
    rows = x.reshape(-1, d).to(torch.float32).contiguous()
    n, groups = rows.shape[0], d // GROUP
    code1 = torch.empty(n, groups, dtype=torch.int32)
    code2 = torch.zeros(n, groups, dtype=torch.int32)
    scale = torch.empty(n, dtype=torch.float16)
    scale_c = torch.tensor(SCALE_C[bits], dtype=torch.float32)
    patterns, parity, res8, lookup = _tables()
    step2 = STAGES[bits][-1].step if len(STAGES[bits]) > 1 else 1.0

    def run(begin: int, end: int) -> None:
        lib.nq_e8_quantize(
            _ptr(rows, _c_float_p), begin, end, d, bits, BEAM[bits], step2, _ptr(scale_c, _c_float_p),
            scale_c.numel(), _ptr(patterns, _c_float_p), _ptr(parity, _c_int64_p), _ptr(res8, _c_float_p),
            _ptr(lookup, _c_int64_p),
            _ptr(code1, _c_int32_p), _ptr(code2, _c_int32_p), scale.data_ptr(),
        )

    workers = min(torch.get_num_threads(), max(1, rows.numel() // _PARALLEL_MIN_ELEMENTS))
    if workers <= 1:
        run(0, n)
    else:
        bounds = torch.linspace(0, n, workers + 1).long().tolist()
        list(_pool(workers).map(run, bounds[:-1], bounds[1:]))
    codes = [code1, code2][: len(STAGES[bits])]
    return [c.long().reshape(*lead, groups) for c in codes], scale.reshape(lead)


encode_kv = functools.partial(codec_kv.encode_kv, quantizer=quantize)
"""``codec.encode_kv`` with the native quantizer (same arguments and bytes layout)."""
