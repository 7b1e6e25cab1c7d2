"""Triton E8 encoder: the codec's scale search and exact E8P / RES8 nearest-codeword searches, branch-free.

Device functions used by the fused store kernel (``store.py``); they reproduce ``codec.quantizer.quantize`` on a
tile of rotated vectors ``[BLOCK_T, D]``, whose ``N = BLOCK_T * D / 8`` groups are searched side by side.

**Exact E8P search without data-dependent control flow.** E8P is 2 shifts x 256 absolute patterns x 128 signs
(``codec/e8.py``). For a target t and one (shift, pattern) class, the best signs are the signs of ``t - shift``;
when their parity is wrong, the coordinate with the smallest ``|t_i| * pattern_i`` is flipped. So the nearest
codeword is the best of 512 classes, each scored exactly in closed form,

    |t - c|^2 = |t|^2 + |p|^2 - 2 sum_i p_i |t_i|  +  [parity wrong] * 4 min_i p_i |t_i|
              = (parity-free lower bound)          +  (parity penalty),

the formula of the codec's bounded search (``e8._bounded_candidates``). The kernel loops over the classes in chunks
of ``CHUNK`` patterns as ``[N, CHUNK, 8]`` tensors (a chunk never straddles the two shifts) and keeps a running
minimum, so every group does the same work: no ``nonzero``, no fallback, no data-dependent shape, CUDA-graph
capturable. The codec gets the same answer differently (Conway-Sloane lattice decoding for 2/3 of the groups, a
certified top-8 search, else an exhaustive one); all are exact, so codes differ only on floating-point near-ties.
The lattice fast path is not used: a branch-free tile of N >= 16 groups pays for its slowest group anyway.

**3-bit beam, as the codec builds it** (``e8.e8p_candidates``): the ``BOUNDED`` = 8 classes with the lowest bounds
(a running top-8, each chunk's smallest bounds replacing the running worst), the exact distances of those 8, the
``BEAM`` = 4 nearest of them in order, the first replaced by the exact nearest class when the 9th-smallest bound
does not certify it. (The 4 nearest classes overall would differ from the codec's beam for ~4% of groups, ~1% of
3-bit vectors, which is why the bounds are tracked.) Each candidate is completed with its nearest RES8 point; the
first pair with the lowest error wins.

**Cost model** (fp32 operations per 8-dim group and candidate scale; 3 scales per vector, every group of a tile
pays the same): E8P search, 512 classes x ~28 (8 mul, 7 add, 7 min, parity select, bound, running min) ~ 14K.
4 bits: two E8P searches ~ 29K. 3 bits: the search plus ~24 per class for the top-8 extraction (~12K), 8 codeword
rebuilds (~1K) and 4 RES8 searches of 256 points x ~18 (~18K): ~46K. All of it is register arithmetic on CUDA
cores (the parity ``min`` keeps the search off tensor cores; only the rotation is a ``tl.dot``). GPU speed has not
been measured (no GPU was available in this session): ``benchmarks/kernels_gpu.py`` times it.
"""

from __future__ import annotations

import triton
import triton.language as tl

from nexusquant_vllm.codec import e8
from nexusquant_vllm.kernels.tables import PARITY_BIT

_PARITY_BIT = tl.constexpr(PARITY_BIT)
BOUNDED = tl.constexpr(e8._TOP_K)  # classes whose exact distance the codec's bounded search computes
NUM_CLASSES = tl.constexpr(2 * e8.e8p_patterns().shape[0])  # 2 shifts x 256 patterns (index bits 0-7, 15)
RES8_POINTS = tl.constexpr(1 << e8.RES8_BITS)


@triton.jit
def _expand_patterns(code, coord):
    """Packed E8P patterns ``[P]`` (``tables.e8p_packed_table``) -> (absolute patterns ``[P, 8]``, parity ``[P]``)."""
    pattern = ((code[:, None] >> (2 * coord[None, :])) & 3).to(tl.float32) + 0.5
    return pattern, (code >> _PARITY_BIT) & 1


@triton.jit
def _class_distances(t_in, c0, e8p_ptr, coord, CHUNK: tl.constexpr):
    """Distances ``[N, CHUNK]`` from targets ``[N, 8]`` to the classes ``c0 .. c0 + CHUNK - 1`` (class = shift bit
    * 256 + pattern): (parity-free lower bound, exact squared distance of the class's best-signed codeword)."""
    t = t_in - (0.25 - 0.5 * (c0 // 256))
    a = tl.abs(t)
    neg_parity = tl.sum((t < 0).to(tl.int32), 1) & 1
    pattern, parity = _expand_patterns(tl.load(e8p_ptr + (c0 % 256) + tl.arange(0, CHUNK)), coord)
    weighted = a[:, None, :] * pattern[None, :, :]  # [N, CHUNK, 8]
    bound = tl.sum(a * a, 1)[:, None] + tl.sum(pattern * pattern, 1)[None, :] - 2 * tl.sum(weighted, 2)
    wrong = neg_parity[:, None] != parity[None, :]
    return bound, bound + tl.where(wrong, 4 * tl.min(weighted, 2), 0.0)


@triton.jit
def _e8p_nearest_class(t, e8p_ptr, coord, CHUNK: tl.constexpr):
    """Class ``[N]`` of the nearest E8P codeword (first minimum on ties)."""
    best = tl.full([t.shape[0]], float("inf"), tl.float32)
    best_class = tl.zeros([t.shape[0]], tl.int32)
    for c0 in range(0, NUM_CLASSES, CHUNK):
        dist, j = tl.min(_class_distances(t, c0, e8p_ptr, coord, CHUNK)[1], 1, return_indices=True)
        better = dist < best
        best = tl.where(better, dist, best)
        best_class = tl.where(better, c0 + j, best_class)
    return best_class


@triton.jit
def _column(x, slot, j):
    """``x[n, j[n]]`` of ``x`` ``[N, K]`` with ``slot = tl.arange(0, K)[None, :]``."""
    return tl.sum(tl.where(slot == j[:, None], x, 0), 1)


@triton.jit
def _e8p_beam_classes(t, e8p_ptr, coord, BEAM: tl.constexpr, CHUNK: tl.constexpr):
    """The codec's beam (``e8.e8p_candidates``) -> classes ``[N, BEAM]``, nearest first: of the ``BOUNDED`` classes
    with the lowest bounds, the ``BEAM`` nearest; the first is replaced by the exact nearest class when the next
    bound does not certify it. Each chunk's smallest bounds replace the running worst when smaller."""
    n: tl.constexpr = t.shape[0]
    PICKS: tl.constexpr = BOUNDED if BOUNDED < CHUNK else CHUNK
    slot = tl.arange(0, BOUNDED)[None, :]
    cols = tl.arange(0, CHUNK)[None, :]
    top = tl.full([n, BOUNDED], float("inf"), tl.float32)
    top_class = tl.zeros([n, BOUNDED], tl.int32)
    next_bound = tl.full([n], float("inf"), tl.float32)  # the smallest bound left out of ``top``
    nearest = tl.full([n], float("inf"), tl.float32)
    nearest_class = tl.zeros([n], tl.int32)
    for c0 in range(0, NUM_CLASSES, CHUNK):
        bound, exact = _class_distances(t, c0, e8p_ptr, coord, CHUNK)
        dist, j = tl.min(exact, 1, return_indices=True)
        better = dist < nearest
        nearest = tl.where(better, dist, nearest)
        nearest_class = tl.where(better, c0 + j, nearest_class)
        for _ in tl.static_range(PICKS):
            b, j = tl.min(bound, 1, return_indices=True)
            worst, w = tl.max(top, 1, return_indices=True)
            next_bound = tl.minimum(next_bound, tl.maximum(b, worst))
            put = (slot == w[:, None]) & (b < worst)[:, None]
            top = tl.where(put, b[:, None], top)
            top_class = tl.where(put, (c0 + j)[:, None], top_class)
            bound = tl.where(cols == j[:, None], float("inf"), bound)
        next_bound = tl.minimum(next_bound, tl.min(bound, 1))
    exact = tl.zeros([n, BOUNDED], tl.float32)
    for s in tl.static_range(BOUNDED):
        diff = t - _e8p_codeword(t, _column(top_class, slot, tl.full([n], s, tl.int32)), e8p_ptr, coord)[1]
        exact = tl.where(slot == s, tl.sum(diff * diff, 1)[:, None], exact)
    certified = next_bound >= tl.min(exact, 1)
    beam_slot = tl.arange(0, BEAM)[None, :]
    beam = tl.zeros([n, BEAM], tl.int32)
    for k in tl.static_range(BEAM):
        j = tl.argmin(exact, 1)
        cls = _column(top_class, slot, j)
        if k == 0:
            cls = tl.where(certified, cls, nearest_class)
        beam = tl.where(beam_slot == k, cls[:, None], beam)
        exact = tl.where(slot == j[:, None], float("inf"), exact)
    return beam


@triton.jit
def _e8p_codeword(t, cls, e8p_ptr, coord):
    """Best-signed codeword of class ``cls`` ``[N]`` for targets ``t`` ``[N, 8]`` -> (16-bit index, point
    ``[N, 8]``), the index layout of ``codec.e8`` (pattern, 7 sign bits, shift bit)."""
    shift_bit = cls >> 8
    shift = 0.25 - 0.5 * shift_bit.to(tl.float32)
    centered = t - shift[:, None]
    pattern, parity = _expand_patterns(tl.load(e8p_ptr + (cls & 0xFF)), coord)
    flip_at = tl.argmin(tl.abs(centered) * pattern, 1)
    neg = centered < 0
    wrong = (tl.sum(neg.to(tl.int32), 1) & 1) != parity
    neg = (neg ^ ((coord[None, :] == flip_at[:, None]) & wrong[:, None])).to(tl.int32)
    sign_bits = tl.sum(tl.where(coord[None, :] < 7, neg << (8 + coord[None, :]), 0), 1)
    index = (cls & 0xFF) | sign_bits | (shift_bit << 15)
    return index, pattern * (1 - 2 * neg).to(tl.float32) + shift[:, None]


@triton.jit
def _e8p_nearest(t, e8p_ptr, coord, CHUNK: tl.constexpr):
    """Exact nearest E8P codeword of each target ``[N, 8]`` -> (index ``[N]``, point ``[N, 8]``)."""
    return _e8p_codeword(t, _e8p_nearest_class(t, e8p_ptr, coord, CHUNK), e8p_ptr, coord)


@triton.jit
def _res8_nearest(t, res8_ptr, coord, CHUNK: tl.constexpr):
    """Nearest RES8 point of each target ``[N, 8]`` by ``|c|^2 - 2 t.c`` (``e8.res8_encode``) -> (index, point)."""
    best = tl.full([t.shape[0]], float("inf"), tl.float32)
    best_index = tl.zeros([t.shape[0]], tl.int32)
    for i0 in range(0, RES8_POINTS, CHUNK):
        points = tl.load(res8_ptr + (i0 + tl.arange(0, CHUNK))[:, None] * 8 + coord[None, :])  # [CHUNK, 8]
        score = tl.sum(points * points, 1)[None, :] - 2 * tl.sum(t[:, None, :] * points[None, :, :], 2)
        s, j = tl.min(score, 1, return_indices=True)
        better = s < best
        best = tl.where(better, s, best)
        best_index = tl.where(better, i0 + j, best_index)
    return best_index, tl.load(res8_ptr + best_index[:, None] * 8 + coord[None, :])


@triton.jit
def _second_stage(unit, point1, e8p_ptr, res8_ptr, coord, step2, STAGE2: tl.constexpr, CHUNK: tl.constexpr):
    """Code the residual ``(unit - point1) / step2`` with the second codebook (``STAGE2`` = its index bits: 8 for
    RES8, 16 for E8P, 0 for none) -> (index ``[N]``, decoded sum ``[N, 8]``)."""
    if STAGE2 == 0:
        return tl.zeros([unit.shape[0]], tl.int32), point1
    residual = (unit - point1) / step2
    if STAGE2 == 8:
        index, point = _res8_nearest(residual, res8_ptr, coord, CHUNK)
    else:
        index, point = _e8p_nearest(residual, e8p_ptr, coord, CHUNK)
    return index, point1 + point * step2


@triton.jit
def encode_unit(unit, e8p_ptr, res8_ptr, coord, step2, STAGE2: tl.constexpr, BEAM: tl.constexpr,
                CHUNK: tl.constexpr):
    """Multi-stage code of unit-scale groups ``[N, 8]`` (``quantizer._greedy_codes`` / ``_beam_codes``)
    -> (stage-1 index ``[N]``, stage-2 index ``[N]``, decoded groups ``[N, 8]``)."""
    if BEAM == 1:
        index1, point1 = _e8p_nearest(unit, e8p_ptr, coord, CHUNK)
        index2, decoded = _second_stage(unit, point1, e8p_ptr, res8_ptr, coord, step2, STAGE2, CHUNK)
        return index1, index2, decoded
    beam = _e8p_beam_classes(unit, e8p_ptr, coord, BEAM, CHUNK)
    beam_slot = tl.arange(0, BEAM)[None, :]
    best = tl.full([unit.shape[0]], float("inf"), tl.float32)
    best1 = tl.zeros([unit.shape[0]], tl.int32)
    best2 = tl.zeros([unit.shape[0]], tl.int32)
    best_decoded = tl.zeros_like(unit)
    for k in tl.static_range(BEAM):  # the first minimum error wins, as in quantizer._beam_codes
        cls = _column(beam, beam_slot, tl.full([unit.shape[0]], k, tl.int32))
        index1, point1 = _e8p_codeword(unit, cls, e8p_ptr, coord)
        index2, decoded = _second_stage(unit, point1, e8p_ptr, res8_ptr, coord, step2, STAGE2, CHUNK)
        diff = unit - decoded
        error = tl.sum(diff * diff, 1)
        better = error < best
        best = tl.where(better, error, best)
        best1 = tl.where(better, index1, best1)
        best2 = tl.where(better, index2, best2)
        best_decoded = tl.where(better[:, None], decoded, best_decoded)
    return best1, best2, best_decoded


@triton.jit
def quantize_tile(x, scale_c_ptr, e8p_ptr, res8_ptr, step2, tiny, fp16_max, NUM_C: tl.constexpr,
                  STAGE2: tl.constexpr, BEAM: tl.constexpr, CHUNK: tl.constexpr):
    """``quantizer.quantize`` of rotated vectors ``x`` ``[BLOCK_T, D]`` float32: code at each search scale
    ``rms * scale_c[k]``, refit the scale by least squares, keep the first candidate with the lowest error.

    Returns (stage-1 indices ``[BLOCK_T, D/8]``, stage-2 indices ``[BLOCK_T, D/8]``, fp16 scales ``[BLOCK_T]``).
    """
    BLOCK_T: tl.constexpr = x.shape[0]
    D: tl.constexpr = x.shape[1]
    coord = tl.arange(0, 8)
    rms = tl.sqrt_rn(tl.sum(x * x, 1) / D)
    best = tl.full([BLOCK_T], float("inf"), tl.float32)
    best1 = tl.zeros([BLOCK_T, D // 8], tl.int32)
    best2 = tl.zeros([BLOCK_T, D // 8], tl.int32)
    best_scale = tl.zeros([BLOCK_T], tl.float16)
    for k in range(NUM_C):
        searched = tl.maximum(rms * tl.load(scale_c_ptr + k), tiny)
        unit = tl.reshape(tl.div_rn(x, searched[:, None]), (BLOCK_T * D // 8, 8))
        index1, index2, decoded = encode_unit(unit, e8p_ptr, res8_ptr, coord, step2, STAGE2, BEAM, CHUNK)
        decoded = tl.reshape(decoded, (BLOCK_T, D))
        fitted = tl.div_rn(tl.sum(x * decoded, 1), tl.sum(decoded * decoded, 1))
        scale = tl.minimum(tl.where(fitted > 0, fitted, searched), fp16_max).to(tl.float16)
        diff = x - decoded * scale.to(tl.float32)[:, None]
        error = tl.sum(diff * diff, 1)
        better = (error < best) | (k == 0)  # k == 0: a NaN/inf error still keeps the first candidate
        best = tl.where(better, error, best)
        best1 = tl.where(better[:, None], tl.reshape(index1, (BLOCK_T, D // 8)), best1)
        best2 = tl.where(better[:, None], tl.reshape(index2, (BLOCK_T, D // 8)), best2)
        best_scale = tl.where(better, scale, best_scale)
    return best1, best2, best_scale
