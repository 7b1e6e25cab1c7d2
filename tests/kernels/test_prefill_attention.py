"""Triton continuation-prefill attention against the torch reference (TRITON_INTERPRET=1 on CPU; tiny shapes).

One batch covers the cases vLLM's scheduler mixes: a chunk over a cached context with holes (null-block entries),
a first chunk (no context), a decode row, a request whose whole context is holes, and padding rows past the last
request; with small tiles, requests span several query tiles and several causal key tiles.
"""

import pytest
import torch

from nexusquant_vllm.codec import E8_DTYPES, get_format, rotate, unrotate
from nexusquant_vllm.kernels import prefill_attention, prefill_attention_ref

RTOL = 1e-2
NUM_BLOCKS = 9
CACHED = [40, 0, 23, 32]  # tokens of context per request
Q_LENS = [13, 20, 1, 6]
TABLE = torch.tensor([[1, 0, 3, 8], [0, 0, 0, 0], [4, 5, 0, 0], [0, 0, 0, 0]], dtype=torch.int32)
PADDING = 2  # rows after the last request (vLLM pads the token batch)


def make_cache(name, num_kv_heads, block_size, head_dim, gen):
    """A random paged cache ``[NUM_BLOCKS, Hk, block_size, W]``: E8 slots of random codes (every index is a
    codeword) and random fp16 scales in [0.5, 2) (the encoder is too slow for the interpreter's time budget and
    the kernel only decodes), or bf16 ``[K | V]`` rows when name is None."""
    shape = (NUM_BLOCKS, num_kv_heads, block_size)
    if name is None:
        return torch.randn(*shape, 2 * head_dim, generator=gen).to(torch.bfloat16), None
    fmt = get_format(name, head_dim)
    codes = torch.randint(0, 256, (*shape, fmt.k_scale_offset), dtype=torch.uint8, generator=gen)
    scales = (0.5 + 1.5 * torch.rand(*shape, 2, generator=gen)).half().view(torch.uint8)
    return torch.cat([codes, scales], -1), fmt


def make_batch(num_q_heads, num_kv_heads, head_dim, gen, cached=CACHED, q_lens=Q_LENS):
    """Query, raw K/V ``[T, H, D]``, ``query_start_loc`` and ``seq_lens`` of a varlen batch."""
    starts = torch.tensor([0, *q_lens]).cumsum(0).to(torch.int32)
    seq_lens = torch.tensor([c + n for c, n in zip(cached, q_lens)], dtype=torch.int32)
    num_tokens = int(starts[-1]) + PADDING
    q = torch.randn(num_tokens, num_q_heads, head_dim, generator=gen)
    k, v = torch.randn(2, num_tokens, num_kv_heads, head_dim, generator=gen)
    return q, k, v, starts, seq_lens


def rel_err(out, ref):
    return float((out.float().cpu() - ref).abs().max() / ref.abs().max().clamp_min(1e-6))


def run_both(device, q, k, v, cache, fmt, table, starts, seq_lens, **kw):
    scale = q.shape[-1] ** -0.5
    ref = prefill_attention_ref(q, k, v, cache, table, starts, seq_lens, scale, fmt)
    out = prefill_attention(*(t.to(device) for t in (q, k, v, cache, table, starts, seq_lens)), scale, fmt, **kw)
    return out, ref


@pytest.mark.parametrize("name", [*E8_DTYPES, None])
def test_matches_reference_every_dtype(device, name):
    """Every e8 dtype and bf16 pages; head_dim 32, 2 KV heads, GQA 2, pages of 16, the default tiles."""
    gen = torch.Generator().manual_seed(0)
    cache, fmt = make_cache(name, 2, 16, 32, gen)
    q, k, v, starts, seq_lens = make_batch(4, 2, 32, gen)
    out, ref = run_both(device, q, k, v, cache, fmt, TABLE, starts, seq_lens)
    assert rel_err(out, ref) < RTOL
    assert torch.equal(out[-PADDING:].cpu(), torch.zeros_like(out[-PADDING:].cpu()))


@pytest.mark.parametrize("name,head_dim,heads,block_size,tiles", [
    ("e8-k3v2", 16, (1, 1), 16, {}),
    ("e8-k4v2", 64, (4, 1), 32, {}),
    # GQA 3 (SmolLM2's group) in rows of 16: 5 query tokens per tile, several query and key tiles per request
    ("e8-k2v2", 32, (6, 2), 16, dict(block_m=16, block_n=16)),
    (None, 64, (8, 2), 32, {}),
])
def test_matches_reference_shapes(device, name, head_dim, heads, block_size, tiles):
    gen = torch.Generator().manual_seed(1)
    cache, fmt = make_cache(name, heads[1], block_size, head_dim, gen)
    q, k, v, starts, seq_lens = make_batch(*heads, head_dim, gen)
    out, ref = run_both(device, q, k, v, cache, fmt, TABLE, starts, seq_lens, max_query_len=max(Q_LENS), **tiles)
    assert rel_err(out, ref) < RTOL


def test_null_block_is_never_read(device):
    """Garbage in block 0, NaN scales included, changes nothing: holes are masked and their loads masked off."""
    gen = torch.Generator().manual_seed(2)
    cache, fmt = make_cache("e8-k3v3", 2, 16, 32, gen)
    q, k, v, starts, seq_lens = make_batch(4, 2, 32, gen)
    out, _ = run_both(device, q, k, v, cache, fmt, TABLE, starts, seq_lens)
    cache[0] = torch.randint(0, 256, cache[0].shape, dtype=torch.uint8, generator=gen)
    cache[0, ..., fmt.k_scale_offset:] = 0xFF  # NaN fp16 scales: any read would poison the output
    garbage, _ = run_both(device, q, k, v, cache, fmt, TABLE, starts, seq_lens)
    assert torch.equal(out, garbage)


def test_strided_cache_and_raw_kv_into_out_buffer(device):
    """A token-major cache viewed head-major, K/V as views of one fused qkv tensor, and a given ``out`` buffer."""
    gen = torch.Generator().manual_seed(3)
    cache, fmt = make_cache("e8-k3v2", 2, 16, 32, gen)
    q, k, v, starts, seq_lens = make_batch(4, 2, 32, gen)
    ref = prefill_attention_ref(q, k, v, cache, TABLE, starts, seq_lens, 32**-0.5, fmt)
    strided = cache.transpose(1, 2).contiguous().transpose(1, 2).to(device)  # [nb, Hk, bs, W] view of [nb, bs, Hk, W]
    for rotated in (False, True):  # rotated: the kernel reads the K/V views in place
        qkv = torch.cat([rotate(x) if rotated else x for x in (q, k, v)], 1).to(device)  # [T, Hq + 2 Hk, D]
        views = qkv.split([4, 2, 2], 1)
        out = torch.full(q.shape, float("nan"), dtype=torch.bfloat16, device=device)
        prefill_attention(*views, strided, TABLE.to(device), starts.to(device), seq_lens.to(device), 32**-0.5, fmt,
                          out=out, rotated=rotated)
        assert not strided.is_contiguous() and not views[1].is_contiguous()
        assert rel_err(unrotate(out.float()) if rotated else out, ref) < RTOL
