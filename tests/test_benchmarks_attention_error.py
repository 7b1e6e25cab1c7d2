import math

import torch

from benchmarks import attention_error as ae
from nexusquant_vllm.codec import quantizer
from nexusquant_vllm.codec.e8 import res8_table


def test_cached_mask_marks_earlier_chunks_only() -> None:
    mask = ae.cached_mask(8, 4)
    assert not mask[:4].any()  # the first chunk reads no cache
    assert mask[4, :4].all() and not mask[4, 4:].any()  # chunk 2 reads chunk 1 from the cache, itself raw
    assert mask[7].tolist() == [True] * 4 + [False] * 4


def test_attention_without_quantization_is_causal_softmax() -> None:
    q, k, v = torch.randn(3, 2, 6, 8).unbind(0)
    cached = ae.cached_mask(6, 2)[2:]
    p = ae.attention_probs(q, k, k, cached, first_query=2)  # k_hat == k: nothing changes
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)[:, 2:]
    assert torch.allclose(ae.attention_output(p, v, v, cached), expected, atol=1e-5)
    assert torch.allclose(p.sum(-1), torch.ones(2, 4))
    assert ae.kl_sum(p, p) == 0.0


def test_cached_keys_and_values_are_the_only_ones_replaced() -> None:
    q, k, v = torch.randn(3, 1, 4, 8).unbind(0)
    cached = ae.cached_mask(4, 2)[2:]
    garbage = torch.full_like(k, 1e3)
    p = ae.attention_probs(q, k, k, cached, 2)
    out = ae.attention_output(p, v, garbage, cached)
    assert torch.allclose(out, (p * cached) @ garbage + (p * ~cached) @ v)
    assert not torch.allclose(ae.attention_probs(q, k, garbage, cached, 2), p)


def test_bias_share_separates_shared_from_independent_errors() -> None:
    shared = torch.ones(2, 100, 4)
    bias, total = ae.bias_share(shared)
    assert math.isclose(bias / total, 1.0, rel_tol=1e-6)
    noise = torch.randn(2, 10_000, 4)
    bias, total = ae.bias_share(noise)
    assert bias / total * 10_000 < 3  # ~1 for independent zero-mean errors


def test_coherence_is_one_for_a_single_token_and_grows_with_shared_errors() -> None:
    p = torch.softmax(torch.randn(1, 5, 50), -1)
    coherent, independent = ae.coherence(p, torch.ones(1, 50, 4))
    assert coherent / independent > 5
    one_hot = torch.zeros(1, 5, 50)
    one_hot[..., 3] = 1
    coherent, independent = ae.coherence(one_hot, torch.randn(1, 50, 4))
    assert math.isclose(coherent, independent, rel_tol=1e-5)


def test_symmetric_res8_is_antipodal_and_only_reshuffles_the_outer_shell() -> None:
    table = ae.symmetric_res8_table()
    assert table.shape == res8_table().shape
    rows = {tuple(r) for r in table.tolist()}
    assert len(rows) == 256 and all(tuple(-v for v in r) in rows for r in rows)
    assert torch.allclose((table**2).sum(-1).sort().values, (res8_table() ** 2).sum(-1).sort().values)


def test_res8_swap_is_temporary_and_changes_only_3_bits() -> None:
    x = torch.randn(64, 64)
    before = ae.e8_roundtrip(x, 3)
    sym3, sym2 = ae.e8sym_roundtrip(x, 3), ae.e8sym_roundtrip(x, 2)
    assert quantizer.STAGES[3][1].table("cpu").equal(res8_table())
    assert torch.equal(ae.e8_roundtrip(x, 3), before)
    assert torch.equal(sym2, ae.e8_roundtrip(x, 2))
    assert not torch.equal(sym3, before)
    assert ((sym3 - x) ** 2).mean() < ((ae.scalar_roundtrip(x, 3) - x) ** 2).mean()
