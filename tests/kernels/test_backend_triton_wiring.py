"""The backend's wiring: ``do_kv_cache_update`` and ``forward`` of ``NexusQuantImpl`` built with
``attention="triton"`` (``NEXUSQUANT_ATTENTION``; on the CPU interpreter without CUDA) against layers built with
``attention="torch"``, for E8 and protected layers, and the step batch the metadata builder hands the paths."""

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from nexusquant_vllm.attention import TorchPath, TritonPath  # noqa: E402
from nexusquant_vllm.vllm_glue.backend import NexusQuantImpl, NexusQuantMetadata, step_batch  # noqa: E402

HQ, HK, D, PAGE, NUM_BLOCKS = 4, 2, 32, 16, 10
TABLE = torch.tensor([[1, 2, 0], [3, 0, 4], [5, 6, 7]], dtype=torch.int32)  # 0: vLLM's null block (a hole)


def impl(dtype: str, attention: str, monkeypatch) -> NexusQuantImpl:
    monkeypatch.setenv("NEXUSQUANT_ATTENTION", attention)
    return NexusQuantImpl(HQ, D, D**-0.5, HK, None, None, dtype)


def empty_cache(layer: NexusQuantImpl, device: str) -> torch.Tensor:
    fmt = layer.path.pages.fmt
    if fmt is None:
        return torch.zeros(NUM_BLOCKS, HK, PAGE, 2 * D, dtype=torch.bfloat16, device=device)
    return torch.zeros(NUM_BLOCKS, HK, PAGE, fmt.slot_bytes, dtype=torch.uint8, device=device)


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
    layers = {name: impl(dtype, name, monkeypatch) for name in ("torch", "triton")}
    assert isinstance(layers["torch"].path, TorchPath) and isinstance(layers["triton"].path, TritonPath)
    cached = torch.tensor([20, 35, 40])  # tokens already in the cache
    q_lens = torch.tensor([1, 5, 1])  # a mixed step: two decode rows and a continuation chunk
    seq_lens = cached + q_lens
    positions = [torch.arange(n) for n in cached.tolist()]
    k_ctx, v_ctx = (torch.randn(int(cached.sum()), HK * D, generator=gen).bfloat16().to(device) for _ in range(2))

    caches = {}
    for name, layer in layers.items():
        caches[name] = empty_cache(layer, device)
        layer.do_kv_cache_update(None, k_ctx, v_ctx, caches[name], slots_of(positions).to(device))
    same = (caches["torch"] == caches["triton"]).float().mean()
    assert same > 0.95, f"stores agree on {float(same):.1%} of the bytes"

    n = int(q_lens.sum())
    q = torch.randn(n, HQ * D, generator=gen).bfloat16().to(device)
    k, v = (torch.randn(n, HK * D, generator=gen).bfloat16().to(device) for _ in range(2))
    query_start_loc = torch.cat([torch.zeros(1, dtype=torch.int32), q_lens.cumsum(0).int()])
    cam = SimpleNamespace(
        num_reqs=3, query_start_loc=query_start_loc.to(device), query_start_loc_cpu=query_start_loc,
        seq_lens=seq_lens.int().to(device), seq_lens_cpu_upper_bound=seq_lens, block_table_tensor=TABLE.to(device),
        max_query_len=int(q_lens.max()), max_seq_len=int(seq_lens.max()),
    )
    batch = step_batch(cam, PAGE)
    out = {name: layer.forward(None, q, k, v, caches["torch"], NexusQuantMetadata(n, type(layer.path).plan(batch)))
           for name, layer in layers.items()}
    err = (out["triton"].float() - out["torch"].float()).abs().max() / out["torch"].float().abs().max()
    assert float(err) < 2e-2


def test_step_batch_trims_vllm_tensors_to_the_real_requests():
    cam = SimpleNamespace(
        num_reqs=2, query_start_loc=torch.tensor([0, 1, 4, 4]), query_start_loc_cpu=torch.tensor([0, 1, 4, 4]),
        seq_lens=torch.tensor([9, 7, 0]), seq_lens_cpu_upper_bound=None,
        block_table_tensor=torch.arange(12).view(3, 4), max_query_len=3, max_seq_len=9,
    )
    batch = step_batch(cam, 16)
    assert batch.query_start_loc.tolist() == [0, 1, 4] and batch.seq_lens.tolist() == [9, 7]
    assert batch.block_table.shape == (2, 4) and batch.seq_lens_cpu is None and batch.block_size == 16
    meta = TritonPath.plan(batch)
    assert meta.num_reqs == 2 and (meta.max_query_len, meta.max_seq_len) == (3, 9)
    assert [g.token_idx.shape for g in TorchPath.plan(batch)] == [(1, 1), (1, 3)]  # host copy of seq_lens taken


def test_an_unknown_attention_choice_is_refused(monkeypatch):
    with pytest.raises(ValueError, match="attention='fastest'"):
        impl("e8-k3v2", "fastest", monkeypatch)
