"""Paged decode attention (split-KV, "flash-decoding") that reads E8-packed pages and decodes codes in registers.

One query token per sequence attends to the first ``seq_lens[s]`` tokens of its pages. Design:

* **Rotated domain.** Stored vectors are ``x @ R`` (``codec/rotation.py``). :func:`decode_attention` rotates the
  query once (``q·k = (qR)·(kR)``), the kernels accumulate ``P·(vR)``, and the output is un-rotated once per row
  (two small cuBLAS GEMMs in torch). Keys are never inverse-rotated. ``rotated=True`` skips both rotations.
* **Codes decoded in registers.** A tile of ``BLOCK_N`` tokens loads, per token, its stage-1 uint16 E8P indices
  (``[BLOCK_N, G]`` with G = head_dim/8 groups), looks the 8-bit pattern up in a 1 KiB packed table
  (``tables.e8p_packed_table``: 2-bit digits + parity), and expands the 8 coordinates with shifts: magnitude
  ``digit + 1/2``, signs from index bits 8-14, the 8th sign from the parity of those bits XOR the pattern parity,
  shift ``±1/4`` from bit 15. Stage 2 adds ``RES8[idx8] * 0.46`` (3 bits) or another E8P point ``* 0.25``
  (4 bits); the steps come from ``codec.quantizer.STAGES``. The decoded tile holds *unit-scale* codewords.
* **Scales folded.** Per-token fp16 scales multiply the scores (``s = (q·k_unit) * k_scale``) and the
  probabilities (``P * v_scale`` before ``P·V_unit``): the scaled K/V are never formed.
* **GQA.** One program owns one KV head of one sequence and all ``group = Hq/Hk`` query heads that share it, as the
  M dimension of ``tl.dot`` (padded to 16 rows, the tensor-core minimum). KV is read once per group.
* **Holes.** Block-table entry 0 is vLLM's null block (evicted holes): such tokens are masked with ``-inf`` and
  their loads are masked off, so block 0 is never read. A sequence with no readable token yields zeros.
* **Split-KV.** Grid ``(num_seqs, num_kv_heads, num_splits)``; each split writes an unnormalized partial
  (max, sum, acc) in base-2 exponent units; :func:`_combine_kernel` merges the splits. An optional raw (unquantized)
  current-token K/V is merged as one extra partial, which is what vLLM's decode step attends to besides the pages.
* **bf16 pages.** ``KV_BITS == 16`` reads an unquantized cache ``[num_blocks, Hk, block_size, 2*head_dim]`` with
  ``[K | V]`` per row (the backend's layout for protected layers); it is also the bf16 baseline of the benchmark.

Limits: head_dim a power of two in 16..256 (``tl.arange``); q must fit fp16 after rotation and softmax scaling
(|q·R·scale| < 65504), because the dots run on fp16 tensor cores.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nexusquant_vllm.attention.paged import NULL_BLOCK_ID
from nexusquant_vllm.codec.format import KVFormat
from nexusquant_vllm.codec.rotation import rotation_matrix
from nexusquant_vllm.kernels import launch
from nexusquant_vllm.kernels.e8_decode import _decode_unit, _load_fp16_scale, check_paged_inputs
from nexusquant_vllm.kernels.tables import e8p_packed_table, res8_flat_table, stage2_step

LOG2E = 1.4426950408889634
NULL_BLOCK: tl.constexpr = tl.constexpr(NULL_BLOCK_ID)  # vLLM's null block, as the kernels see it
MIN_DOT_ROWS = 16  # tl.dot needs M >= 16


@triton.jit
def _soft_cap(s, cap):
    """``cap * tanh(s / cap)`` (logit soft-capping), in whatever units ``s`` and ``cap`` share (tl has no tanh)."""
    return cap - 2.0 * cap / (tl.exp(2.0 * s / cap) + 1.0)


@triton.jit
def _split_kernel(
    q_ptr,  # float32 [S, Hq, D], rotated, contiguous
    cache_ptr,  # uint8 (E8) or bf16/fp16 (KV_BITS == 16) pages
    stride_cb, stride_ch, stride_ct,  # cache strides in elements (block, kv head, token)
    block_table_ptr, stride_bt,
    seq_lens_ptr,
    window,  # sliding window (keys at positions >= seq_len - window + 1), 0: none
    e8p_ptr, res8_ptr,
    part_acc_ptr,  # float32 [S, Hq, P, D]
    part_ml_ptr,  # float32 [S, Hq, P, 2]
    qk_scale,  # softmax scale * log2(e)
    softcap,  # logit soft-capping * log2(e), with SOFTCAP
    k_step2, v_step2,
    num_parts, num_splits,
    GROUP_SIZE: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr,  # tokens per page (block_size)
    KV_BITS: tl.constexpr, K_BITS: tl.constexpr, V_BITS: tl.constexpr,
    V_OFF: tl.constexpr, KS_OFF: tl.constexpr, VS_OFF: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    num_q_heads = tl.num_programs(1) * GROUP_SIZE

    rows = tl.arange(0, BLOCK_G)
    row_ok = rows < GROUP_SIZE
    heads = kvh * GROUP_SIZE + rows
    dims = tl.arange(0, D)
    q = tl.load(q_ptr + (seq * num_q_heads + heads)[:, None] * D + dims[None, :], mask=row_ok[:, None], other=0.0)
    q = (q * qk_scale).to(tl.float16)

    seq_len = tl.load(seq_lens_ptr + seq)
    lo = tl.where(window > 0, tl.maximum(seq_len - window + 1, 0), 0)  # the query sits at position seq_len
    per_split = tl.cdiv(tl.cdiv(seq_len - lo, num_splits), BLOCK_N) * BLOCK_N
    start = lo + split * per_split
    end = tl.minimum(start + per_split, seq_len)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    for t0 in range(start, end, BLOCK_N):
        pos = t0 + tl.arange(0, BLOCK_N)
        in_seq = pos < end
        block = tl.load(block_table_ptr + seq * stride_bt + pos // PAGE, mask=in_seq, other=0)
        ok = in_seq & (block != NULL_BLOCK)  # vLLM's null block: masked, never read
        tok = cache_ptr + block.to(tl.int64) * stride_cb + kvh * stride_ch + (pos % PAGE) * stride_ct
        if KV_BITS == 16:
            k = tl.load(tok[:, None] + dims[None, :], mask=ok[:, None], other=0.0).to(tl.float16)
            v = tl.load(tok[:, None] + D + dims[None, :], mask=ok[:, None], other=0.0).to(tl.float16)
            s = tl.dot(q, tl.trans(k))
        else:
            k = _decode_unit(tok, ok, e8p_ptr, res8_ptr, k_step2, K_BITS, D).to(tl.float16)
            v = _decode_unit(tok + V_OFF, ok, e8p_ptr, res8_ptr, v_step2, V_BITS, D).to(tl.float16)
            s = tl.dot(q, tl.trans(k)) * _load_fp16_scale(tok + KS_OFF, ok)[None, :]
        if SOFTCAP:
            s = _soft_cap(s, softcap)
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if KV_BITS != 16:
            p = p * _load_fp16_scale(tok + VS_OFF, ok)[None, :]
        acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), v)
        m_i = m_new

    part = (seq * num_q_heads + heads) * num_parts + split
    tl.store(part_acc_ptr + part[:, None] * D + dims[None, :], acc, mask=row_ok[:, None])
    tl.store(part_ml_ptr + part * 2, m_i, mask=row_ok)
    tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _combine_kernel(part_acc_ptr, part_ml_ptr, out_ptr, num_parts, D: tl.constexpr, BLOCK_P: tl.constexpr):
    """Merge the partials of one (sequence, query head): ``out = sum_i 2^(m_i - m) acc_i / sum_i 2^(m_i - m) l_i``."""
    row = tl.program_id(0)  # seq * Hq + head
    parts = tl.arange(0, BLOCK_P)
    ok = parts < num_parts
    dims = tl.arange(0, D)
    m = tl.load(part_ml_ptr + (row * num_parts + parts) * 2, mask=ok, other=float("-inf"))
    l = tl.load(part_ml_ptr + (row * num_parts + parts) * 2 + 1, mask=ok, other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_max)
    acc = tl.load(part_acc_ptr + (row * num_parts + parts)[:, None] * D + dims[None, :], mask=ok[:, None], other=0.0)
    total = tl.sum(w * l, 0)
    out = tl.sum(w[:, None] * acc, 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + row * D + dims, out)


def default_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, block_n: int) -> int:
    """Enough programs to fill a GPU (~2 waves of 132 SMs) without splits shorter than 4 tiles."""
    programs = max(1, num_seqs * num_kv_heads)
    return max(1, min(triton.cdiv(264, programs), triton.cdiv(max_seq_len, 4 * block_n)))


def decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    fmt: KVFormat | None,
    *,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    rotated: bool = False,
    num_splits: int | None = None,
    max_seq_len: int | None = None,
    block_n: int | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Decode attention of one query token per sequence over its paged KV cache.

    Args:
      q: ``[num_seqs, Hq, D]`` any float dtype; the original domain unless ``rotated``.
      kv_cache: ``[num_blocks, Hk, block_size, fmt.slot_bytes]`` uint8 (E8) or, with ``fmt=None``,
        ``[num_blocks, Hk, block_size, 2*D]`` bf16/fp16 ``[K | V]``; any strides with a contiguous last dim.
      block_table: int32 ``[num_seqs, max_blocks]``; entry 0 (null block) is masked, never read.
      seq_lens: int32 ``[num_seqs]``, cached tokens to attend to (device tensor; never read on the host).
      scale: softmax scale. fmt: the E8 format of the pages, or ``None`` for bf16/fp16 pages.
      k_new, v_new: optional raw ``[num_seqs, Hk, D]`` K/V of the current token (same domain as ``q``), attended
        in addition to the pages (vLLM's decode step attends to the raw current token, as the torch backend does).
      out: optional ``[num_seqs, Hq, D]`` output buffer (any float dtype).
      rotated: q, k_new, v_new are already ``x @ R`` and the output stays rotated (implied for bf16 pages, which
        are used in whatever domain they were stored in).
      num_splits: split-KV factor; pass a fixed value when capturing CUDA graphs (the default depends on
        ``max_seq_len``, a host int; without it, ``seq_lens.max()`` is read, which synchronizes).
      block_n: tokens per tile (default 32; power of two >= 16).
      window: a sliding-window layer's window: the query, at position ``seq_lens[s]``, sees the cached positions
        ``>= seq_lens[s] - window + 1`` only (the splits cover just those).
      softcap: logit soft-capping: each scaled score s becomes ``softcap * tanh(s / softcap)``.
    Returns ``out`` (``[num_seqs, Hq, D]``, dtype of ``q`` if ``out`` is None).
    """
    num_seqs, num_q_heads, head_dim = q.shape
    num_kv_heads, page = kv_cache.shape[1], kv_cache.shape[2]
    check_paged_inputs(q, kv_cache, fmt, head_dim)
    if num_seqs == 0:
        return out if out is not None else torch.empty_like(q)
    group = num_q_heads // num_kv_heads
    block_n = block_n or 32
    if num_splits is None:
        max_len = max_seq_len if max_seq_len is not None else int(seq_lens.max())
        num_splits = default_num_splits(num_seqs, num_kv_heads, min(max_len, window or max_len), block_n)
    device = q.device
    rotated = rotated or fmt is None  # bf16 pages are read in the domain they were stored in
    rot = rotation_matrix(head_dim, device)
    q_rot = q.float() if rotated else q.float() @ rot
    num_parts = num_splits + (k_new is not None)
    part_acc = torch.empty(num_seqs, num_q_heads, num_parts, head_dim, dtype=torch.float32, device=device)
    part_ml = torch.empty(num_seqs, num_q_heads, num_parts, 2, dtype=torch.float32, device=device)
    if k_new is not None:
        _raw_token_partial(q_rot, k_new, v_new, rot, rotated, scale, softcap, group, part_acc[:, :, -1],
                           part_ml[:, :, -1])
    k_bits, v_bits = (fmt.k_bits, fmt.v_bits) if fmt is not None else (2, 2)
    _split_kernel[(num_seqs, num_kv_heads, num_splits)](
        q_rot.contiguous(), kv_cache, kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        block_table, block_table.stride(0), seq_lens, window or 0,
        e8p_packed_table(device), res8_flat_table(device),
        part_acc, part_ml, scale * LOG2E, (softcap or 1.0) * LOG2E, stage2_step(k_bits), stage2_step(v_bits),
        num_parts, num_splits,
        GROUP_SIZE=group, BLOCK_G=max(MIN_DOT_ROWS, triton.next_power_of_2(group)), D=head_dim, BLOCK_N=block_n,
        PAGE=page, KV_BITS=16 if fmt is None else 0, K_BITS=k_bits, V_BITS=v_bits,
        V_OFF=fmt.k_code_bytes if fmt else 0, KS_OFF=fmt.k_scale_offset if fmt else 0,
        VS_OFF=fmt.v_scale_offset if fmt else 0, SOFTCAP=softcap is not None, **launch.decode(head_dim).kwargs(),
    )
    out_rot = torch.empty(num_seqs, num_q_heads, head_dim, dtype=torch.float32, device=device)
    _combine_kernel[(num_seqs * num_q_heads,)](
        part_acc, part_ml, out_rot, num_parts, D=head_dim, BLOCK_P=triton.next_power_of_2(num_parts)
    )
    result = out_rot if rotated else out_rot @ rot.T
    if out is None:
        return result.to(q.dtype)
    out.copy_(result)
    return out


def _raw_token_partial(q_rot, k_new, v_new, rot, rotated, scale, softcap, group, acc, ml) -> None:
    """The current token's raw K/V as one more split partial: m = score (base 2), l = 1, acc = v."""
    k = k_new.float() if rotated else k_new.float() @ rot
    v = v_new.float() if rotated else v_new.float() @ rot
    k = k.repeat_interleave(group, dim=1)
    score = (q_rot * k).sum(-1) * scale
    if softcap is not None:
        score = softcap * torch.tanh(score / softcap)
    ml[..., 0] = score * LOG2E
    ml[..., 1] = 1.0
    acc.copy_(v.repeat_interleave(group, dim=1))


__all__ = ["decode_attention", "default_num_splits"]
