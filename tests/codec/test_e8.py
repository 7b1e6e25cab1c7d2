import pytest
import torch

from nexusquant_vllm.codec import e8
from nexusquant_vllm.codec.packing import pack_codes, unpack_codes
from nexusquant_vllm.codec.quantizer import STAGES


def in_e8_shifted(points: torch.Tensor) -> torch.Tensor:
    """Membership in E8 + (1/4)·1: y - 1/4 is all-integer or all-half-integer with an even sum."""
    z = points - 0.25
    integer = (z == z.round()).all(-1)
    half = ((z - 0.5) == (z - 0.5).round()).all(-1)
    even = (z.sum(-1).round() % 2) == 0
    return (integer | half) & even


def brute_force(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    return ((table * table).sum(-1)[None] - 2 * x @ table.T).argmin(-1)


def test_e8p_is_65536_distinct_lattice_points():
    table = e8.e8p_table()
    assert table.shape == (65536, 8)
    assert torch.unique(table, dim=0).shape[0] == 65536
    assert in_e8_shifted(table).all()


def test_e8p_table_matches_structured_decoder():
    index = torch.randint(0, 65536, (5000,), generator=torch.Generator().manual_seed(1))
    assert torch.equal(e8.e8p_decode(index), e8.e8p_table()[index])


def test_every_e8p_codeword_encodes_to_itself():
    table = e8.e8p_table()
    assert torch.equal(e8.e8p_encode(table).long(), torch.arange(65536))


@pytest.mark.parametrize("sigma", [0.6, 1.0, 1.6])
def test_e8p_encoder_is_exact_nearest_over_all_codewords(sigma):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3000, 8, generator=gen) * sigma
    table = e8.e8p_table()
    got = table[e8.e8p_encode(x).long()]
    best = table[brute_force(x, table)]
    assert torch.allclose(((got - x) ** 2).sum(-1), ((best - x) ** 2).sum(-1), atol=1e-5)


def test_e8p_bounded_and_exhaustive_paths_agree():
    x = torch.randn(4000, 8, generator=torch.Generator().manual_seed(3)) * 1.3
    assert torch.equal(e8._e8p_encode_bounded(x), e8.e8p_encode_exhaustive(x).long())


def test_res8_is_256_smallest_norm_lattice_points():
    table = e8.res8_table()
    assert table.shape == (256, 8)
    assert torch.unique(table, dim=0).shape[0] == 256
    assert in_e8_shifted(table).all()
    assert (table * table).sum(-1).max() == pytest.approx(2.5)


def test_res8_encoder_is_exact_nearest():
    x = torch.randn(3000, 8, generator=torch.Generator().manual_seed(4)) * 0.8
    table = e8.res8_table()
    assert torch.equal(e8.res8_encode(x).long(), brute_force(x, table))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_packing_is_identity_on_codes(bits):
    gen = torch.Generator().manual_seed(bits)
    codes = [torch.randint(0, 1 << s.index_bits, (7, 16), generator=gen) for s in STAGES[bits]]
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (7, 16 * bits)
    for original, unpacked in zip(codes, unpack_codes(packed, bits)):
        assert torch.equal(original, unpacked)
