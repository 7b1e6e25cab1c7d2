"""Scale + multi-stage E8 vector quantization of rotated vectors (one fp16 scale per vector).

    bits  stages (codebook, step)                  bits per 8-dim group
    2     E8P                                      16
    3     E8P, then RES8 x 0.46 on the residual    16 + 8
    4     E8P, then E8P x 0.25 on the residual     16 + 16

Scale rule (chosen by measured distortion, ``benchmarks/codec_distortion.py``): the vector is divided by
``rms(x) * c_bits`` and coded greedily stage by stage; then the stored scale is refit by least squares,
``s = <x, c> / <c, c>`` for the decoded codeword c, which lowers the error for free since the decoder multiplies
by whatever scale is stored. The constants ``c_bits`` and the residual steps were measured on N(0, 1) data.

Values whose scale exceeds fp16's range saturate at 65504 (documented, not an error); a zero vector decodes to zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from nexusquant_vllm.codec.e8 import e8p_encode, e8p_table, res8_encode, res8_table
from nexusquant_vllm.codec.format import GROUP, check_bits

FP16_MAX = 65504.0
_TINY = 1e-30


@dataclass(frozen=True)
class Stage:
    """One residual stage: a codebook (encoder + decoding table) applied at ``step`` times the unit scale."""

    index_bits: int
    step: float
    encode: Callable[[torch.Tensor], torch.Tensor]
    table: Callable[[torch.device], torch.Tensor]


_E8P = dict(index_bits=16, encode=e8p_encode, table=e8p_table)
_RES8 = dict(index_bits=8, encode=res8_encode, table=res8_table)

STAGES: dict[int, tuple[Stage, ...]] = {
    2: (Stage(step=1.0, **_E8P),),
    3: (Stage(step=1.0, **_E8P), Stage(step=0.46, **_RES8)),
    4: (Stage(step=1.0, **_E8P), Stage(step=0.25, **_E8P)),
}
# rms multiplier of the unit scale used for the nearest-point search, per bits
SCALE_C: dict[int, float] = {2: 0.95, 3: 1.0, 4: 1.1}


def check_finite(x: torch.Tensor) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError("E8 codec input contains NaN or inf; refusing to encode it")


def _stage_codes(unit: torch.Tensor, bits: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Greedy residual coding of ``unit`` ``[n, 8]`` -> (int32 index per stage, the decoded sum ``[n, 8]``)."""
    residual, decoded, codes = unit, torch.zeros_like(unit), []
    for stage in STAGES[bits]:
        index = stage.encode(residual / stage.step)
        point = stage.table(unit.device)[index.long()] * stage.step
        codes.append(index)
        decoded = decoded + point
        residual = residual - point
    return codes, decoded


def quantize(x: torch.Tensor, bits: int, refit_scale: bool = True) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Code rotated vectors ``x`` ``[..., d]`` -> (per stage int32 indices ``[..., d/8]``, fp16 scale ``[...]``)."""
    check_bits(bits)
    lead, d = x.shape[:-1], x.shape[-1]
    x = x.to(torch.float32).reshape(-1, d)
    unit_scale = (x.pow(2).mean(-1, keepdim=True).sqrt() * SCALE_C[bits]).clamp_min(_TINY)
    codes, decoded = _stage_codes((x / unit_scale).reshape(-1, GROUP), bits)
    decoded = decoded.reshape(-1, d)
    scale = unit_scale
    if refit_scale:
        fitted = (x * decoded).sum(-1, keepdim=True) / (decoded * decoded).sum(-1, keepdim=True)
        scale = torch.where(fitted > 0, fitted, unit_scale)
    scale = scale.clamp_max(FP16_MAX).to(torch.float16).reshape(lead)
    return [c.reshape(*lead, d // GROUP) for c in codes], scale


def dequantize(codes: list[torch.Tensor], scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`quantize`: float32 rotated vectors ``[..., d]``."""
    check_bits(bits)
    unit = sum(
        stage.table(c.device)[c.long()] * stage.step for stage, c in zip(STAGES[bits], codes, strict=True)
    )
    unit = unit.flatten(-2)
    return unit * scale.to(torch.float32)[..., None]
