import pytest
import torch

from nexusquant_vllm.codec import E8_DTYPES, decode_kv, decode_kv_rotated, encode_kv, get_format, rotate

# relative MSE bounds on N(0, 1) data, from the measured values (2 bits 0.0875, 3 bits 0.0284, 4 bits 0.0078)
MSE_BOUND = {2: 0.095, 3: 0.032, 4: 0.009}


def rel_mse(estimate: torch.Tensor, target: torch.Tensor) -> float:
    return float(((estimate.float() - target.float()) ** 2).sum() / (target.float() ** 2).sum())


@pytest.mark.parametrize("name", list(E8_DTYPES))
def test_round_trip_error_within_codebook_bound(name):
    gen = torch.Generator().manual_seed(0)
    key, value = torch.randn(2, 64, 2, 64, generator=gen)
    fmt = get_format(name, 64)
    k, v = decode_kv(encode_kv(key, value, fmt), fmt)
    assert rel_mse(k, key) < MSE_BOUND[fmt.k_bits]
    assert rel_mse(v, value) < MSE_BOUND[fmt.v_bits]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
def test_shapes_and_dtypes(dtype, head_dim):
    fmt = get_format("e8-k3v2", head_dim)
    key = torch.randn(5, 3, head_dim, generator=torch.Generator().manual_seed(head_dim)).to(dtype)
    slots = encode_kv(key, key, fmt)
    assert slots.dtype == torch.uint8 and slots.shape == (5, 3, fmt.slot_bytes)
    k, v = decode_kv(slots, fmt, dtype=dtype)
    assert k.dtype == dtype and k.shape == key.shape
    assert rel_mse(k, key) < MSE_BOUND[3] * 1.3


def test_rotated_decode_is_rotation_of_decode():
    fmt = get_format("e8-k3v2", 64)
    x = torch.randn(10, 64, generator=torch.Generator().manual_seed(5))
    slots = encode_kv(x, x, fmt)
    k_rot, _ = decode_kv_rotated(slots, fmt)
    k, _ = decode_kv(slots, fmt)
    assert torch.allclose(rotate(k), k_rot, atol=1e-5)


def test_deterministic_bytes():
    fmt = get_format("e8-k3v2", 128)
    x = torch.randn(32, 128, generator=torch.Generator().manual_seed(6))
    assert torch.equal(encode_kv(x, x, fmt), encode_kv(x.clone(), x.clone(), fmt))


def test_zero_vector_decodes_to_zero():
    fmt = get_format("e8-k3v2", 64)
    zero = torch.zeros(2, 64)
    k, v = decode_kv(encode_kv(zero, zero, fmt), fmt)
    assert torch.equal(k, zero) and torch.equal(v, zero)


def test_huge_values_saturate_without_crashing():
    fmt = get_format("e8-k3v2", 64)
    huge = torch.full((1, 64), 1e30)
    k, _ = decode_kv(encode_kv(huge, huge, fmt), fmt)
    assert torch.isfinite(k).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_rejected(bad):
    fmt = get_format("e8-k3v2", 64)
    key = torch.randn(2, 64)
    key[1, 3] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        encode_kv(key, torch.randn(2, 64), fmt)


def test_non_finite_unvalidated_decodes_to_nan_not_garbage():
    fmt = get_format("e8-k3v2", 64)
    key = torch.randn(2, 64)
    key[1, 3] = float("nan")
    k, v = decode_kv(encode_kv(key, key, fmt, validate=False), fmt)
    assert torch.isnan(k[1]).all() and torch.isfinite(k[0]).all()


def test_wrong_head_dim_rejected():
    with pytest.raises(ValueError, match="head_dim"):
        encode_kv(torch.randn(2, 32), torch.randn(2, 32), get_format("e8-k3v2", 64))


def test_wrong_slot_size_rejected():
    with pytest.raises(ValueError, match="uint8 slots"):
        decode_kv(torch.zeros(2, 40, dtype=torch.uint8), get_format("e8-k3v2", 64))


@pytest.mark.parametrize("name", list(E8_DTYPES))
def test_slot_decoder_equals_unpack_and_dequantize(name):
    """The in-place gather decoder is bit-exact with the format's reference (unpack_codes + dequantize), on real
    codes, on every index value (random bytes), and on a non-contiguous view of the slots."""
    from nexusquant_vllm.codec.kv import split_slots
    from nexusquant_vllm.codec.packing import unpack_codes
    from nexusquant_vllm.codec.quantizer import dequantize

    fmt = get_format(name, 64)
    gen = torch.Generator().manual_seed(7)
    slots = encode_kv(torch.randn(4, 3, 8, 64, generator=gen) * 4, torch.randn(4, 3, 8, 64, generator=gen), fmt)
    junk = torch.randint(0, 256, (2, 7, fmt.slot_bytes), dtype=torch.uint8, generator=gen)
    junk[..., fmt.k_scale_offset :] = torch.tensor([0.5, -2.0], dtype=torch.float16).view(torch.uint8)
    for s in (slots, junk, slots.transpose(0, 1)[:, [3, 0, 2]]):
        k_codes, v_codes, k_scale, v_scale = split_slots(s, fmt)
        k_rot, v_rot = decode_kv_rotated(s, fmt)
        assert torch.equal(k_rot, dequantize(unpack_codes(k_codes, fmt.k_bits), k_scale, fmt.k_bits))
        assert torch.equal(v_rot, dequantize(unpack_codes(v_codes, fmt.v_bits), v_scale, fmt.v_bits))
