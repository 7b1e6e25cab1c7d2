"""The native CPU E8 quantizer (``csrc/e8_quantize_cpu.cpp``) behind the signature of ``codec.quantizer.quantize``.

Same algorithm as the torch reference, one vector at a time in C++ (measured by ``benchmarks/codec_distortion.py``:
see its throughput rows); codes equal the reference's except where two codewords are at exactly the same distance.
The library is a plain C ABI built by ``setup.py`` as ``_e8_quantize_cpu*.so`` next to this file and called through
ctypes, which releases the GIL, so large batches are split over ``torch.get_num_threads()`` threads.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from nexusquant_vllm.codec import kv as codec_kv
from nexusquant_vllm.codec.e8 import e8p_pattern_lookup, e8p_pattern_parity, e8p_patterns, res8_table
from nexusquant_vllm.codec.format import GROUP, check_bits
from nexusquant_vllm.codec.quantizer import BEAM, SCALE_C, STAGES
from nexusquant_vllm.native.library import load, ptr, run_split

LIBRARY = "_e8_quantize_cpu"
MAX_HEAD_DIM = 512  # kMaxDim of the C++ code
_PARALLEL_MIN_ELEMENTS = 1 << 15  # below this, one thread (a decode step's few vectors)

_SIGNATURE = (
    ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,  # x, row_begin, row_end, d
    ctypes.c_int, ctypes.c_int, ctypes.c_float,  # bits, beam, step2
    ctypes.c_void_p, ctypes.c_int,  # scale_c, m
    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,  # E8P patterns, parity, RES8, pattern lookup
    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,  # code1, code2, fp16 scale out
)


def _library() -> ctypes._CFuncPtr | None:
    return load(LIBRARY, "nq_e8_quantize", _SIGNATURE)


def available() -> bool:
    """Whether the native library was built (``pip install`` of this package builds it)."""
    return _library() is not None


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
    scale_c = torch.tensor(SCALE_C[bits], dtype=torch.float32)
    patterns, parity, res8, lookup = _tables()
    step2 = STAGES[bits][-1].step if len(STAGES[bits]) > 1 else 1.0

    def run(begin: int, end: int) -> None:
        kernel(
            ptr(rows), begin, end, d, bits, BEAM[bits], step2, ptr(scale_c), scale_c.numel(), ptr(patterns),
            ptr(parity), ptr(res8), ptr(lookup), ptr(code1), ptr(code2), ptr(scale),
        )

    run_split(run, n, min(torch.get_num_threads(), max(1, rows.numel() // _PARALLEL_MIN_ELEMENTS)))
    codes = [code1, code2][: len(STAGES[bits])]
    return [c.long().reshape(*lead, groups) for c in codes], scale.reshape(lead)


encode_kv = functools.partial(codec_kv.encode_kv, quantizer=quantize)
"""``codec.encode_kv`` with the native quantizer (same arguments and bytes layout)."""
