"""Fused store kernel (rotate + scale + E8 encode + pack + scatter in one launch) against the torch codec."""

import pytest
import torch

from nexusquant_vllm.codec import decode_kv, get_format
from nexusquant_vllm.codec.format import E8_DTYPES
from nexusquant_vllm.codec.kv import split_slots
from nexusquant_vllm.kernels import store_kv, store_kv_ref
from nexusquant_vllm.kernels.store import scatter_rows

PAGE = 16
SENTINEL = 7  # bytes of slots the store must not touch


def _inputs(num_tokens: int, num_heads: int, head_dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, num_tokens, num_heads, head_dim, generator=gen).unbind(0)


def _slots(num_tokens: int, num_blocks: int, seed: int) -> torch.Tensor:
    """Distinct random slots, every 5th one -1 (vLLM's padding)."""
    slots = torch.randperm(num_blocks * PAGE, generator=torch.Generator().manual_seed(seed))[:num_tokens]
    slots[::5] = -1
    return slots


def _rows(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """The ``[n, Hk, slot_bytes]`` rows of ``cache`` at ``slots``."""
    return cache[slots // PAGE, :, slots % PAGE]


def _rel_mse(rows: torch.Tensor, fmt, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    k, v = decode_kv(rows, fmt)
    return torch.stack([((k - key) ** 2).sum() / (key**2).sum(), ((v - value) ** 2).sum() / (value**2).sum()])


@pytest.mark.parametrize("head_dim", [16, 32, 64])
@pytest.mark.parametrize("name", list(E8_DTYPES))
def test_fused_store_matches_codec(device, name, head_dim):
    fmt = get_format(name, head_dim)
    key, value = _inputs(16, 2, head_dim, seed=head_dim)  # one 16-token tile per head
    slots = _slots(16, 3, seed=head_dim)
    cache = torch.full((3, 2, PAGE, fmt.slot_bytes), SENTINEL, dtype=torch.uint8)
    expected = cache.clone()
    store_kv_ref(key, value, expected, slots, fmt)
    got = cache.to(device)
    store_kv(key.to(device), value.to(device), got, slots.to(device), fmt)
    got = got.cpu()

    kept = slots >= 0
    written = torch.zeros(3 * PAGE, dtype=torch.bool)
    written[slots[kept]] = True
    untouched = got.transpose(1, 2).reshape(3 * PAGE, 2, -1)[~written]
    assert (untouched == SENTINEL).all()  # slot -1 rows dropped, other slots unchanged

    rows, ref_rows = _rows(got, slots[kept]), _rows(expected, slots[kept])
    identical = float((rows == ref_rows).all(-1).float().mean())
    print(f"{name} d={head_dim}: {identical:.3f} of slots byte-identical to the codec")
    assert identical >= 0.95
    mse, ref_mse = _rel_mse(rows, fmt, key[kept], value[kept]), _rel_mse(ref_rows, fmt, key[kept], value[kept])
    assert torch.allclose(mse, ref_mse, rtol=5e-3, atol=0)


@pytest.mark.parametrize("name", ["e8-k3v2", "e8-k2v2"])
def test_head_dim_256_tiles_of_4_and_8_tokens_match_codec(device, name):
    """head_dim 256 codes 4 (3-bit beam) or 8 tokens per program, rotated without ``tl.dot`` (``launch.store``):
    18 tokens leave a partial last tile."""
    fmt = get_format(name, 256)
    key, value = _inputs(18, 1, 256, seed=7)
    slots = torch.randperm(2 * PAGE, generator=torch.Generator().manual_seed(7))[:18]
    expected = torch.zeros(2, 1, PAGE, fmt.slot_bytes, dtype=torch.uint8)
    store_kv_ref(key, value, expected, slots, fmt)
    got = torch.zeros_like(expected, device=device)
    store_kv(key.to(device), value.to(device), got, slots.to(device), fmt)
    rows, ref_rows = _rows(got.cpu(), slots), _rows(expected, slots)
    assert float((rows == ref_rows).all(-1).float().mean()) >= 0.9
    mse, ref_mse = _rel_mse(rows, fmt, key, value), _rel_mse(ref_rows, fmt, key, value)
    assert torch.allclose(mse, ref_mse, rtol=5e-3, atol=0)


@pytest.mark.parametrize("name", ["e8-k3v2", "e8-k4v2"])
def test_heavy_tailed_vectors_match_codec(device, name):
    """Heavy-tailed keys and values whose scales span decades (more groups off the codec's lattice fast path)."""
    fmt = get_format(name, 32)
    key, value = _inputs(16, 1, 32, seed=4)
    gen = torch.Generator().manual_seed(5)
    key, value = key * torch.randn(16, 1, 32, generator=gen).exp() ** 2, value * 10 ** torch.randn(16, 1, 1, generator=gen)
    slots = torch.arange(16)
    expected = torch.zeros(1, 1, PAGE, fmt.slot_bytes, dtype=torch.uint8)
    store_kv_ref(key, value, expected, slots, fmt)
    got = torch.zeros_like(expected, device=device)
    store_kv(key.to(device), value.to(device), got, slots.to(device), fmt)
    assert float((got.cpu() == expected).all(-1).float().mean()) >= 0.95


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's NaN matmul
def test_nonfinite_vectors_get_nan_scales(device):
    fmt = get_format("e8-k3v2", 32)
    key, value = _inputs(4, 2, 32, seed=1)
    key[0, 1, 5] = float("nan")
    value[2, 0, :] = float("inf")
    value[3, 1, 0] = float("-inf")
    slots = torch.tensor([3, 17, 30, 8])
    cache = torch.zeros(2, 2, PAGE, fmt.slot_bytes, dtype=torch.uint8, device=device)
    store_kv(key.to(device), value.to(device), cache, slots.to(device), fmt)
    _, _, k_scale, v_scale = split_slots(_rows(cache.cpu(), slots), fmt)
    bad_k = torch.zeros(4, 2, dtype=torch.bool)
    bad_k[0, 1] = True
    bad_v = torch.zeros(4, 2, dtype=torch.bool)
    bad_v[2, 0] = bad_v[3, 1] = True
    assert torch.equal(k_scale.isnan(), bad_k) and torch.equal(v_scale.isnan(), bad_v)
    k, v = decode_kv(_rows(cache.cpu(), slots), fmt)
    assert k[bad_k].isnan().all() and v[bad_v].isnan().all()
    assert k[~bad_k].isfinite().all() and v[~bad_v].isfinite().all()


def test_strided_cache_and_inputs(device):
    """A token-major cache viewed as ``[nb, Hk, bs, W]`` and K/V that are views of a wider qkv tensor."""
    fmt = get_format("e8-k4v2", 32)
    qkv = torch.randn(6, 5, 32, generator=torch.Generator().manual_seed(2))  # [T, q + k + v heads, D]
    key, value = qkv[:, 1:3], qkv[:, 3:5]
    slots = torch.tensor([33, -1, 2, 40, 17, 0])
    expected = torch.zeros(3, 2, PAGE, fmt.slot_bytes, dtype=torch.uint8)
    store_kv_ref(key, value, expected, slots, fmt)
    storage = torch.zeros(3, PAGE, 2, fmt.slot_bytes, dtype=torch.uint8, device=device)
    cache = storage.transpose(1, 2)
    store_kv(qkv.to(device)[:, 1:3], qkv.to(device)[:, 3:5], cache, slots.to(device), fmt)
    assert torch.equal(cache.cpu(), expected)


def test_no_tokens(device):
    fmt = get_format("e8-k3v2", 16)
    cache = torch.full((1, 1, PAGE, fmt.slot_bytes), SENTINEL, dtype=torch.uint8, device=device)
    empty = torch.empty(0, 1, 16, device=device)
    store_kv(empty, empty, cache, torch.empty(0, dtype=torch.int64, device=device), fmt)
    assert (cache == SENTINEL).all()


def test_rejects_unsupported_head_dim(device):
    fmt = get_format("e8-k3v2", 80)
    cache = torch.zeros(1, 1, PAGE, fmt.slot_bytes, dtype=torch.uint8, device=device)
    x = torch.zeros(1, 1, 80, device=device)
    with pytest.raises(ValueError, match="head_dim"):
        store_kv(x, x, cache, torch.zeros(1, dtype=torch.int64, device=device), fmt)


def test_bf16_rows_match_reference(device):
    key, value = _inputs(6, 3, 64, seed=3)
    slots = torch.tensor([5, 17, -1, 40, 0, -1], dtype=torch.int64)
    cache = torch.zeros(4, 3, PAGE, 128, dtype=torch.bfloat16)
    expected = cache.clone()
    store_kv_ref(key, value, expected, slots, None)
    got = cache.to(device)
    store_kv(key.to(device), value.to(device), got, slots.to(device), None)
    assert torch.equal(got.cpu(), expected)


def test_scatter_into_strided_view(device):
    storage = torch.zeros(3, 16, 2, 44, dtype=torch.uint8, device=device)  # token-major storage
    cache = storage.transpose(1, 2)  # [nb, Hk, bs, W] view
    rows = torch.randint(0, 256, (3, 2, 44), dtype=torch.uint8, device=device)
    scatter_rows(rows, cache, torch.tensor([33, -1, 2], device=device))
    assert torch.equal(cache[2, :, 1], rows[0]) and torch.equal(cache[0, :, 2], rows[2])
    assert int(storage.count_nonzero()) == int(rows[0].count_nonzero() + rows[2].count_nonzero())
