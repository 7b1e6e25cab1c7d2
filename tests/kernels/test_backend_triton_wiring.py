"""The backend's wiring of the Triton path: ``do_kv_cache_update`` and ``forward`` of ``NexusQuantImpl`` with the
kernels' metadata (``NEXUSQUANT_ATTENTION=triton``; on the CPU interpreter without CUDA) against the same calls on
the reference path (``NEXUSQUANT_ATTENTION=torch``: the native/torch store and ``attend``), for E8 and protected
layers."""

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from nexusquant_vllm.vllm_glue import triton_path  # noqa: E402
from nexusquant_vllm.vllm_glue.backend import NexusQuantImpl, NexusQuantMetadata, kernel_metadata  # noqa: E402
from nexusquant_vllm.vllm_glue.paged_attention import plan_groups  # noqa: E402

HQ, HK, D, PAGE, NUM_BLOCKS = 4, 2, 32, 16, 10
TABLE = torch.tensor([[1, 2, 0], [3, 0, 4], [5, 6, 7]], dtype=torch.int32)  # 0: vLLM's null block (a hole)


def impl(dtype: str) -> NexusQuantImpl:
    return NexusQuantImpl(HQ, D, D**-0.5, HK, None, None, dtype)


def empty_cache(layer: NexusQuantImpl, device: str) -> torch.Tensor:
    if layer.fmt is None:
        return torch.zeros(NUM_BLOCKS, HK, PAGE, 2 * D, dtype=torch.bfloat16, device=device)
    return torch.zeros(NUM_BLOCKS, HK, PAGE, layer.fmt.slot_bytes, dtype=torch.uint8, device=device)


def slots_of(positions: list[torch.Tensor]) -> torch.Tensor:
    """vLLM's slot mapping for each request's positions (a hole's positions get -1, like padding)."""
    out = []
    for req, pos in enumerate(positions):
        block = TABLE[req, pos // PAGE].long()
        out.append(torch.where(block > 0, block * PAGE + pos % PAGE, -1))
    return torch.cat(out)


@pytest.mark.parametrize("dtype", ["e8-k3v2", "auto"])
def test_store_and_attention_match_the_reference_path(dtype, device, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    layer = impl(dtype)
    cached = torch.tensor([20, 35, 40])  # tokens already in the cache
    q_lens = torch.tensor([1, 5, 1])  # a mixed step: two decode rows and a continuation chunk
    seq_lens = cached + q_lens
    positions = [torch.arange(n) for n in cached.tolist()]
    k_ctx, v_ctx = (torch.randn(int(cached.sum()), HK * D, generator=gen).bfloat16().to(device) for _ in range(2))

    caches = {}
    for path in ("torch", "triton"):
        monkeypatch.setenv(triton_path.ATTENTION_ENV, path)
        caches[path] = empty_cache(layer, device)
        layer.do_kv_cache_update(None, k_ctx, v_ctx, caches[path], slots_of(positions).to(device))
    same = (caches["torch"] == caches["triton"]).float().mean()
    assert same > 0.95, f"stores agree on {float(same):.1%} of the bytes"

    n = int(q_lens.sum())
    q = torch.randn(n, HQ * D, generator=gen).bfloat16().to(device)
    k, v = (torch.randn(n, HK * D, generator=gen).bfloat16().to(device) for _ in range(2))
    query_start_loc = torch.cat([torch.zeros(1, dtype=torch.int32), q_lens.cumsum(0).int()])
    kernel = triton_path.KernelMetadata(query_start_loc.to(device), seq_lens.int().to(device), TABLE.to(device),
                                        int(q_lens.max()), int(seq_lens.max()))
    groups = plan_groups(query_start_loc, seq_lens, TABLE, PAGE, device)
    ref = layer.forward(None, q, k, v, caches["torch"], NexusQuantMetadata(n, groups))
    got = layer.forward(None, q, k, v, caches["torch"], NexusQuantMetadata(n, [], kernel))
    err = (got.float() - ref.float()).abs().max() / ref.float().abs().max()
    assert float(err) < 2e-2


def test_kernel_metadata_trims_vllm_tensors_to_the_real_requests():
    cam = SimpleNamespace(
        num_reqs=2, query_start_loc=torch.tensor([0, 1, 4, 4]), seq_lens=torch.tensor([9, 7, 0]),
        block_table_tensor=torch.arange(12).view(3, 4), max_query_len=3, max_seq_len=9,
    )
    meta = kernel_metadata(cam)
    assert meta.query_start_loc.tolist() == [0, 1, 4] and meta.seq_lens.tolist() == [9, 7]
    assert meta.block_table.shape == (2, 4) and meta.num_reqs == 2
    assert (meta.max_query_len, meta.max_seq_len) == (3, 9)
