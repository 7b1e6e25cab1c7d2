import pytest

from nexusquant_vllm.codec import E8_DTYPES, get_format


@pytest.mark.parametrize(
    "name,head_dim,slot,ratio",
    [("e8-k3v2", 64, 44, 5.82), ("e8-k3v2", 128, 84, 6.10), ("e8-k2v2", 128, 68, 7.53), ("e8-k4v4", 64, 68, 3.76)],
)
def test_honest_slot_bytes(name, head_dim, slot, ratio):
    fmt = get_format(name, head_dim)
    assert fmt.slot_bytes == slot
    assert fmt.compression_vs(2) == pytest.approx(ratio, abs=0.005)


@pytest.mark.parametrize("name", list(E8_DTYPES))
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
def test_slot_is_codes_plus_two_fp16_scales(name, head_dim):
    k_bits, v_bits = E8_DTYPES[name]
    fmt = get_format(name, head_dim)
    assert fmt.slot_bytes * 8 == head_dim * (k_bits + v_bits) + 2 * 16
    assert fmt.bits_per_element == pytest.approx((k_bits + v_bits) / 2 + 16 / head_dim)


def test_unknown_dtype_lists_valid_names():
    with pytest.raises(ValueError, match="e8-k3v2"):
        get_format("e8-k5v1", 64)


@pytest.mark.parametrize("head_dim", [0, 60, 65, -8])
def test_head_dim_must_be_multiple_of_8(head_dim):
    with pytest.raises(ValueError, match="multiple of 8"):
        get_format("e8-k3v2", head_dim)
