"""Native CPU paged decode attention (csrc/e8_decode_attention_cpu.cpp) against the torch path of the backend."""

from __future__ import annotations

import pytest
import torch

from nexusquant_vllm import codec
from nexusquant_vllm.native import paged_decode as native
from nexusquant_vllm.vllm_glue.paged_attention import attend, plan_groups


def test_library_is_built():
    assert native.available()


@pytest.mark.parametrize("dtype,head_dim,gqa", [("e8-k3v2", 64, 3), ("e8-k2v2", 128, 1), ("e8-k4v4", 64, 4),
                                                ("e8-k4v2", 32, 2)])
def test_matches_torch_attend(dtype, head_dim, gqa):
    torch.manual_seed(0)
    fmt = codec.get_format(dtype, head_dim)
    num_kv_heads, block_size, num_blocks = 2, 16, 32
    k, v = torch.randn(2, num_blocks, num_kv_heads, block_size, head_dim).unbind(0)
    cache = codec.encode_kv(k, v, fmt)  # [num_blocks, Hk, bs, slot]
    cached = torch.tensor([0, 5, 16, 37, 70])  # empty context, partial and whole blocks
    table = torch.randperm(num_blocks - 1)[:25].add(1).view(5, 5)  # block 0 is the null block
    table[3, 1] = 0  # an evicted hole (vLLM's null block) inside the context
    query = torch.randn(5, num_kv_heads * gqa, head_dim)
    key, value = torch.randn(2, 5, num_kv_heads, head_dim).unbind(0)
    scale = head_dim**-0.5

    groups = plan_groups(torch.arange(6), cached + 1, table, block_size)
    expected = torch.empty(5, num_kv_heads * gqa, head_dim)
    attend(query, key, value, groups, lambda ids: codec.decode_kv_rotated(cache.transpose(0, 1)[:, ids], fmt), scale,
           expected)
    got = native.decode_attention(query * scale, key, value, cache, table, cached, fmt)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_strided_cache_view():
    """The backend passes vLLM's cache tensor as it is: any strides (here a head-major permuted view)."""
    torch.manual_seed(1)
    fmt = codec.get_format("e8-k3v2", 64)
    k, v = torch.randn(2, 2, 8, 16, 64).unbind(0)  # [Hk, num_blocks, bs, D]
    cache = codec.encode_kv(k, v, fmt).transpose(0, 1)  # [num_blocks, Hk, bs, slot], non-contiguous
    table, cached = torch.tensor([[3, 5]]), torch.tensor([20])
    q, key, value = torch.randn(1, 4, 64), torch.randn(1, 2, 64), torch.randn(1, 2, 64)
    expected = native.decode_attention(q, key, value, cache.contiguous(), table, cached, fmt)
    torch.testing.assert_close(native.decode_attention(q, key, value, cache, table, cached, fmt), expected)
