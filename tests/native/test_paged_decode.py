"""Native CPU paged decode attention (csrc/e8_decode_attention_cpu.cpp) against the torch path of the backend."""

from __future__ import annotations

import pytest
import torch

from nexusquant_vllm import codec
from nexusquant_vllm.native import paged_decode as native
from nexusquant_vllm.attention.pages import CodecPages, DensePages
from nexusquant_vllm.attention.paged import attend, plan_groups

NUM_KV_HEADS, NUM_BLOCKS = 2, 32


def test_library_is_built():
    assert native.available()


def _batch(head_dim: int, gqa: int, block_size: int):
    """Five decode rows: empty context, partial and whole blocks, and an evicted hole (the null block) mid-context."""
    cached = torch.tensor([0, 5, block_size, 2 * block_size + 5, 4 * block_size + 6])
    table = torch.randperm(NUM_BLOCKS - 1)[:25].add(1).view(5, 5)  # block 0 is the null block
    table[3, 1] = 0
    query = torch.randn(5, NUM_KV_HEADS * gqa, head_dim)
    key, value = torch.randn(2, 5, NUM_KV_HEADS, head_dim).unbind(0)
    return query, key, value, table, cached


def _torch_attend(query, key, value, table, cached, block_size, read_pages):
    expected = torch.empty_like(query)
    groups = plan_groups(torch.arange(6), cached + 1, table, block_size)
    attend(query, key, value, groups, read_pages, query.shape[-1] ** -0.5, expected)
    return expected


@pytest.mark.parametrize("dtype,head_dim,gqa,block_size", [("e8-k3v2", 64, 3, 16), ("e8-k2v2", 128, 1, 16),
                                                           ("e8-k4v4", 64, 4, 48), ("e8-k4v2", 32, 2, 128),
                                                           ("e8-k3v3", 8, 3, 32)])
def test_e8_pages_match_torch_attend(dtype, head_dim, gqa, block_size):
    """Block sizes below, between and above the kernel's 32-token chunk; head_dim 8 is one group."""
    torch.manual_seed(0)
    fmt = codec.get_format(dtype, head_dim)
    k, v = torch.randn(2, NUM_BLOCKS, NUM_KV_HEADS, block_size, head_dim).unbind(0)
    cache = codec.encode_kv(k, v, fmt)  # [num_blocks, Hk, bs, slot]
    query, key, value, table, cached = _batch(head_dim, gqa, block_size)
    expected = _torch_attend(query, key, value, table, cached, block_size, CodecPages(codec, fmt).reader(cache))
    got = native.decode_attention(query, key, value, cache, table, cached, head_dim**-0.5, fmt)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("page_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dense_pages_match_torch_attend(page_dtype):
    """The protected layers' [K | V] rows, in each model dtype the backend accepts."""
    torch.manual_seed(1)
    head_dim, gqa, block_size = 64, 3, 32
    pages = torch.randn(NUM_BLOCKS, NUM_KV_HEADS, block_size, 2 * head_dim).to(page_dtype)
    query, key, value, table, cached = _batch(head_dim, gqa, block_size)
    expected = _torch_attend(query, key, value, table, cached, block_size, DensePages(head_dim).reader(pages))
    got = native.decode_attention(query, key, value, pages, table, cached, head_dim**-0.5)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_extreme_scores_stay_finite():
    """Large score gaps (exp underflow in the kernel's vector exp) and a dominant current token."""
    torch.manual_seed(2)
    pages = torch.randn(NUM_BLOCKS, NUM_KV_HEADS, 32, 128) * 30
    query, key, value, table, cached = _batch(64, 1, 32)
    query, key = query * 30, key * 30
    expected = _torch_attend(query, key, value, table, cached, 32, DensePages(64).reader(pages))
    got = native.decode_attention(query, key, value, pages, table, cached, 64**-0.5)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_strided_cache_view():
    """The backend passes vLLM's cache tensor as it is: any strides (here a head-major permuted view)."""
    torch.manual_seed(1)
    fmt = codec.get_format("e8-k3v2", 64)
    k, v = torch.randn(2, 2, 8, 16, 64).unbind(0)  # [Hk, num_blocks, bs, D]
    cache = codec.encode_kv(k, v, fmt).transpose(0, 1)  # [num_blocks, Hk, bs, slot], non-contiguous
    table, cached = torch.tensor([[3, 5]]), torch.tensor([20])
    q, key, value = torch.randn(1, 4, 64), torch.randn(1, 2, 64), torch.randn(1, 2, 64)
    expected = native.decode_attention(q, key, value, cache.contiguous(), table, cached, 0.125, fmt)
    torch.testing.assert_close(native.decode_attention(q, key, value, cache, table, cached, 0.125, fmt), expected)


@pytest.mark.parametrize("head_dim", [64, 48])  # 48: two Hadamard blocks (32 + 16)
def test_rotate_inside_the_kernel_equals_rotating_around_it(head_dim):
    torch.manual_seed(4)
    fmt = codec.get_format("e8-k3v2", head_dim)
    k, v = torch.randn(2, NUM_BLOCKS, NUM_KV_HEADS, 16, head_dim).unbind(0)
    cache = codec.encode_kv(k, v, fmt)
    query, key, value, table, cached = _batch(head_dim, 3, 16)
    rotated = native.decode_attention(codec.rotate(query), codec.rotate(key), codec.rotate(value), cache, table,
                                      cached, head_dim**-0.5, fmt)
    got = native.decode_attention(query, key, value, cache, table, cached, head_dim**-0.5, fmt, rotate=True)
    torch.testing.assert_close(got, codec.unrotate(rotated), rtol=1e-4, atol=1e-5)
