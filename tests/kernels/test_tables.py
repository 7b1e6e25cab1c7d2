"""The packed E8P table, expanded with the kernel's bit operations (in torch), reproduces the codec's decoder."""

import torch

from nexusquant_vllm.codec.e8 import e8p_decode, res8_table
from nexusquant_vllm.codec.quantizer import SCALE_C, STAGES
from nexusquant_vllm.kernels.tables import (
    e8p_packed_table,
    res8_flat_table,
    scale_c_table,
    stage2_index_bits,
    stage2_step,
)


def expand_like_kernel(idx: torch.Tensor) -> torch.Tensor:
    code = e8p_packed_table()[idx & 0xFF].long()
    flags = (idx >> 8) & 0x7F
    par = flags ^ (flags >> 4)
    par = par ^ (par >> 2)
    par = (par ^ (par >> 1)) & 1
    neg_last = (par ^ (code >> 16)) & 1
    c = torch.arange(8)
    digit = ((code[:, None] >> (2 * c)) & 3).float()
    neg = torch.where(c < 7, (idx[:, None] >> (8 + c)) & 1, neg_last[:, None])
    shift = 0.25 - 0.5 * ((idx >> 15) & 1).float()
    return (digit + 0.5) * (1 - 2 * neg.float()) + shift[:, None]


def test_packed_e8p_table_decodes_every_index():
    idx = torch.arange(1 << 16)
    assert torch.equal(expand_like_kernel(idx), e8p_decode(idx))


def test_res8_table_and_steps():
    assert torch.equal(res8_flat_table().view(256, 8), res8_table())
    assert stage2_step(2) == 0.0
    assert stage2_step(3) == STAGES[3][1].step and stage2_step(4) == STAGES[4][1].step


def test_encoder_tables():
    for bits in (2, 3, 4):
        assert torch.equal(scale_c_table(bits), torch.tensor(SCALE_C[bits], dtype=torch.float32))
    assert (stage2_index_bits(2), stage2_index_bits(3), stage2_index_bits(4)) == (0, 8, 16)
