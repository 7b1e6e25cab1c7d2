"""Vectorized torch attention over a paged KV cache plus the current step's raw K/V.

No vLLM import. The one torch implementation of paged attention: the torch path's attention, the native CPU path's
prefill rows and the reference of the Triton kernels (``kernels/reference.py``).

Every query token of a request attends to
  * the request's *cached* context, positions ``[0, cached_len)``, read from its pages through a ``read_pages``
    callback (E8 pages are dequantized there; only the blocks a request uses are read), and
  * the raw (never quantized) K/V of the tokens scheduled in this step, causally (unless ``key`` is None: then
    each query attends to its cached context only, as a decode kernel called without the current token's K/V).

Positions that live in vLLM's null block (block id 0, where eviction leaves holes) are masked with -inf, in every
layer. Requests are batched in at most two groups (single-token "decode" rows and multi-token "prefill" rows), each
padded to its longest query and context: no Python loop over requests, blocks or tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

NULL_BLOCK_ID = 0
QUERY_TILE = 64  # query positions per tile (measured: 2.5-3x faster than one tile on 1K-token chunks, CPU)

# read_pages(block_ids [n]) -> (k, v), each head-major [num_kv_heads, n, block_size, head_dim], float or bf16
PageReader = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class RequestGroup:
    """Padded index tensors for a group of requests attended together (built once per step, shared by layers)."""

    token_idx: torch.Tensor  # [R, Qmax] int64 rows of the flat token batch (padding repeats the first row)
    token_valid: torch.Tensor  # [R, Qmax] bool
    block_ids: torch.Tensor  # [R, Bmax] int64 physical blocks holding the cached context
    block_used: torch.Tensor  # [R, Bmax] bool: read this block (inside the cached context and not the null block)
    cached_len: torch.Tensor  # [R] int64 cached context positions per request
    mask: torch.Tensor  # [R, 1, Qmax, Bmax*block_size + Qmax] bool, True = attend
    all_blocks_used: bool  # every [R, Bmax] entry is read: no scatter into a padded buffer needed
    _windowed: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def num_ctx_blocks(self) -> int:
        return self.block_ids.shape[1]

    def mask_for(self, window: int | None) -> torch.Tensor:
        """``mask`` for a layer that attends over a sliding window of ``window`` positions (None: every position):
        query position p sees key positions k with ``p - k < window``, as vLLM's sliding-window layers do. Built once
        per window and step, shared by the layers of that window."""
        if window is None:
            return self.mask
        if window not in self._windowed:
            r, _, q_max, width = self.mask.shape
            ar_q = torch.arange(q_max, device=self.mask.device)
            ctx_len = width - q_max
            query_pos = self.cached_len[:, None] + ar_q[None, :]  # [R, Qmax]
            key_pos = torch.cat([torch.arange(ctx_len, device=self.mask.device).expand(r, ctx_len),
                                 self.cached_len[:, None] + ar_q[None, :]], dim=1)  # [R, L + Qmax]
            inside = query_pos[:, :, None] - key_pos[:, None, :] < window
            self._windowed[window] = self.mask & inside[:, None]
        return self._windowed[window]


def plan_groups(
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    block_size: int,
    device: torch.device | None = None,
) -> list[RequestGroup]:
    """Split a batch into a decode group (query length 1) and a prefill group (query length > 1).

    ``query_start_loc`` [R+1] and ``seq_lens`` [R] are host tensors; ``block_table`` [R, max_blocks].
    """
    device = device if device is not None else block_table.device
    qsl = query_start_loc.to("cpu", torch.int64)
    seq = seq_lens.to("cpu", torch.int64)
    num_reqs = seq.shape[0]
    q_len = qsl[1 : num_reqs + 1] - qsl[:num_reqs]
    cached = seq - q_len
    groups = []
    for sel in (q_len == 1, q_len > 1):
        rows = torch.nonzero(sel).flatten()
        if rows.numel() == 0:
            continue
        groups.append(
            _plan_group(qsl[rows], q_len[rows], cached[rows], block_table[rows.to(block_table.device)], block_size, device)
        )
    return groups


def _plan_group(start, q_len, cached, block_table, block_size, device) -> RequestGroup:
    num_reqs = start.shape[0]
    q_max = int(q_len.max())
    ar_q = torch.arange(q_max)
    token_valid = ar_q[None, :] < q_len[:, None]
    token_idx = torch.where(token_valid, start[:, None] + ar_q[None, :], start[:, None])

    n_blocks = (cached + block_size - 1) // block_size
    b_max = int(n_blocks.max())
    block_ids = block_table[:, :b_max].to("cpu", torch.int64)
    not_null = block_ids != NULL_BLOCK_ID
    block_used = (torch.arange(b_max)[None, :] < n_blocks[:, None]) & not_null
    pos = torch.arange(b_max * block_size)
    ctx_valid = (pos[None, :] < cached[:, None]) & not_null.repeat_interleave(block_size, dim=1)

    causal = (ar_q[None, :, None] >= ar_q[None, None, :]) & token_valid[:, None, :]  # [R, Qmax(query), Qmax(key)]
    mask = torch.cat([ctx_valid[:, None, :].expand(num_reqs, q_max, b_max * block_size), causal], dim=-1)
    return RequestGroup(
        token_idx=token_idx.to(device),
        token_valid=token_valid.to(device),
        block_ids=block_ids.to(device),
        block_used=block_used.to(device),
        cached_len=cached.to(device),
        mask=mask[:, None].to(device),
        all_blocks_used=bool(block_used.all()),
    )


def attend(
    query: torch.Tensor,
    key: torch.Tensor | None,
    value: torch.Tensor | None,
    groups: list[RequestGroup],
    read_pages: PageReader,
    scale: float,
    out: torch.Tensor,
    query_tile: int = QUERY_TILE,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention for every token of the batch; writes ``out`` [T, Hq, D] and returns it.

    ``query`` [T, Hq, D], ``key``/``value`` [T, Hk, D]: this step's raw tokens, in the same domain as the pages that
    ``read_pages`` returns (callers rotate both for E8 pages); ``key`` None: no raw tokens, each query attends to
    its cached context only (a row with nothing to attend to gets zeros). ``read_pages(ids)`` returns head-major
    ``[Hk, n, block_size, D]`` K and V. ``window``: a sliding-window layer's window (``RequestGroup.mask_for``);
    ``softcap``: logit soft-capping, each scaled score s becomes ``softcap * tanh(s / softcap)``. Computed in float32.

    Layout: head-major ``[Hk, R, ...]`` throughout, so that gathered pages are used as they come (no transpose
    copy), and the g = Hq/Hk query heads of one KV head are folded into the query axis (GQA without repeating K/V).
    The cached context and the raw new tokens are two blocks of one softmax (no concatenation of K/V). Queries go
    in tiles of ``query_tile`` positions: a tile scores the raw keys up to its own last position only (the causal
    mask's upper triangle is never computed, half the work of a first chunk) and its temporaries stay small.
    """
    num_heads, head_dim = query.shape[1], query.shape[2]
    for grp in groups:
        r, q_max = grp.token_idx.shape
        mask = grp.mask_for(window)
        context = _gather_context(grp, read_pages) if grp.num_ctx_blocks > 0 else None  # [Hk, R, L, D] each
        if key is None and context is None:
            out[grp.token_idx[grp.token_valid]] = 0
            continue
        num_kv_heads = key.shape[1] if key is not None else context[0].shape[0]
        g = num_heads // num_kv_heads
        # [R, Qmax, Hk, g, D] -> [Hk, R, g, Qmax, D]
        q = (query[grp.token_idx].float() * scale).view(r, q_max, num_kv_heads, g, head_dim).permute(2, 0, 3, 1, 4)
        if context is not None:
            k_ctx, v_ctx = context
            ctx_mask = mask[:, 0, :, : k_ctx.shape[2]]  # [R, Qmax, L]
            # masked by selection (masked_fill), never by a zero weight: a stale slot past a request's context (vLLM
            # does not clear reused blocks) may hold NaN, and 0 * NaN is NaN. Row 0 sees every position any row sees
            # (a later row's window only starts later).
            v_ctx = v_ctx.masked_fill(~ctx_mask[None, :, 0, :, None], 0.0)
        if key is not None:
            k_new = key[grp.token_idx].float().permute(2, 0, 1, 3)  # [Hk, R, Qmax, D]
            v_new = value[grp.token_idx].float().permute(2, 0, 1, 3)
            causal = mask[:, 0, :, -q_max:]  # [R, Qmax(query), Qmax(key)]
        for first in range(0, q_max, query_tile):
            last = min(first + query_tile, q_max)
            rows = slice(first, last)
            q_tile = q[:, :, :, rows].reshape(num_kv_heads, r, g * (last - first), head_dim)  # row = gi * T + i
            scores, values = [], []
            if context is not None:
                scores.append(_masked_scores(q_tile, k_ctx, ctx_mask[:, rows], g, softcap))
                values.append(v_ctx)
            if key is not None:
                scores.append(_masked_scores(q_tile, k_new[:, :, :last], causal[:, rows, :last], g, softcap))
                values.append(v_new[:, :, :last])
            p = torch.softmax(torch.cat(scores, dim=-1) if len(scores) > 1 else scores[0], dim=-1)
            if key is None:
                p = p.nan_to_num_(0.0)  # a row whose context is all holes (or outside its window)
            o, start = None, 0
            for v in values:
                part = torch.matmul(p[..., start : start + v.shape[2]], v)
                o, start = part if o is None else o + part, start + v.shape[2]
            # [Hk, R, g*T, D] -> [R, T, Hk, g, D] -> [R, T, Hq, D]
            o = o.view(num_kv_heads, r, g, last - first, head_dim).permute(1, 3, 0, 2, 4)
            valid = grp.token_valid[:, rows]
            out[grp.token_idx[:, rows][valid]] = o.reshape(r, last - first, num_heads, head_dim)[valid].to(out.dtype)
    return out


def _masked_scores(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, g: int, softcap: float | None = None
                   ) -> torch.Tensor:
    """``q`` ``[Hk, R, g*T, D]`` against ``k`` ``[Hk, R, L, D]``, soft-capped, -inf where ``mask`` ``[R, T, L]`` is
    False."""
    scores = torch.matmul(q, k.transpose(-1, -2))
    if softcap is not None:
        scores = scores.div_(softcap).tanh_().mul_(softcap)
    return scores.masked_fill_(~_fold(mask, g), float("-inf"))


def _fold(mask: torch.Tensor, g: int) -> torch.Tensor:
    """``[R, Qmax, L]`` -> ``[R, g*Qmax, L]``: the same mask for each of the g query heads of a KV head."""
    r, q_max, length = mask.shape
    return mask.unsqueeze(1).expand(r, g, q_max, length).reshape(r, g * q_max, length)


def _gather_context(grp: RequestGroup, read_pages: PageReader) -> tuple[torch.Tensor, torch.Tensor]:
    """Head-major ``[Hk, R, Bmax*block_size, D]`` K and V of the cached context, float32.

    Only the blocks in use are read; the others stay zero and are masked. The positions of a used block past the
    request's context are read as they are (possibly stale, possibly NaN) and masked by the caller.
    """
    r, b_max = grp.block_ids.shape
    k_pages, v_pages = read_pages(grp.block_ids[grp.block_used])  # [Hk, n, bs, D]
    num_kv_heads, _, block_size, head_dim = k_pages.shape
    k_pages, v_pages = k_pages.float(), v_pages.float()
    if grp.all_blocks_used:
        k, v = k_pages, v_pages
    else:
        k = k_pages.new_zeros(num_kv_heads, r, b_max, block_size, head_dim)
        v = torch.zeros_like(k)
        k[:, grp.block_used] = k_pages
        v[:, grp.block_used] = v_pages
    return (k.reshape(num_kv_heads, r, b_max * block_size, head_dim),
            v.reshape(num_kv_heads, r, b_max * block_size, head_dim))
