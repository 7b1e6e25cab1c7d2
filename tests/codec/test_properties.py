"""Property tests (hypothesis) of the codec: the round-trip error bound, packing as a bijection, determinism.

Error bounds, as relative squared error per vector ``|x - x^|^2 / |x|^2``:

* **Any finite input: <= 1**, i.e. never worse than decoding to zero. Derived, not measured: the stored scale is the
  least-squares fit ``s = <x, c> / <c, c>`` of the decoded codeword c, which leaves the error
  ``|x|^2 - <x, c>^2 / |c|^2 <= |x|^2``; rounding ``s`` to fp16 (nearest, so ``s' in [0, 2s]``) or saturating it at
  65504 (``s' < s``) adds ``(s - s')^2 |c|^2 <= s^2 |c|^2 = <x, c>^2 / |c|^2``, so the sum stays ``<= |x|^2``. A
  zero vector decodes to exactly zero.
* **Inputs at a KV scale (rms in [1e-3, 1e4]): <= ``SPREAD_BOUND[bits]``**. E8P is a ball-shaped piece of the lattice
  (patterns of norm^2 <= 10 around an rms-sized search scale), so it has no worst-case covering guarantee for a group
  that holds most of a vector's energy: those groups overload. The bounds are the measured worst case over
  adversarial families (one-hot and few-coordinate vectors in the rotated domain, one loaded group, per-channel scales
  over six decades, Cauchy tails, sparse vectors; 2,000 vectors each at head_dim 64 and 80) -- 0.455 / 0.227 /
  0.143 at 2 / 3 / 4 bits -- with a 30% margin. Gaussian data averages 0.087 / 0.025 / 0.007 (README).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from nexusquant_vllm.codec import decode_vectors_rotated, encode_vectors, rotate, unrotate
from nexusquant_vllm.codec.packing import pack_codes, unpack_codes
from nexusquant_vllm.codec.quantizer import STAGES
from nexusquant_vllm.codec.quantizer import quantize as reference_quantize

BITS = (2, 3, 4)
HEAD_DIMS = (64, 80, 128)  # 80: block-diagonal rotation (64 + 16)
SPREAD_BOUND = {2: 0.60, 3: 0.30, 4: 0.19}
# float32 accumulation in the encoder and the decoder; far below any bound here
ROUND_OFF = 1e-4

FAST = settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def round_trip(x: torch.Tensor, bits: int) -> torch.Tensor:
    codes, scale = encode_vectors(x, bits)
    return unrotate(decode_vectors_rotated(codes, scale, bits))


def rel_error(x: torch.Tensor, estimate: torch.Tensor) -> torch.Tensor:
    """Per vector, in float64 (inputs near float32's range overflow a float32 norm)."""
    x, estimate = x.double(), estimate.double()
    return ((x - estimate) ** 2).sum(-1) / (x**2).sum(-1)


def structured(family: str, rows: int, d: int, log10_rms: float, seed: int) -> torch.Tensor:
    """Vectors of a shape the codec finds hard or typical, scaled to rms ``10**log10_rms``."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(rows, d, generator=gen, dtype=torch.float64)
    if family == "rotated_sparse":  # few coordinates in the rotated domain: the energy lands in few groups
        g = unrotate((g * (torch.rand(rows, d, generator=gen, dtype=torch.float64) < 0.05)).float()).double()
    elif family == "one_hot":
        g = torch.zeros(rows, d, dtype=torch.float64).scatter_(1, torch.randint(d, (rows, 1), generator=gen), 1.0)
    elif family == "channel_scales":  # per-channel magnitudes over six decades (outlier channels)
        g = g * torch.logspace(-3, 3, d, dtype=torch.float64)[torch.randperm(d, generator=gen)]
    elif family == "cauchy":
        g = torch.tan(torch.pi * (torch.rand(rows, d, generator=gen, dtype=torch.float64) - 0.5))
    elif family == "constant":
        g = g[:, :1].expand(rows, d)
    g = g + (g.abs().sum(-1, keepdim=True) == 0)  # no all-zero row (its relative error is 0/0)
    rms = g.pow(2).mean(-1, keepdim=True).sqrt()
    return (g / rms * 10**log10_rms).float()


FAMILIES = ("gaussian", "rotated_sparse", "one_hot", "channel_scales", "cauchy", "constant")


@FAST
@given(
    bits=st.sampled_from(BITS),
    d=st.sampled_from(HEAD_DIMS),
    x=st.integers(1, 4).flatmap(
        lambda rows: arrays("float32", (rows, 64), elements=st.floats(width=32, allow_nan=False, allow_infinity=False))
    ),
)
def test_any_finite_input_is_never_worse_than_zero(bits, d, x):
    x = torch.from_numpy(x).repeat(1, d // 64 + 1)[:, :d]
    estimate = round_trip(x, bits)
    assert torch.isfinite(estimate).all()
    nonzero = x.abs().sum(-1) > 0
    assert (rel_error(x, estimate)[nonzero] <= 1 + ROUND_OFF).all()
    assert (estimate[~nonzero] == 0).all()


@FAST
@given(
    bits=st.sampled_from(BITS),
    d=st.sampled_from(HEAD_DIMS),
    family=st.sampled_from(FAMILIES),
    log10_rms=st.floats(-3, 4),
    seed=st.integers(0, 2**31 - 1),
)
def test_error_at_kv_scales_within_the_bound(bits, d, family, log10_rms, seed):
    x = structured(family, 8, d, log10_rms, seed)
    err = rel_error(x, round_trip(x, bits))
    assert float(err.max()) <= SPREAD_BOUND[bits], (family, err.max())


@FAST
@given(bits=st.sampled_from(BITS), groups=st.integers(1, 32), lead=st.integers(1, 5), seed=st.integers(0, 2**31 - 1))
def test_packing_is_a_bijection(bits, groups, lead, seed):
    """unpack(pack(codes)) == codes for any codes in range, and pack(unpack(bytes)) == bytes for any bytes."""
    gen = torch.Generator().manual_seed(seed)
    codes = [torch.randint(0, 2**stage.index_bits, (lead, groups), generator=gen) for stage in STAGES[bits]]
    for stage, code in zip(STAGES[bits], codes):  # the extreme indices too
        code[0, 0], code[-1, -1] = 0, 2**stage.index_bits - 1
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (lead, groups * bits)
    assert all(torch.equal(a, b) for a, b in zip(unpack_codes(packed, bits), codes, strict=True))
    raw = torch.randint(0, 256, (lead, groups * bits), dtype=torch.uint8, generator=gen)
    assert torch.equal(pack_codes(unpack_codes(raw, bits), bits), raw)


def _quantizers() -> list:
    from nexusquant_vllm import native

    return [None, pytest.param(native.quantize, id="native", marks=pytest.mark.skipif(
        not native.available(), reason="native encoder not built"))]


@pytest.mark.parametrize("quantizer", _quantizers())
@FAST
@given(
    bits=st.sampled_from(BITS),
    d=st.sampled_from(HEAD_DIMS),
    family=st.sampled_from(FAMILIES),
    rows=st.integers(2, 12),
    seed=st.integers(0, 2**31 - 1),
)
def test_quantizer_bytes_alone_in_a_batch_and_repeated(quantizer, bits, d, family, rows, seed):
    """A rotated vector's codes and scale depend on that vector only: not on the call, nor on which other vectors
    share the batch (so a token gets the same bytes whether it is prefilled, recomputed or decoded)."""
    quantize = quantizer or reference_quantize
    x = rotate(structured(family, rows, d, 0.0, seed))
    codes, scale = quantize(x, bits)
    assert _equal(quantize(x.clone(), bits), (codes, scale))
    perm = torch.randperm(rows, generator=torch.Generator().manual_seed(seed))
    assert _equal(quantize(x[perm], bits), ([c[perm] for c in codes], scale[perm]))
    assert _equal(quantize(x[-1:], bits), ([c[-1:] for c in codes], scale[-1:]))


def _equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a[0], b[0], strict=True)) and torch.equal(a[1], b[1])


@FAST
@given(bits=st.sampled_from(BITS), d=st.sampled_from((64, 80)), family=st.sampled_from(FAMILIES),
       rows=st.integers(2, 12), seed=st.integers(0, 2**31 - 1))
def test_encoded_bytes_alone_and_in_a_batch(bits, d, family, rows, seed):
    """The whole encoder (rotation included) at the head_dims whose rotation is batch-invariant here; see below."""
    x = structured(family, rows, d, 0.0, seed)
    codes, scale = encode_vectors(x, bits)
    alone = encode_vectors(x[-1:], bits)
    assert torch.equal(alone[0], codes[-1:]) and torch.equal(alone[1], scale[-1:])


@pytest.mark.xfail(strict=True, reason="rotate() is a float32 matmul; at head_dim 128 the CPU BLAS rounds a lone row "
                   "differently from the same row in a batch (up to ~5e-7), which flips near-tie groups to another, "
                   "equally near codeword. A fixed-order Walsh-Hadamard butterfly would be batch-invariant.")
def test_rotation_is_batch_invariant_at_head_dim_128():
    x = structured("rotated_sparse", 4, 128, 0.0, 0)
    assert torch.equal(rotate(x)[:1], rotate(x[:1]))
    assert torch.equal(encode_vectors(x, 2)[0][:1], encode_vectors(x[:1], 2)[0])


@pytest.mark.parametrize("quantizer", _quantizers())
def test_same_bytes_in_a_batch_large_enough_to_be_split(quantizer):
    """Big batches take other paths (the native encoder splits them over threads; torch chunks its searches)."""
    quantize = quantizer or reference_quantize
    x = rotate(torch.randn(640, 64, generator=torch.Generator().manual_seed(3)))  # 40,960 elements; 5,120 groups
    codes, scale = quantize(x, 3)
    for rows in (slice(0, 1), slice(317, 330), slice(639, 640)):
        assert _equal(quantize(x[rows], 3), ([c[rows] for c in codes], scale[rows]))
