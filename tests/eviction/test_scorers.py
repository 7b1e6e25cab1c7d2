"""Token-importance scorers (pure torch): the block-mass head reduction against a naive loop, and the worker-side
collector, whose chunked scoring (earlier prompt chunks read back from pages) must equal scoring the whole prompt."""

import pytest
import torch

from nexusquant_vllm.eviction import WindowAttentionScorer, heads_for_rate
from nexusquant_vllm.eviction.scorers import MASS_MAX_MIN_RATE, block_mass_max
from nexusquant_vllm.vllm_glue.eviction.scores import ScoreCollector, ScoredRequest


def naive_head_attention(queries, keys, scale, window):
    """[heads, tokens]: each query head's causal softmax attention averaged over the last ``window`` queries."""
    heads, tokens, _ = queries.shape
    group = heads // keys.shape[0]
    out = torch.zeros(heads, tokens)
    for h in range(heads):
        for p in range(tokens - window, tokens):
            logits = torch.tensor([float(queries[h, p] @ keys[h // group, j]) * scale for j in range(p + 1)])
            out[h, : p + 1] += logits.softmax(0) / window
    return out


def test_block_mass_max_matches_naive_loop():
    gen = torch.Generator().manual_seed(2)
    queries, keys = torch.randn(6, 45, 8, generator=gen), torch.randn(2, 45, 8, generator=gen)
    got = WindowAttentionScorer(window=7, heads="max").score(queries, keys, 0.4, block_size=8)
    per_head = naive_head_attention(queries, keys, 0.4, 7)
    for block in range(6):  # 5 full blocks and the partial one (40..45)
        tokens = slice(block * 8, min(block * 8 + 8, 45))
        expected = per_head[:, tokens].sum(1).max()
        assert torch.allclose(got[tokens], expected.expand(got[tokens].shape[0]), atol=1e-5)


def test_block_mass_max_keeps_a_block_that_one_head_needs():
    """A block attended by a single head outranks one that every head attends a little (mean would not)."""
    per_head = torch.full((4, 64), 1.0 / 64)
    per_head[0] = 0.0
    per_head[0, 40:48] = 1.0 / 8  # head 0 looks only at block 5

    scores = block_mass_max(per_head, 8)
    assert scores.shape == (64,)
    assert float(scores[40]) == pytest.approx(1.0) and float(scores[0]) == pytest.approx(8 / 64)


def test_invalid_scorer_settings():
    with pytest.raises(ValueError, match="heads"):
        WindowAttentionScorer(heads="median")
    with pytest.raises(ValueError, match="block_size"):
        WindowAttentionScorer(heads="max").score(torch.zeros(2, 10, 4), torch.zeros(1, 10, 4), 1.0)


def fake_pages(keys: torch.Tensor, block_size: int):
    """A page reader over one request's keys ``[Hk, tokens, D]`` laid out in blocks 0, 1, ... (values unused)."""
    hk, tokens, d = keys.shape
    pages = torch.nn.functional.pad(keys, (0, 0, 0, -tokens % block_size)).view(hk, -1, block_size, d)

    def read(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return pages[:, ids], torch.zeros_like(pages[:, ids])

    return read


@pytest.mark.parametrize("heads", ["mean", "max"])
@pytest.mark.parametrize("cached", [0, 16, 24, 36])
def test_collector_chunked_prompt_equals_whole_prompt(heads, cached):
    gen = torch.Generator().manual_seed(3)
    tokens, block_size, layers = 40, 8, 3
    collector = ScoreCollector(WindowAttentionScorer(window=6, pool=3))
    collector.plan_step([ScoredRequest("r", token_start=2, num_cached=cached, num_prompt=tokens,
                                       block_ids=list(range(5)), block_size=block_size, heads=heads)])
    # only this step's prompt queries vote; the request's head reduction overrides the collector's default
    scorer = WindowAttentionScorer(window=min(6, tokens - cached), pool=3, heads=heads)
    expected = torch.zeros(tokens)
    for _ in range(layers):
        queries, keys = torch.randn(4, tokens, 8, generator=gen), torch.randn(2, tokens, 8, generator=gen)
        # this step's flat batch: 2 rows of another request, then the prompt tokens computed now
        step_q = torch.cat([torch.randn(2, 4, 8, generator=gen), queries[:, cached:].transpose(0, 1)])
        step_k = torch.cat([torch.randn(2, 2, 8, generator=gen), keys[:, cached:].transpose(0, 1)])
        collector.observe(step_q, step_k, fake_pages(keys, block_size), 0.3)
        expected += scorer.score(queries, keys, 0.3, block_size=block_size)
    got = collector.take()["r"]
    assert torch.allclose(got, expected, atol=1e-5)
    assert collector.take() == {}


def test_head_reduction_follows_the_rate():
    assert heads_for_rate(0.35) == "mean" and heads_for_rate(MASS_MAX_MIN_RATE) == "max" and heads_for_rate(0.8) == "max"
