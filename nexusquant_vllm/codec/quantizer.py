"""Scale + multi-stage E8 vector quantization of rotated vectors (one fp16 scale per vector).

    bits  stages (codebook, step)                  bits per 8-dim group
    2     E8P                                      16
    3     E8P, then RES8 x 0.5 on the residual     16 + 8
    4     E8P, then E8P x 0.25 on the residual     16 + 16

Stage 1 is the exact nearest E8P point, except at 3 bits, where the 4 best stage-1 candidates are each completed
with their nearest RES8 point and the best pair is kept (beam search: -8% MSE vs greedy, measured).

Scale rule (chosen by measured distortion, ``benchmarks/codec_distortion.py``): the vector is coded at a few
candidate search scales ``rms(x) * c``; for each, the stored scale is refit by least squares,
``s = <x, c> / <c, c>`` for the decoded codeword c (free: the decoder multiplies by whatever scale is stored); the
candidate with the lowest error is kept. Max-abs scaling measured worse. The constants were measured on N(0, 1)
data and on SmolLM2's keys (which are lighter-tailed than Gaussian, so they favour slightly smaller scales).

Values whose scale exceeds fp16's range saturate at 65504 (documented, not an error); a zero vector decodes to zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from nexusquant_vllm.codec.e8 import e8p_candidates, e8p_encode, e8p_table, res8_encode, res8_table
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
    3: (Stage(step=1.0, **_E8P), Stage(step=0.5, **_RES8)),
    4: (Stage(step=1.0, **_E8P), Stage(step=0.25, **_E8P)),
}
# candidate rms multipliers of the search scale, per bits
SCALE_C: dict[int, tuple[float, ...]] = {2: (0.85, 0.95, 1.05), 3: (0.9, 1.0, 1.1), 4: (1.0, 1.1, 1.2)}
# stage-1 candidates searched jointly with stage 2 (1 = greedy)
BEAM: dict[int, int] = {2: 1, 3: 4, 4: 1}


def check_finite(x: torch.Tensor) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError("E8 codec input contains NaN or inf; refusing to encode it")


def _greedy_codes(unit: torch.Tensor, bits: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Greedy residual coding of ``unit`` ``[n, 8]`` -> (int64 index per stage, the decoded sum ``[n, 8]``)."""
    residual, decoded, codes = unit, torch.zeros_like(unit), []
    for stage in STAGES[bits]:
        index = stage.encode(residual / stage.step).long()
        point = stage.table(unit.device)[index] * stage.step
        codes.append(index)
        decoded = decoded + point
        residual = residual - point
    return codes, decoded


def _beam_codes(unit: torch.Tensor, bits: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Two-stage coding with ``BEAM[bits]`` stage-1 candidates, each completed greedily; the best pair wins."""
    first, second = STAGES[bits]
    candidates = e8p_candidates(unit, BEAM[bits])  # [n, beam]
    point1 = first.table(unit.device)[candidates] * first.step  # [n, beam, 8]
    residual = (unit[:, None, :] - point1).flatten(0, 1)
    index2 = second.encode(residual / second.step).long().view_as(candidates)
    decoded = point1 + second.table(unit.device)[index2] * second.step
    best = ((unit[:, None, :] - decoded) ** 2).sum(-1).argmin(-1, keepdim=True)
    pick = lambda t: t.gather(1, best).squeeze(1)  # noqa: E731
    return [pick(candidates), pick(index2)], decoded.gather(1, best[..., None].expand(-1, 1, 8)).squeeze(1)


def _code_at_scale(x: torch.Tensor, unit_scale: torch.Tensor, bits: int, refit_scale: bool):
    """Code ``x`` ``[n, d]`` searched at ``unit_scale`` ``[n, 1]`` -> (codes, stored scale, squared error)."""
    n, d = x.shape
    unit = (x / unit_scale).reshape(-1, GROUP)
    codes, decoded = (_beam_codes if BEAM[bits] > 1 else _greedy_codes)(unit, bits)
    decoded = decoded.reshape(n, d)
    scale = unit_scale
    if refit_scale:
        fitted = (x * decoded).sum(-1, keepdim=True) / (decoded * decoded).sum(-1, keepdim=True)
        scale = torch.where(fitted > 0, fitted, unit_scale)
    scale = scale.clamp_max(FP16_MAX).to(torch.float16)
    error = ((x - decoded * scale.to(torch.float32)) ** 2).sum(-1)
    return [c.reshape(n, d // GROUP) for c in codes], scale.squeeze(-1), error


def quantize(
    x: torch.Tensor, bits: int, refit_scale: bool = True, unit_scale: torch.Tensor | None = None
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Code rotated vectors ``x`` ``[..., d]`` -> (per stage int64 indices ``[..., d/8]``, fp16 scale ``[...]``).

    ``unit_scale`` ``[..., 1]`` replaces the candidate search scales ``rms * c`` (for scale-rule measurements).
    """
    check_bits(bits)
    lead, d = x.shape[:-1], x.shape[-1]
    x = x.to(torch.float32).reshape(-1, d)
    if unit_scale is None:
        rms = x.pow(2).mean(-1, keepdim=True).sqrt()
        searched = torch.stack([rms * c for c in SCALE_C[bits]])  # [m, n, 1]
    else:
        searched = unit_scale.to(torch.float32).reshape(1, -1, 1)
    # All m candidate scales are coded in one batch of m*n vectors (m times fewer kernel launches: what a decode
    # step, with a handful of vectors per layer, pays for); each vector keeps the candidate with the lowest error.
    m, n = searched.shape[0], x.shape[0]
    codes, scale, error = _code_at_scale(
        x.repeat(m, 1), searched.reshape(m * n, 1).clamp_min(_TINY), bits, refit_scale
    )
    best = error.view(m, n).argmin(0)  # first minimum: ties keep the earlier candidate
    rows = best * n + torch.arange(n, device=x.device)
    best_codes, best_scale = [c[rows] for c in codes], scale[rows]
    return [c.reshape(*lead, d // GROUP) for c in best_codes], best_scale.reshape(lead)


def dequantize(codes: list[torch.Tensor], scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`quantize`: float32 rotated vectors ``[..., d]``."""
    check_bits(bits)
    unit = sum(
        stage.table(c.device)[c.long()] * stage.step for stage, c in zip(STAGES[bits], codes, strict=True)
    )
    unit = unit.flatten(-2)
    return unit * scale.to(torch.float32)[..., None]
