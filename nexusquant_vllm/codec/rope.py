"""Optional RoPE removal for keys: undo the rotary embedding before quantizing, re-apply it after decoding.

Pre-RoPE keys have a position-independent channel structure, which can make them easier to code. Only the
split-half ("NeoX", Llama) layout is supported: rotary pair i is (x[i], x[i + rotary_dim/2]). The interleaved
(GPT-J) layout pairs (x[2i], x[2i+1]) and is rejected with a clear error rather than silently mis-rotated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

ROPE_STYLES = ("neox",)
SCALING_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding parameters, as in a Hugging Face config (``rope_theta``, ``rope_scaling``)."""

    head_dim: int
    theta: float = 10000.0
    rotary_dim: int | None = None
    style: str = "neox"
    scaling: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.style not in ROPE_STYLES:
            raise ValueError(
                f"RoPE style {self.style!r} is not supported for RoPE removal (only split-half 'neox'); "
                "interleaved (GPT-J) rotary keys cannot be un-rotated by this codec"
            )
        rotary_dim = self.rotary_dim or self.head_dim
        if rotary_dim % 2 or rotary_dim > self.head_dim:
            raise ValueError(f"rotary_dim must be even and <= head_dim, got {rotary_dim}")
        kind = self.scaling.get("rope_type", self.scaling.get("type", "default"))
        if kind not in SCALING_TYPES:
            raise ValueError(f"unsupported rope scaling {kind!r}; supported: {SCALING_TYPES}")

    @property
    def dim(self) -> int:
        return self.rotary_dim or self.head_dim

    def inv_freq(self) -> torch.Tensor:
        inv = 1.0 / self.theta ** (torch.arange(0, self.dim, 2, dtype=torch.float64) / self.dim)
        kind = self.scaling.get("rope_type", self.scaling.get("type", "default"))
        if kind == "linear":
            inv = inv / self.scaling["factor"]
        elif kind == "llama3":
            inv = _llama3_inv_freq(inv, self.scaling)
        return inv


def _llama3_inv_freq(inv: torch.Tensor, s: dict) -> torch.Tensor:
    """Llama 3.1 frequency-dependent scaling (long wavelengths slowed by ``factor``, smooth in between)."""
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv / factor + smooth * inv
    out = torch.where(wavelen > old_len / low, inv / factor, inv)
    middle = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(middle, blended, out)


def _rotate(x: torch.Tensor, positions: torch.Tensor, spec: RopeSpec, sign: float) -> torch.Tensor:
    if x.shape[-1] != spec.head_dim:
        raise ValueError(f"expected head_dim {spec.head_dim}, got {x.shape[-1]}")
    angles = positions.to(torch.float64)[..., None] * spec.inv_freq().to(x.device)
    cos, sin = angles.cos().to(torch.float32), (sign * angles.sin()).to(torch.float32)
    while cos.dim() < x.dim():  # positions [...tokens] broadcast over a heads dimension
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    half = spec.dim // 2
    xf = x.to(torch.float32)
    x1, x2, rest = xf[..., :half], xf[..., half : spec.dim], xf[..., spec.dim :]
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], -1)
    return out.to(x.dtype)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, spec: RopeSpec) -> torch.Tensor:
    """Rotate ``x`` ``[tokens, (heads,) head_dim]`` by the angles of ``positions`` ``[tokens]``."""
    return _rotate(x, positions, spec, 1.0)


def remove_rope(x: torch.Tensor, positions: torch.Tensor, spec: RopeSpec) -> torch.Tensor:
    """Inverse of :func:`apply_rope`."""
    return _rotate(x, positions, spec, -1.0)
