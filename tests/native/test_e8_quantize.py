"""The native CPU quantizer (csrc/e8_quantize_cpu.cpp) against the torch reference (codec/quantizer.py)."""

from __future__ import annotations

import pytest
import torch

from nexusquant_vllm import codec, native
from nexusquant_vllm.codec import quantizer


def test_library_is_built():
    """`pip install` builds it (setup.py); CI must never fall back to the torch encoder unnoticed."""
    assert native.available()


def _distortion(codes, scale, x, bits) -> torch.Tensor:
    return ((quantizer.dequantize(codes, scale, bits) - x) ** 2).sum(-1)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("head_dim", [8, 64, 128, 256])
def test_matches_reference(bits, head_dim):
    """Same codes and scale for (nearly) every vector; where they differ, two codewords tie in float rounding, so the
    vector's distortion is the same."""
    torch.manual_seed(bits * 1000 + head_dim)
    x = torch.randn(512, head_dim) * torch.rand(512, 1) * 10
    ref_codes, ref_scale = quantizer.quantize(x, bits)
    codes, scale = native.quantize(x, bits)
    assert [c.dtype for c in codes] == [c.dtype for c in ref_codes] and scale.dtype == torch.float16
    same = (scale == ref_scale) & torch.stack([(a == b).all(-1) for a, b in zip(codes, ref_codes)]).all(0)
    assert same.float().mean() >= 0.99
    torch.testing.assert_close(
        _distortion(codes, scale, x, bits), _distortion(ref_codes, ref_scale, x, bits), rtol=1e-4, atol=1e-6
    )


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_edge_vectors_match_reference(bits):
    """Zero vectors decode to zero; beyond fp16's range the scale saturates at 65504, as in the reference; a spike
    whose square underflows gets unit-scale targets far beyond the lattice decoder's exact rounding range."""
    x = torch.zeros(5, 64)
    x[1] = 1e-20
    x[2] = torch.linspace(-1e6, 1e6, 64)
    x[3, 5] = 3.0  # one spike
    x[4, 0] = 6e-23  # its square underflows: searched at the 1e-30 floor, a target of 6e7 > 2^22
    codes, scale = native.quantize(x, bits)
    ref_codes, ref_scale = quantizer.quantize(x, bits)
    assert torch.equal(scale, ref_scale)
    assert scale[0] == 0 and scale[2] == 65504
    torch.testing.assert_close(quantizer.dequantize(codes, scale, bits), quantizer.dequantize(ref_codes, ref_scale, bits))


def test_nan_vector_gets_nan_scale_not_garbage():
    """The store hot path skips the finiteness check; a NaN vector must decode to NaN, never to plausible values."""
    x = torch.randn(3, 64)
    x[1, 7] = float("nan")
    _, scale = native.quantize(x, 3)
    assert torch.isnan(scale[1]) and torch.isfinite(scale[[0, 2]]).all()


def test_threaded_split_equals_single_call(monkeypatch):
    """Large batches are split over threads; the bytes do not depend on the split or on the batch around a vector."""
    torch.manual_seed(0)
    x = torch.randn(2048, 64)
    codes, scale = native.quantize(x, 3)
    monkeypatch.setattr(native.e8_quantize, "_PARALLEL_MIN_ELEMENTS", 1 << 40)  # one thread
    single_codes, single_scale = native.quantize(x, 3)
    alone_codes, alone_scale = native.quantize(x[777:778], 3)
    assert torch.equal(scale, single_scale) and all(torch.equal(a, b) for a, b in zip(codes, single_codes))
    assert torch.equal(alone_scale, scale[777:778]) and all(torch.equal(a, b[777:778]) for a, b in zip(alone_codes, codes))


def test_encode_kv_native_is_a_drop_in():
    fmt = codec.get_format("e8-k3v2", 64)
    torch.manual_seed(1)
    key, value = torch.randn(2, 5, 3, 64).unbind(0)
    slots = native.encode_kv(key, value, fmt)
    assert slots.shape == (5, 3, fmt.slot_bytes) and slots.dtype == torch.uint8
    k, v = codec.decode_kv(slots, fmt)
    k_ref, v_ref = codec.decode_kv(codec.encode_kv(key, value, fmt), fmt)
    torch.testing.assert_close(((k - key) ** 2).sum(), ((k_ref - key) ** 2).sum(), rtol=1e-3, atol=0)
    torch.testing.assert_close(((v - value) ** 2).sum(), ((v_ref - value) ** 2).sum(), rtol=1e-3, atol=0)
    with pytest.raises(ValueError, match="NaN or inf"):
        native.encode_kv(key.clone().fill_(float("inf")), value, fmt)


@pytest.mark.parametrize("shape", [(4, 12), (4, 1024)])
def test_bad_shapes_are_refused(shape):
    with pytest.raises(ValueError, match="head_dim % 8 == 0"):
        native.quantize(torch.randn(*shape), 3)


@pytest.mark.parametrize("dtype,block_size,model_dtype", [("e8-k3v2", 16, torch.bfloat16), ("e8-k4v4", 32, torch.float32),
                                                          ("e8-k2v2", 16, torch.float16)])
def test_store_kv_writes_the_slots_of_encode_kv(dtype, block_size, model_dtype):
    """Same bytes as encode_kv + the slot scatter, padding tokens (slot -1) skipped, other slots untouched, a
    non-finite vector stored with a NaN scale; the cache is a strided (head-major permuted) view."""
    torch.manual_seed(3)
    fmt = codec.get_format(dtype, 64)
    num_blocks, num_kv_heads, n = 6, 3, 40
    key, value = (torch.randn(2, n, num_kv_heads, 64) * 4).to(model_dtype).unbind(0)
    key[5, 1, 3] = float("inf")
    value[9, 0, 0] = float("nan")
    slots = torch.randperm(num_blocks * block_size)[:n]
    slots[[2, 17]] = -1
    storage = torch.randint(0, 256, (num_kv_heads, num_blocks, block_size, fmt.slot_bytes), dtype=torch.uint8)
    cache = storage.transpose(0, 1)  # [num_blocks, Hk, bs, slot]
    expected = cache.clone()
    valid = slots >= 0
    encoded = native.encode_kv(key[valid], value[valid], fmt, validate=False)
    expected[slots[valid] // block_size, :, slots[valid] % block_size] = encoded
    native.store_kv(key, value, cache, slots, fmt)
    assert torch.equal(cache, expected)
    _, _, k_scale, v_scale = codec.split_slots(cache[slots[5] // block_size, 1, slots[5] % block_size], fmt)
    assert torch.isnan(k_scale) and torch.isfinite(v_scale)
