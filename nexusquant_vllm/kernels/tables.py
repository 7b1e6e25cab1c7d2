"""Small decoding tables the Triton kernels read from global memory (L1/L2-resident on a GPU).

Both are derived from the codec's tables, never restated: the codec stays the single source of the codebooks.

* ``e8p_packed_table`` int32 ``[256]`` (1 KiB): E8P pattern p packed as 8 two-bit digits ``|x_i| - 1/2`` in bits
  ``2i..2i+1`` plus the pattern's sign parity in bit 16. A kernel expands one group's 8 coordinates with shifts and
  masks instead of reading 8 floats.
* ``res8_flat_table`` float32 ``[256 * 8]`` (8 KiB): the RES8 points of the 3-bit second stage, unscaled.
* ``scale_c_table`` float32 ``[len(SCALE_C[bits])]``: the encoder's candidate search-scale multipliers.
"""

from __future__ import annotations

import functools

import torch

from nexusquant_vllm.codec.e8 import e8p_pattern_parity, e8p_patterns, res8_table
from nexusquant_vllm.codec.quantizer import SCALE_C, STAGES

PARITY_BIT = 16


@functools.lru_cache(maxsize=None)
def _e8p_packed_cpu() -> torch.Tensor:
    digits = (e8p_patterns() - 0.5).round().to(torch.int64)  # [256, 8] in 0..3
    assert int(digits.min()) >= 0 and int(digits.max()) <= 3
    packed = (digits << (2 * torch.arange(8))).sum(-1) | (e8p_pattern_parity() << PARITY_BIT)
    return packed.to(torch.int32)


@functools.lru_cache(maxsize=None)
def e8p_packed_table(device: torch.device | str = "cpu") -> torch.Tensor:
    """int32 ``[256]``: E8P patterns as packed 2-bit digits plus parity (see the module docstring)."""
    return _e8p_packed_cpu().to(device)


@functools.lru_cache(maxsize=None)
def res8_flat_table(device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 ``[256 * 8]``: RES8 points, row-major, unscaled."""
    return res8_table("cpu").reshape(-1).contiguous().to(device)


def stage2_step(bits: int) -> float:
    """The step of the second residual stage for ``bits`` (0.0 for the single-stage 2-bit code)."""
    stages = STAGES[bits]
    return stages[1].step if len(stages) > 1 else 0.0


def stage2_index_bits(bits: int) -> int:
    """Index bits of the second stage's codebook (8: RES8, 16: E8P; 0 for the single-stage 2-bit code)."""
    stages = STAGES[bits]
    return stages[1].index_bits if len(stages) > 1 else 0


@functools.lru_cache(maxsize=None)
def scale_c_table(bits: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 ``[m]``: the candidate search-scale multipliers ``SCALE_C[bits]`` of the codec's scale rule."""
    return torch.tensor(SCALE_C[bits], dtype=torch.float32, device=device)
