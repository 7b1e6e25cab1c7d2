import pytest
import torch

from nexusquant_vllm.codec import RopeSpec, apply_rope, remove_rope, rotate, rotation_matrix, unrotate
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


def reference_rope(x, positions, theta):
    """Hugging Face Llama's rotate_half formulation, written independently of the codec."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = positions[:, None].double() * inv
    emb = torch.cat([angles, angles], -1)
    cos, sin = emb.cos().float()[:, None], emb.sin().float()[:, None]
    rotated_half = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1)
    return x * cos + rotated_half * sin


def test_rope_matches_reference_and_inverts():
    spec = RopeSpec(head_dim=64, theta=10000.0)
    x = torch.randn(9, 3, 64)
    positions = torch.arange(100, 109)
    roped = apply_rope(x, positions, spec)
    assert torch.allclose(roped, reference_rope(x, positions, 10000.0), atol=1e-4)
    assert torch.allclose(remove_rope(roped, positions, spec), x, atol=1e-4)


def test_interleaved_rope_rejected():
    with pytest.raises(ValueError, match="interleaved"):
        RopeSpec(head_dim=64, style="gptj")


def test_scalar_levels_match_known_gaussian_optima():
    assert scalar_levels(2, "lloydmax")[2:].tolist() == pytest.approx([0.4528, 1.5104], abs=1e-3)
    uniform = scalar_levels(2, "uniform")
    assert float(uniform[2] - uniform[1]) == pytest.approx(0.9957, abs=1e-3)
