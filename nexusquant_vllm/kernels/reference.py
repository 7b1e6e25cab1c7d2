"""Plain torch references of the kernels, built on the codec (the definition of what the kernels must compute).

Written for clarity, not speed: a Python loop over sequences, full dequantization of the pages a sequence uses.
"""

from __future__ import annotations

import torch

from nexusquant_vllm.codec.format import KVFormat
from nexusquant_vllm.codec.kv import decode_kv_rotated, encode_kv
from nexusquant_vllm.codec.rotation import rotation_matrix

NULL_BLOCK_ID = 0


def _pages_rotated(kv_cache: torch.Tensor, ids: torch.Tensor, fmt: KVFormat | None) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V of pages ``ids`` as float32 ``[Hk, n * block_size, D]`` in the rotated domain."""
    pages = kv_cache[ids].transpose(0, 1)  # [Hk, n, bs, W]
    if fmt is None:
        d = kv_cache.shape[-1] // 2
        k, v = pages[..., :d].float(), pages[..., d:].float()
    else:
        k, v = decode_kv_rotated(pages, fmt)
    return k.flatten(1, 2), v.flatten(1, 2)


def paged_decode_attention_ref(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    fmt: KVFormat | None,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference of :func:`nexusquant_vllm.kernels.decode_attention` (original domain in and out, float32).

    Same arguments. Tokens in block 0 (vLLM's null block) are excluded from the softmax; a sequence with nothing
    to attend to yields zeros. bf16 pages (``fmt=None``) are used in the domain they are stored in (no rotation).
    """
    num_seqs, num_q_heads, d = q.shape
    num_kv_heads, page = kv_cache.shape[1], kv_cache.shape[2]
    group = num_q_heads // num_kv_heads
    rot = rotation_matrix(d) if fmt is not None else torch.eye(d)
    out = torch.zeros(num_seqs, num_q_heads, d)
    for s in range(num_seqs):
        n = int(seq_lens[s])
        ids = block_table[s, : (n + page - 1) // page].long().cpu()
        k, v = _pages_rotated(kv_cache.cpu(), ids, fmt)
        valid = (ids != NULL_BLOCK_ID).repeat_interleave(page)[:n]
        k, v = k[:, :n][:, valid], v[:, :n][:, valid]  # [Hk, L, D]
        if k_new is not None:
            k = torch.cat([k, (k_new[s].float().cpu() @ rot)[:, None]], 1)
            v = torch.cat([v, (v_new[s].float().cpu() @ rot)[:, None]], 1)
        if k.shape[1] == 0:
            continue
        qs = (q[s].float().cpu() @ rot).view(num_kv_heads, group, d)
        p = torch.softmax(qs @ k.transpose(1, 2) * scale, -1)  # [Hk, g, L]
        out[s] = (p @ v).reshape(num_q_heads, d) @ rot.T
    return out


def prefill_attention_ref(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    fmt: KVFormat | None,
) -> torch.Tensor:
    """Reference of :func:`nexusquant_vllm.kernels.prefill_attention` (original domain in and out, float32).

    Same arguments. Request r's new tokens (rows ``query_start_loc[r]..[r+1]``) attend to its cached context, the
    first ``seq_lens[r] - q_len`` positions of its pages minus those in block 0 (vLLM's null block), and causally to
    its own raw ``key``/``value`` rows. Rows past the last request are zeros. bf16 pages (``fmt=None``) are used in
    the domain they are stored in (no rotation).
    """
    num_tokens, num_q_heads, d = query.shape
    num_kv_heads, page = kv_cache.shape[1], kv_cache.shape[2]
    group = num_q_heads // num_kv_heads
    rot = rotation_matrix(d) if fmt is not None else torch.eye(d)
    starts = query_start_loc.cpu().tolist()
    out = torch.zeros(num_tokens, num_q_heads, d)
    for r, n_ctx_new in enumerate(seq_lens.cpu().tolist()):
        rows = slice(starts[r], starts[r + 1])
        q_len = starts[r + 1] - starts[r]
        cached = n_ctx_new - q_len
        ids = block_table[r, : (cached + page - 1) // page].long().cpu()
        k_ctx, v_ctx = _pages_rotated(kv_cache.cpu(), ids, fmt)  # [Hk, n * page, D]
        valid = (ids != NULL_BLOCK_ID).repeat_interleave(page)[:cached]
        k_new = (key[rows].float().cpu() @ rot).transpose(0, 1)  # [Hk, q_len, D]
        v_new = (value[rows].float().cpu() @ rot).transpose(0, 1)
        k = torch.cat([k_ctx[:, :cached], k_new], 1)
        v = torch.cat([v_ctx[:, :cached], v_new], 1)
        causal = torch.ones(q_len, q_len, dtype=torch.bool).tril()
        allowed = torch.cat([valid.expand(q_len, cached), causal], 1)  # [q_len, cached + q_len]
        q = (query[rows].float().cpu() @ rot).view(q_len, num_kv_heads, group, d).permute(1, 2, 0, 3)
        s = (q @ k[:, None].transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))  # [Hk, g, q_len, L]
        o = torch.softmax(s, -1) @ v[:, None]  # [Hk, g, q_len, D]
        out[rows] = o.permute(2, 0, 1, 3).reshape(q_len, num_q_heads, d) @ rot.T
    return out


def store_kv_ref(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor, fmt: KVFormat | None
) -> None:
    """Reference of :func:`nexusquant_vllm.kernels.store_kv`: codec-encode and write rows ``slot_mapping >= 0``."""
    keep = slot_mapping >= 0
    key, value, slots = key[keep], value[keep], slot_mapping[keep].long()
    page = kv_cache.shape[2]
    rows = encode_kv(key, value, fmt) if fmt is not None else torch.cat([key, value], -1).to(kv_cache.dtype)
    kv_cache[slots // page, :, slots % page] = rows
