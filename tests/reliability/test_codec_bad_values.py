"""NaN, inf, huge and tiny values fed to the codec, its native CPU encoder and the Triton store: a defined result,
never a crash inside a kernel.

Documented behaviour (codec/kv.py, codec/quantizer.py): with validation (the default of ``encode_kv``) NaN/inf is a
``ValueError`` before any kernel runs; on the unvalidated hot path (vLLM's store) a vector holding NaN decodes to
NaN; finite values of any size never make a non-finite result: a scale beyond fp16 saturates at 65504 and a scale
below fp16's range decodes to zero (relative error <= 1 either way).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Read by triton.jit when a kernel is defined: before nexusquant_vllm.kernels is imported (as tests/kernels does).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from nexusquant_vllm import native  # noqa: E402
from nexusquant_vllm.codec import E8_DTYPES, decode_kv, encode_kv, get_format  # noqa: E402

NON_FINITE = [float("nan"), float("inf"), -float("inf")]
ENCODERS = [pytest.param(encode_kv, id="torch"), pytest.param(native.encode_kv, id="native", marks=pytest.mark.skipif(
    not native.available(), reason="native encoder not built"))]
FINITE_EXTREMES = {
    "fp32 max": torch.finfo(torch.float32).max,
    "bf16 max": torch.finfo(torch.bfloat16).max,
    "1e30": 1e30,
    "fp16 max": 65504.0,
    "1e-30": 1e-30,
    "fp32 tiny": torch.finfo(torch.float32).tiny,
}


@pytest.mark.parametrize("encode", ENCODERS)
@pytest.mark.parametrize("name", E8_DTYPES)
@pytest.mark.parametrize("bad", NON_FINITE)
@pytest.mark.parametrize("where", ["key", "value"])
def test_validated_encode_refuses_non_finite(encode, name, bad, where):
    fmt = get_format(name, 64)
    kv = {"key": torch.randn(3, 2, 64), "value": torch.randn(3, 2, 64)}
    kv[where][2, 1, 17] = bad
    with pytest.raises(ValueError, match=r"^E8 codec input contains NaN or inf; refusing to encode it$"):
        encode(kv["key"], kv["value"], fmt)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_validated_encode_refuses_non_finite_half_inputs(dtype):
    key = torch.randn(2, 64).to(dtype)
    key[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        encode_kv(key, key, get_format("e8-k3v2", 64))


@pytest.mark.parametrize("encode", ENCODERS)
@pytest.mark.parametrize("name", E8_DTYPES)
def test_unvalidated_nan_decodes_to_nan_in_that_vector_only(encode, name):
    fmt = get_format(name, 64)
    key, value = torch.randn(4, 64), torch.randn(4, 64)
    bad_key = key.clone()
    bad_key[1, 5] = float("nan")
    slots = encode(bad_key, value, fmt, validate=False)
    k, v = decode_kv(slots, fmt)
    assert torch.isnan(k[1]).all()
    clean = encode(key, value, fmt)
    rows = [0, 2, 3]
    assert torch.equal(slots[rows, : fmt.k_code_bytes], clean[rows, : fmt.k_code_bytes])
    assert torch.equal(slots[:, fmt.k_code_bytes : fmt.k_scale_offset], clean[:, fmt.k_code_bytes : fmt.k_scale_offset])
    assert torch.isfinite(v).all() and torch.isfinite(k[rows]).all()


@pytest.mark.parametrize("encode", ENCODERS)
def test_unvalidated_single_inf_decodes_to_nan(encode):
    fmt = get_format("e8-k3v2", 64)
    key = torch.randn(2, 64)
    key[1, 5] = float("inf")
    k, _ = decode_kv(encode(key, key, fmt, validate=False), fmt)
    assert torch.isnan(k[1]).all()


@pytest.mark.parametrize("encode", ENCODERS)
@pytest.mark.parametrize("magnitude", FINITE_EXTREMES.values(), ids=FINITE_EXTREMES.keys())
def test_finite_extremes_give_finite_output_and_bounded_error(encode, magnitude):
    """Every element at the magnitude (random signs), and one such element among N(0, 1) values."""
    fmt = get_format("e8-k3v2", 64)
    gen = torch.Generator().manual_seed(0)
    flat = torch.randn(2, 64, generator=gen).sign() * magnitude
    spike = torch.randn(2, 64, generator=gen)
    spike[:, 9] = magnitude
    for x in (flat, spike):
        k, v = decode_kv(encode(x, x, fmt), fmt)
        assert torch.isfinite(k).all() and torch.isfinite(v).all()
        err = ((x.double() - k.double()) ** 2).sum(-1) / (x.double() ** 2).sum(-1)
        assert (err <= 1 + 1e-4).all(), err


def test_scale_saturates_at_fp16_max():
    from nexusquant_vllm.codec.kv import split_slots

    fmt = get_format("e8-k3v2", 64)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1)) * 1e30
    _, _, k_scale, v_scale = split_slots(encode_kv(x, x, fmt), fmt)
    assert (k_scale == 65504).all() and (v_scale == 65504).all()


def _interpreted() -> bool:
    from nexusquant_vllm.kernels import store

    return torch.cuda.is_available() or type(store._scatter_rows_kernel).__name__ == "InterpretedFunction"


def test_triton_store_of_nan_inf_and_huge_rows():
    """The fused Triton store: each row lands at its slot with the codec's bytes, except that a non-finite vector's
    codes are arbitrary (the kernel codes it as zero, the codec as whatever its search makes of NaN): there only
    the NaN scale must match. Padding rows (slot -1) leave the cache untouched."""
    if not _interpreted():
        pytest.skip("nexusquant_vllm.kernels was imported before TRITON_INTERPRET=1 was set; run this file alone")
    from nexusquant_vllm.kernels.store import store_kv

    device = "cuda" if torch.cuda.is_available() else "cpu"
    fmt = get_format("e8-k3v2", 64)
    key = torch.randn(5, 2, 64)
    key[0, 1, 3] = float("nan")
    key[1, 0, :] = float("inf")
    key[2] = 1e30
    key[4, 0, 0] = float("nan")  # a padding row
    value = torch.randn(5, 2, 64)
    cache = torch.full((4, 2, 16, fmt.slot_bytes), 7, dtype=torch.uint8, device=device)
    slots = torch.tensor([3, 17, 40, 63, -1], dtype=torch.int64, device=device)
    store_kv(key.to(device), value.to(device), cache, slots, fmt)
    expected = encode_kv(key, value, fmt, validate=False)
    flat = cache.cpu().permute(0, 2, 1, 3).reshape(64, 2, fmt.slot_bytes)  # [block * 16 + offset, head, bytes]
    stored = flat[[3, 17, 40, 63]]
    nonfinite = torch.zeros(4, 2, dtype=torch.bool)
    nonfinite[0, 1] = nonfinite[1, 0] = True
    assert torch.equal(stored[~nonfinite], expected[:4][~nonfinite])
    assert torch.equal(stored[nonfinite][:, fmt.k_code_bytes:], expected[:4][nonfinite][:, fmt.k_code_bytes:])
    untouched = torch.ones(64, dtype=torch.bool)
    untouched[[3, 17, 40, 63]] = False
    assert (flat[untouched] == 7).all()
    k, _ = decode_kv(flat[[3, 17, 40]], fmt)
    assert torch.isnan(k[0, 1]).all() and torch.isnan(k[1, 0]).all() and torch.isfinite(k[2]).all()
