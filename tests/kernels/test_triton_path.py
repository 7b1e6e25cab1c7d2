"""The backend's Triton path (vllm_glue/triton_path.py) against its torch path (paged_attention.attend) on the same
paged cache, as the backend calls both: decode-only and mixed batches, E8 and bf16 (protected-layer) pages, holes."""

import pytest
import torch

from nexusquant_vllm.codec import decode_kv_rotated, get_format, rotate, unrotate
from nexusquant_vllm.kernels import store_kv_ref
from nexusquant_vllm.vllm_glue import triton_path
from nexusquant_vllm.vllm_glue.paged_attention import attend, plan_groups

HQ, HK, D, PAGE, NUM_BLOCKS = 4, 2, 32, 16, 12
TABLE = torch.tensor([[1, 2, 0, 0], [3, 0, 4, 5], [6, 7, 8, 9]], dtype=torch.int32)  # 0: null block (a hole)


def filled_cache(fmt, seq_lens, gen):
    """A cache holding random K/V at every position of every request's pages (holes stay empty)."""
    cache = torch.zeros(NUM_BLOCKS, HK, PAGE, fmt.slot_bytes if fmt else 2 * D,
                        dtype=torch.uint8 if fmt else torch.bfloat16)
    for req, n in enumerate(seq_lens.tolist()):
        pos = torch.arange(n)
        block = TABLE[req, pos // PAGE].long()
        slots = torch.where(block > 0, block * PAGE + pos % PAGE, -1)
        k, v = torch.randn(2, n, HK, D, generator=gen)
        store_kv_ref(k, v, cache, slots, fmt)
    return cache


def torch_path(q, k, v, cache, fmt, query_start_loc, seq_lens, scale):
    """What the backend computes on the CPU: rotated-domain ``attend`` over dequantized pages."""
    groups = plan_groups(query_start_loc, seq_lens, TABLE, PAGE)
    if fmt is None:
        def read(ids):
            pages = cache.transpose(0, 1)[:, ids]
            return pages[..., :D], pages[..., D:]
        return attend(q, k, v, groups, read, scale, torch.empty_like(q, dtype=torch.float32))

    def read_e8(ids):
        return decode_kv_rotated(cache.transpose(0, 1)[:, ids], fmt)
    out = attend(rotate(q), rotate(k), rotate(v), groups, read_e8, scale, torch.empty(q.shape))
    return unrotate(out)


@pytest.mark.parametrize("name", ["e8-k3v2", "e8-k4v4", None])
@pytest.mark.parametrize("query_lens", [(1, 1, 1), (1, 5, 3)], ids=["decode", "mixed"])
def test_triton_path_matches_torch_path(device, name, query_lens):
    gen = torch.Generator().manual_seed(0)
    fmt = get_format(name, D) if name else None
    seq_lens = torch.tensor([20, 61, 40], dtype=torch.int32)
    cache = filled_cache(fmt, seq_lens, gen)
    q_lens = torch.tensor(query_lens)
    query_start_loc = torch.cat([torch.zeros(1, dtype=torch.int64), q_lens.cumsum(0)]).to(torch.int32)
    num_tokens = int(q_lens.sum())
    q = torch.randn(num_tokens, HQ, D, generator=gen)
    k, v = torch.randn(2, num_tokens, HK, D, generator=gen)
    scale = D**-0.5

    ref = torch_path(q, k, v, cache, fmt, query_start_loc, seq_lens, scale)
    meta = triton_path.KernelMetadata(
        query_start_loc=query_start_loc.to(device), seq_lens=seq_lens.to(device), block_table=TABLE.to(device),
        max_query_len=int(q_lens.max()), max_seq_len=int(seq_lens.max()),
    )
    out = torch.zeros(num_tokens, HQ, D, device=device)
    triton_path.attention(q.to(device), k.to(device), v.to(device), cache.to(device), meta, scale, fmt, out)
    err = (out.cpu() - ref).abs().max() / ref.abs().max()
    assert float(err) < 1e-2


def test_enabled_on_cuda_with_supported_head_dim_and_on_cpu_only_when_asked(monkeypatch):
    monkeypatch.delenv(triton_path.ATTENTION_ENV, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not triton_path.enabled(torch.device("cpu"), 64)
    assert triton_path.enabled(torch.device("cuda"), 64)
    assert not triton_path.enabled(torch.device("cuda"), 80)
    monkeypatch.setenv(triton_path.ATTENTION_ENV, "torch")
    assert not triton_path.enabled(torch.device("cuda"), 64)
    monkeypatch.setenv(triton_path.ATTENTION_ENV, "triton")
    assert triton_path.enabled(torch.device("cpu"), 64)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not triton_path.enabled(torch.device("cpu"), 64)
