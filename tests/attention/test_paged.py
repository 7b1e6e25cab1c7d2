"""The one torch paged attention (``attention/paged.py``) against a naive per-request reference (no engine, fast)."""

import pytest
import torch

from nexusquant_vllm.attention.native_cpu import prefill_rows
from nexusquant_vllm.attention.pages import DensePages
from nexusquant_vllm.attention.paged import NULL_BLOCK_ID, attend, plan_groups

H_KV, G, D, BS = 2, 3, 16, 4


def _reference(q, k_ctx, v_ctx, k_new, v_new, ctx_keep, scale, window=None, softcap=None):
    """One request: q [Q, Hq, D]; context [L, Hk, D] with keep-mask [L]; new tokens [Q, Hk, D], causal (None: the
    context alone; nothing to attend to gives zeros); ``window``: query i (position L + i) sees positions p with
    L + i - p < window only; ``softcap``: scores s -> softcap * tanh(s / softcap)."""
    outs = []
    length = k_ctx.shape[0]
    for i in range(q.shape[0]):
        first = 0 if window is None else max(length + i - window + 1, 0)  # the first position query i sees
        keep = ctx_keep & (torch.arange(length) >= first)
        k, v = k_ctx[keep], v_ctx[keep]
        if k_new is not None:
            lo = max(first - length, 0)
            k, v = torch.cat([k, k_new[lo : i + 1]]), torch.cat([v, v_new[lo : i + 1]])
        if k.shape[0] == 0:
            outs.append(torch.zeros_like(q[i]))
            continue
        k = k.repeat_interleave(G, dim=1)  # [L, Hq, D]
        v = v.repeat_interleave(G, dim=1)
        s = torch.einsum("hd,lhd->hl", q[i], k) * scale
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        outs.append(torch.einsum("hl,lhd->hd", s.softmax(-1), v))
    return torch.stack(outs)


@pytest.mark.parametrize("window, softcap", [(None, None), (1, None), (3, None), (6, None), (None, 0.7), (3, 0.7)],
                         ids=["full", "window-1", "window-3", "window-6", "softcap", "window-3-softcap"])
@pytest.mark.parametrize("query_tile", [128, 2], ids=["one-tile", "tiles-of-2"])
@pytest.mark.parametrize("raw_tokens", [True, False], ids=["with-raw-kv", "context-only"])
@pytest.mark.parametrize("q_lens,cached_lens", [([1, 1, 1], [5, 0, 9]), ([3, 1, 6, 2], [0, 7, 4, 10])])
def test_attend_matches_reference_with_null_block_holes(q_lens, cached_lens, raw_tokens, query_tile, window, softcap):
    torch.manual_seed(0)
    num_blocks = 40
    pages = torch.randn(num_blocks, H_KV, BS, 2 * D)
    pages[NULL_BLOCK_ID] = float("nan")  # the null block must never be read (0 * nan = nan would show)
    max_blocks = 6
    perm = torch.randperm(num_blocks - 1)[: len(q_lens) * max_blocks] + 1
    block_table = perm.view(len(q_lens), max_blocks).clone()
    block_table[-1, 1] = NULL_BLOCK_ID  # an eviction hole in the last request's cached context

    seq_lens = torch.tensor([c + q for c, q in zip(cached_lens, q_lens)])
    qsl = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)))
    t = int(qsl[-1])
    query = torch.randn(t, H_KV * G, D)
    key = torch.randn(t, H_KV, D)
    value = torch.randn(t, H_KV, D)
    scale = D**-0.5

    if not raw_tokens:
        key = value = None
    out = torch.full((t, H_KV * G, D), float("nan"))
    attend(query, key, value, plan_groups(qsl, seq_lens, block_table, BS), DensePages(D).reader(pages), scale, out,
           query_tile, window, softcap)

    for r, (c, ql) in enumerate(zip(cached_lens, q_lens)):
        s, e = int(qsl[r]), int(qsl[r + 1])
        n_blk = (c + BS - 1) // BS
        ctx = pages[block_table[r, :n_blk]].permute(0, 2, 1, 3).reshape(-1, H_KV, 2 * D)[:c]
        keep = (block_table[r, :n_blk] != NULL_BLOCK_ID).repeat_interleave(BS)[:c]
        new = (key[s:e], value[s:e]) if raw_tokens else (None, None)
        ref = _reference(query[s:e], ctx[..., :D], ctx[..., D:], *new, keep, scale, window, softcap)
        torch.testing.assert_close(out[s:e], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 2, 5], ids=["full", "window-2", "window-5"])
@pytest.mark.parametrize("q_lens,cached_lens", [([3, 6, 2, 5], [0, 7, 4, 10]), ([9, 2], [13, 0])])
def test_native_prefill_rows_match_attend(q_lens, cached_lens, window):
    """The native CPU path's prefill rows (torch's flash kernel, merged by log-sum-exp) equal ``attend``: holes, a
    context that is all holes, a partial last block whose stale tail is NaN, first chunks and continuation chunks,
    sliding windows that leave some queries no cached position."""
    torch.manual_seed(1)
    pages = torch.randn(40, H_KV, BS, 2 * D)
    pages[NULL_BLOCK_ID] = float("nan")
    block_table = (torch.randperm(39)[: len(q_lens) * 6] + 1).view(len(q_lens), 6)
    block_table[0, 0] = NULL_BLOCK_ID  # request 0 has no context: an unused hole
    block_table[-1, 1] = NULL_BLOCK_ID
    if cached_lens[1] == 7:
        block_table[1, :2] = NULL_BLOCK_ID  # all of request 1's context is a hole
    for r, c in enumerate(cached_lens):
        if c % BS:
            pages[block_table[r, c // BS], :, c % BS :] = float("nan")  # stale slots past the context
    seq_lens = torch.tensor([c + q for c, q in zip(cached_lens, q_lens)])
    qsl = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)))
    t = int(qsl[-1])
    query, key, value = torch.randn(t, H_KV * G, D), torch.randn(t, H_KV, D), torch.randn(t, H_KV, D)
    (grp,) = plan_groups(qsl, seq_lens, block_table, BS)
    reader = DensePages(D).reader(pages)
    want = attend(query, key, value, [grp], reader, D**-0.5, torch.zeros(t, H_KV * G, D), window=window)
    got = torch.full((t, H_KV * G, D), float("nan"))
    prefill_rows(query, key, value, grp, reader, D**-0.5, got, window)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
