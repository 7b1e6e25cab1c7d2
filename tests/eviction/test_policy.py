import math

import pytest
import torch

from nexusquant_vllm.eviction import PRESETS, EvictionPolicy, WindowAttentionScorer, blocks_to_free, parse_rate


@pytest.mark.parametrize("value,rate", [("lossless", 0.0), ("Balanced", 0.6), ("aggressive", 0.8), (0.35, 0.35), ("0.5", 0.5), (0, 0.0)])
def test_parse_rate_accepts_presets_and_numbers(value, rate):
    assert parse_rate(value) == rate


@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5, float("nan"), "lots", True, None, [0.3], {"rate": 0.3}])
def test_parse_rate_rejects_with_field_name(value):
    with pytest.raises(ValueError, match="nq_eviction"):
        parse_rate(value, "nq_eviction")


def test_presets_are_ordered():
    assert list(PRESETS.values()) == sorted(PRESETS.values())


def scores_with_low_blocks(tokens: int, block_size: int, low: list[int]) -> torch.Tensor:
    scores = torch.ones(tokens)
    for block in low:
        scores[block * block_size : (block + 1) * block_size] = 0.01
    return scores


def test_frees_lowest_blocks_up_to_the_rate():
    policy = EvictionPolicy(rate=0.25, min_prompt_tokens=0)
    scores = scores_with_low_blocks(1024, 32, [3, 7, 11, 12, 20, 21, 22, 23, 25])
    freed = blocks_to_free(scores, 32, policy)
    assert len(freed) == math.floor(0.25 * 1024 / 32) == 8
    assert set(freed) <= {3, 7, 11, 12, 20, 21, 22, 23, 25}


def test_sink_recent_partial_and_protected_blocks_are_kept():
    policy = EvictionPolicy(rate=0.9, min_prompt_tokens=0, recent_tokens=40, protected=((200, 210),))
    tokens, block_size = 500, 32  # last block (480..500) is partial
    freed = blocks_to_free(torch.zeros(tokens), block_size, policy)
    assert 0 not in freed
    assert all((b + 1) * block_size <= tokens - 40 for b in freed)
    assert 6 not in freed  # 192..224 overlaps the protected range
    assert freed == [b for b in range(1, 14) if b != 6]


def test_one_important_token_keeps_its_block():
    scores = torch.full((512,), 0.1)
    scores[5 * 32 + 17] = 10.0  # a needle in block 5
    freed = blocks_to_free(scores, 32, EvictionPolicy(rate=0.8, min_prompt_tokens=0))
    assert 5 not in freed and len(freed) == 12


def test_short_prompts_and_lossless_evict_nothing():
    scores = torch.rand(1000)
    assert blocks_to_free(scores, 32, EvictionPolicy(rate=0.6, min_prompt_tokens=2000)) == []
    assert blocks_to_free(scores, 32, EvictionPolicy(rate=0.0, min_prompt_tokens=0)) == []


def test_invalid_policy_values():
    with pytest.raises(ValueError, match="rate"):
        EvictionPolicy(rate=1.2)
    with pytest.raises(ValueError, match="recent_tokens"):
        EvictionPolicy(recent_tokens=-1)
    with pytest.raises(ValueError, match="protected"):
        EvictionPolicy(protected=((10, 5),))


def naive_window_scores(queries, keys, scale, window):
    heads, tokens, _ = queries.shape
    group = heads // keys.shape[0]
    total = torch.zeros(tokens)
    for h in range(heads):
        for p in range(tokens - window, tokens):
            logits = torch.tensor([float(queries[h, p] @ keys[h // group, j]) * scale for j in range(p + 1)])
            total[: p + 1] += logits.softmax(0)
    return total / (heads * window)


def test_window_scorer_matches_naive_loop():
    gen = torch.Generator().manual_seed(0)
    queries, keys = torch.randn(6, 20, 8, generator=gen), torch.randn(2, 20, 8, generator=gen)
    got = WindowAttentionScorer(window=5, pool=1).score(queries, keys, 0.35)
    assert torch.allclose(got, naive_window_scores(queries, keys, 0.35, 5), atol=1e-5)
    assert float(got.sum()) == pytest.approx(1.0, abs=1e-5)


def test_window_scorer_pools_neighbours():
    gen = torch.Generator().manual_seed(1)
    queries, keys = torch.randn(3, 40, 8, generator=gen), torch.randn(3, 40, 8, generator=gen)
    raw = WindowAttentionScorer(window=8, pool=1).score(queries, keys, 0.3)
    pooled = WindowAttentionScorer(window=8, pool=3).score(queries, keys, 0.3)
    assert torch.allclose(pooled[10], raw[9:12].mean(), atol=1e-6)
    assert torch.allclose(pooled[0], raw[0:2].mean(), atol=1e-6)


def _eligible_naive(num_prompt_tokens, block_size, policy):
    keep_from = num_prompt_tokens - policy.recent_tokens
    out = []
    for block in range(policy.sink_blocks, num_prompt_tokens // block_size):
        start, end = block * block_size, (block + 1) * block_size
        if end > keep_from:
            break
        if not any(start < p_end and p_start < end for p_start, p_end in policy.protected):
            out.append(block)
    return out


@pytest.mark.parametrize("seed", range(20))
def test_eligible_blocks_equals_the_per_range_check(seed):
    """The difference-array version (O(blocks + ranges)) keeps the per-block, per-range overlap rule exactly: empty
    ranges inside a block, ranges on block edges, past the prompt, overlapping each other."""
    from nexusquant_vllm.eviction.policy import eligible_blocks

    gen = torch.Generator().manual_seed(seed)
    tokens, block = int(torch.randint(0, 700, (1,), generator=gen)), int(torch.tensor([8, 16, 32])[seed % 3])
    starts = torch.randint(0, 800, (int(torch.randint(0, 12, (1,), generator=gen)),), generator=gen)
    lengths = torch.randint(0, 3, starts.shape, generator=gen) * torch.randint(0, 90, starts.shape, generator=gen)
    ranges = tuple((int(s), int(s + n)) for s, n in zip(starts, lengths))
    policy = EvictionPolicy(rate=0.5, recent_tokens=int(seed * 7), sink_blocks=seed % 3, protected=ranges)
    assert eligible_blocks(tokens, block, policy) == _eligible_naive(tokens, block, policy)


@pytest.mark.parametrize("value", [-0.1, 1.0, True, "much", None])
def test_connector_refuses_a_bad_fact_guard_share(value):
    from nexusquant_vllm.vllm_glue.eviction import params

    assert params.fact_guard({}) == 0.125 and params.fact_guard({"fact_guard": 0}) == 0.0
    with pytest.raises(ValueError, match="fact_guard must be a number in \\[0, 1\\)"):
        params.fact_guard({"fact_guard": value})
