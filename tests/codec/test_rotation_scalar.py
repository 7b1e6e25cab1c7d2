import pytest
import torch

from nexusquant_vllm.codec import rotate, rotation_matrix, unrotate
from nexusquant_vllm.codec.rotation import hadamard_blocks
from nexusquant_vllm.codec.scalar import scalar_levels


@pytest.mark.parametrize("head_dim", [8, 64, 80, 96, 128, 256])
def test_rotation_is_orthogonal(head_dim):
    r = rotation_matrix(head_dim)
    assert torch.allclose(r @ r.T, torch.eye(head_dim), atol=1e-5)
    x = torch.randn(4, head_dim)
    assert torch.allclose(unrotate(rotate(x)), x, atol=1e-5)


def test_block_diagonal_for_non_power_of_two():
    assert hadamard_blocks(80) == [64, 16]
    assert hadamard_blocks(96) == [64, 32]
    assert hadamard_blocks(128) == [128]


def test_scalar_levels_match_known_gaussian_optima():
    assert scalar_levels(2, "lloydmax")[2:].tolist() == pytest.approx([0.4528, 1.5104], abs=1e-3)
    uniform = scalar_levels(2, "uniform")
    assert float(uniform[2] - uniform[1]) == pytest.approx(0.9957, abs=1e-3)
