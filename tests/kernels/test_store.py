"""Store path (codec encode + Triton scatter) against the torch reference, byte for byte."""

import pytest
import torch

from nexusquant_vllm.codec import get_format
from nexusquant_vllm.kernels import store_kv, store_kv_ref
from nexusquant_vllm.kernels.store import scatter_rows


@pytest.mark.parametrize("name", ["e8-k3v2", "e8-k4v4", None])
def test_store_matches_reference_bytes(device, name):
    fmt = get_format(name, 64) if name else None
    width = fmt.slot_bytes if fmt else 128
    dtype = torch.uint8 if fmt else torch.bfloat16
    key, value = torch.randn(2, 6, 3, 64)
    slots = torch.tensor([5, 17, -1, 40, 0, -1], dtype=torch.int64)  # -1: padding, skipped
    cache = torch.zeros(4, 3, 16, width, dtype=dtype)
    expected = cache.clone()
    store_kv_ref(key, value, expected, slots, fmt)
    got = cache.to(device)
    store_kv(key.to(device), value.to(device), got, slots.to(device), fmt)
    assert torch.equal(got.cpu(), expected)


def test_scatter_into_strided_view(device):
    storage = torch.zeros(3, 16, 2, 44, dtype=torch.uint8, device=device)  # token-major storage
    cache = storage.transpose(1, 2)  # [nb, Hk, bs, W] view
    rows = torch.randint(0, 256, (3, 2, 44), dtype=torch.uint8, device=device)
    scatter_rows(rows, cache, torch.tensor([33, -1, 2], device=device))
    assert torch.equal(cache[2, :, 1], rows[0]) and torch.equal(cache[0, :, 2], rows[2])
    assert int(storage.count_nonzero()) == int(rows[0].count_nonzero() + rows[2].count_nonzero())
