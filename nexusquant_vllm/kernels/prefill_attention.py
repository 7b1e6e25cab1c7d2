"""Continuation-prefill attention (chunked prefill, prefix-cache hits) over E8-packed pages, flash-attention style.

A batch of requests is given varlen-style: request r owns query rows ``[query_start_loc[r], query_start_loc[r+1])``
and ``seq_lens[r]`` = cached + new tokens. Its ``q_len`` new tokens attend to

* its cached context, positions ``[0, seq_lens[r] - q_len)``, read from its pages (block table) and decoded in
  registers as in ``decode_attention`` (``e8_decode``: unit-scale codewords, K scales folded into the scores and V
  scales into the probabilities), or bf16 ``[K | V]`` rows when ``fmt`` is None; block-table entries equal to 0
  (vLLM's null block: eviction holes) are masked with -inf and never read; and
* its own new raw K/V (``key``/``value``, never quantized), causally.

A first chunk (no cached context) is the same kernel with an empty context loop. Design:

* **Rotated domain**, as ``decode_attention``: q and the raw K/V are rotated once (torch GEMMs), the kernel
  accumulates ``P·(vR)``, the output is un-rotated once. ``rotated=True`` skips both; bf16 pages are read in the
  domain they were stored in, so ``fmt=None`` implies it.
* **GQA.** One program owns ``BLOCK_M`` rows = ``BLOCK_M // group`` query tokens x the ``group`` query heads of one
  KV head (row ``i``: token ``i // group``, head ``i % group``): every decoded K/V tile feeds all of them.
* **Grid** ``(max query tiles, Hk, R)``: the query tiles of one (request, KV head), which read the same pages, are
  adjacent in launch order (L2 reuse). A program past its request's query length exits at once, so a batch mixing
  long chunks and single-token rows wastes only empty launches. The grid needs ``max_query_len`` (a host int vLLM's
  metadata has); without it, it is read from ``query_start_loc``, which synchronizes the device.
* **Online softmax** in base-2 units over both phases (context tiles, then the causal new-token tiles), one
  normalization at the end. Every valid row attends at least to its own token, so no row ends empty.

Limits: those of ``decode_attention`` (power-of-two head_dim in 16..256; q, the raw K/V and bf16 pages must fit
fp16 after rotation and softmax scaling, since the dots run on fp16 tensor cores). There is no split-KV: a
single-token row of a mixed batch reads its whole context in one program (decode-only steps belong to
``decode_attention``). GPU performance is unmeasured so far (``benchmarks/kernels_gpu.py`` has the sweep).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nexusquant_vllm.codec.format import KVFormat
from nexusquant_vllm.codec.rotation import rotation_matrix
from nexusquant_vllm.kernels import launch
from nexusquant_vllm.kernels.decode_attention import LOG2E, MIN_DOT_ROWS, NULL_BLOCK, _soft_cap
from nexusquant_vllm.kernels.e8_decode import _decode_unit, _load_fp16_scale, check_paged_inputs
from nexusquant_vllm.kernels.tables import e8p_packed_table, res8_flat_table, stage2_step


@triton.jit
def _softmax_step(s, v, p_scale, m_i, l_i, acc, SCALE_P: tl.constexpr):
    """One online-softmax update with masked base-2 scores ``s`` ``[M, N]`` and fp16 values ``v`` ``[N, D]``.

    With ``SCALE_P`` the probabilities are multiplied by ``p_scale`` ``[N]`` (the V scales) after they enter the
    denominator, so unit-scale V codewords give the scaled values' weighted sum.
    """
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if SCALE_P:
        p = p * p_scale[None, :]
    acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), v)
    return m_new, l_i, acc


@triton.jit
def _prefill_kernel(
    q_ptr,  # float32 [T, Hq, D], rotated, contiguous
    k_ptr, v_ptr,  # [T, Hk, D] raw new K/V (rotated), any float dtype, contiguous last dim
    stride_kt, stride_kh, stride_vt, stride_vh,  # their strides in elements (token, kv head)
    out_ptr,  # float32 [T, Hq, D]
    cache_ptr,  # uint8 (E8) or bf16/fp16 (KV_BITS == 16) pages
    stride_cb, stride_ch, stride_ct,  # cache strides in elements (block, kv head, token)
    block_table_ptr, stride_bt,
    query_start_loc_ptr, seq_lens_ptr,
    window,  # sliding window (query position p sees key positions k with p - k < window); used with WINDOWED
    e8p_ptr, res8_ptr,
    qk_scale,  # softmax scale * log2(e)
    softcap,  # logit soft-capping * log2(e), with SOFTCAP
    k_step2, v_step2,
    GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr,  # tokens per page (block_size)
    KV_BITS: tl.constexpr, K_BITS: tl.constexpr, V_BITS: tl.constexpr,
    V_OFF: tl.constexpr, KS_OFF: tl.constexpr, VS_OFF: tl.constexpr,
    WINDOWED: tl.constexpr, SOFTCAP: tl.constexpr,
):
    Q_PER_TILE: tl.constexpr = BLOCK_M // GROUP_SIZE
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    req = tl.program_id(2)
    num_q_heads = tl.num_programs(1) * GROUP_SIZE

    q_start = tl.load(query_start_loc_ptr + req).to(tl.int64)
    q_len = (tl.load(query_start_loc_ptr + req + 1) - q_start).to(tl.int32)
    tile_start = tile * Q_PER_TILE
    if tile_start >= q_len:
        return
    cached_len = tl.load(seq_lens_ptr + req) - q_len

    rows = tl.arange(0, BLOCK_M)
    qi = tile_start + rows // GROUP_SIZE  # query token index within the request
    row_ok = (rows < Q_PER_TILE * GROUP_SIZE) & (qi < q_len)
    q_rows = (q_start + qi) * num_q_heads + kvh * GROUP_SIZE + rows % GROUP_SIZE
    dims = tl.arange(0, D)
    q = tl.load(q_ptr + q_rows[:, None] * D + dims[None, :], mask=row_ok[:, None], other=0.0)
    q = (q * qk_scale).to(tl.float16)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)

    # (a) cached context, read from the pages: every row sees all of it, or with WINDOWED the positions p with
    # cached_len + qi - p < window (the loop starts at the tile's first row's window)
    lo = 0
    if WINDOWED:
        lo = tl.maximum(cached_len + tile_start - window + 1, 0)
    for t0 in range(lo, cached_len, BLOCK_N):
        pos = t0 + tl.arange(0, BLOCK_N)
        in_ctx = pos < cached_len
        block = tl.load(block_table_ptr + req * stride_bt + pos // PAGE, mask=in_ctx, other=0)
        ok = in_ctx & (block != NULL_BLOCK)  # vLLM's null block: masked, never read
        tok = cache_ptr + block.to(tl.int64) * stride_cb + kvh * stride_ch + (pos % PAGE) * stride_ct
        seen = ok[None, :]
        if WINDOWED:
            seen = seen & (cached_len + qi[:, None] - pos[None, :] < window)
        if KV_BITS == 16:
            k = tl.load(tok[:, None] + dims[None, :], mask=ok[:, None], other=0.0).to(tl.float16)
            v = tl.load(tok[:, None] + D + dims[None, :], mask=ok[:, None], other=0.0).to(tl.float16)
            s = tl.dot(q, tl.trans(k))
            if SOFTCAP:
                s = _soft_cap(s, softcap)
            s = tl.where(seen, s, float("-inf"))
            m_i, l_i, acc = _softmax_step(s, v, 1.0, m_i, l_i, acc, False)
        else:
            k = _decode_unit(tok, ok, e8p_ptr, res8_ptr, k_step2, K_BITS, D).to(tl.float16)
            v = _decode_unit(tok + V_OFF, ok, e8p_ptr, res8_ptr, v_step2, V_BITS, D).to(tl.float16)
            s = tl.dot(q, tl.trans(k)) * _load_fp16_scale(tok + KS_OFF, ok)[None, :]
            if SOFTCAP:
                s = _soft_cap(s, softcap)
            s = tl.where(seen, s, float("-inf"))
            m_i, l_i, acc = _softmax_step(s, v, _load_fp16_scale(tok + VS_OFF, ok), m_i, l_i, acc, True)

    # (b) the request's new raw tokens, causally: keys up to the tile's last query token (with WINDOWED, from the
    # tile's first row's window)
    hi = tl.minimum(q_len, tile_start + Q_PER_TILE)
    lo = 0
    if WINDOWED:
        lo = tl.maximum(tile_start - window + 1, 0)
    for j0 in range(lo, hi, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        j_ok = j < hi
        row = q_start + j
        k_off = (row * stride_kt + kvh * stride_kh)[:, None] + dims[None, :]
        v_off = (row * stride_vt + kvh * stride_vh)[:, None] + dims[None, :]
        k = tl.load(k_ptr + k_off, mask=j_ok[:, None], other=0.0).to(tl.float16)
        v = tl.load(v_ptr + v_off, mask=j_ok[:, None], other=0.0).to(tl.float16)
        causal = j_ok[None, :] & (j[None, :] <= qi[:, None])
        if WINDOWED:
            causal = causal & (qi[:, None] - j[None, :] < window)
        s = tl.dot(q, tl.trans(k))
        if SOFTCAP:
            s = _soft_cap(s, softcap)
        s = tl.where(causal, s, float("-inf"))
        m_i, l_i, acc = _softmax_step(s, v, 1.0, m_i, l_i, acc, False)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + q_rows[:, None] * D + dims[None, :], out, mask=row_ok[:, None])


def prefill_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    fmt: KVFormat | None,
    *,
    out: torch.Tensor | None = None,
    rotated: bool = False,
    max_query_len: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of a varlen batch of new query tokens over their requests' cached pages plus their own raw K/V.

    Args:
      query: ``[T, Hq, D]`` any float dtype; the original domain unless ``rotated``.
      key, value: ``[T, Hk, D]`` this step's raw K/V (same domain as ``query``), attended causally.
      kv_cache: ``[num_blocks, Hk, block_size, fmt.slot_bytes]`` uint8 (E8) or, with ``fmt=None``,
        ``[num_blocks, Hk, block_size, 2*D]`` bf16/fp16 ``[K | V]``; any strides with a contiguous last dim.
      block_table: int32 ``[R, max_blocks]``; entry 0 (null block) is masked, never read.
      query_start_loc: int32 ``[R + 1]``, request r's rows are ``[query_start_loc[r], query_start_loc[r+1])``.
      seq_lens: int32 ``[R]``, cached + new tokens per request (device tensors; never read on the host).
      scale: softmax scale. fmt: the E8 format of the pages, or ``None`` for bf16/fp16 pages.
      out: optional ``[T, Hq, D]`` output buffer (any float dtype); rows past ``query_start_loc[R]`` are zeroed.
      rotated: query, key, value are already ``x @ R`` and the output stays rotated (implied for bf16 pages).
      max_query_len: the longest query of the batch (host int); without it ``query_start_loc`` is read (a sync).
      block_m: rows per program, query tokens x GQA group (default ``launch.prefill``; power of two >= 16, raised
        to the group).
      block_n: context and new tokens per tile (default ``launch.prefill``; power of two >= 16).
      window: a sliding-window layer's window: the query at position p sees the key positions k with
        ``p - k < window`` only (a tile's loops start at its first row's window).
      softcap: logit soft-capping: each scaled score s becomes ``softcap * tanh(s / softcap)``.
    Returns ``out`` (``[T, Hq, D]``, dtype of ``query`` if ``out`` is None).
    """
    num_tokens, num_q_heads, head_dim = query.shape
    num_kv_heads, page = kv_cache.shape[1], kv_cache.shape[2]
    check_paged_inputs(query, kv_cache, fmt, head_dim)
    if key.shape != (num_tokens, num_kv_heads, head_dim) or value.shape != key.shape:
        raise ValueError(f"key/value must be [{num_tokens}, {num_kv_heads}, {head_dim}], got "
                         f"{tuple(key.shape)} and {tuple(value.shape)}")
    num_reqs = seq_lens.shape[0]
    if num_tokens == 0 or num_reqs == 0:
        return out if out is not None else torch.empty_like(query)
    group = num_q_heads // num_kv_heads
    params = launch.prefill(head_dim)
    block_m = max(block_m or params.block_m, MIN_DOT_ROWS, triton.next_power_of_2(group))
    block_n = block_n or params.block_n
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    device = query.device
    rotated = rotated or fmt is None  # bf16 pages are read in the domain they were stored in
    rot = rotation_matrix(head_dim, device)
    q_rot = query.float() if rotated else query.float() @ rot
    k_rot, v_rot = (_new_kv(x, rot, rotated) for x in (key, value))
    out_rot = torch.zeros(num_tokens, num_q_heads, head_dim, dtype=torch.float32, device=device)
    k_bits, v_bits = (fmt.k_bits, fmt.v_bits) if fmt is not None else (2, 2)
    grid = (triton.cdiv(max_query_len, block_m // group), num_kv_heads, num_reqs)
    _prefill_kernel[grid](
        q_rot.contiguous(), k_rot, v_rot, k_rot.stride(0), k_rot.stride(1), v_rot.stride(0), v_rot.stride(1), out_rot,
        kv_cache, kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        block_table, block_table.stride(0), query_start_loc, seq_lens, window or 0,
        e8p_packed_table(device), res8_flat_table(device),
        scale * LOG2E, (softcap or 1.0) * LOG2E, stage2_step(k_bits), stage2_step(v_bits),
        GROUP_SIZE=group, BLOCK_M=block_m, D=head_dim, BLOCK_N=block_n,
        PAGE=page, KV_BITS=16 if fmt is None else 0, K_BITS=k_bits, V_BITS=v_bits,
        V_OFF=fmt.k_code_bytes if fmt else 0, KS_OFF=fmt.k_scale_offset if fmt else 0,
        VS_OFF=fmt.v_scale_offset if fmt else 0, WINDOWED=window is not None, SOFTCAP=softcap is not None,
        **params.kwargs(),
    )
    result = out_rot if rotated else out_rot @ rot.T
    if out is None:
        return result.to(query.dtype)
    out.copy_(result)
    return out


def _new_kv(x: torch.Tensor, rot: torch.Tensor, rotated: bool) -> torch.Tensor:
    """Raw K or V in the kernel's domain: read in place if already rotated (any token/head strides), else rotated
    once into fp16, the dtype of the kernel's dots."""
    if not rotated:
        return (x.float() @ rot).half()
    return x if x.stride(-1) == 1 else x.contiguous()


__all__ = ["prefill_attention"]
