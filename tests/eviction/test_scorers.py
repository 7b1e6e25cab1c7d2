"""Token-importance scorers (pure torch): the block-mass head reduction against a naive loop, and the worker-side
collector, whose chunked scoring (earlier prompt chunks read back from pages) must equal scoring the whole prompt."""

import pytest
import torch

from nexusquant_vllm.eviction import WindowAttentionScorer, heads_for_rate
from nexusquant_vllm.eviction.scorers import MASS_MAX_MIN_RATE, block_mass_max, window_attention
from nexusquant_vllm.eviction.compaction import compact_blocks, compaction_scores, fact_guard, span_positions
from nexusquant_vllm.eviction.expected import Rope, expected_scores
from nexusquant_vllm.attention import LayerStep
from nexusquant_vllm.eviction import collector as collector_module
from nexusquant_vllm.eviction.collector import FOCUS, ExpectedAttentionHeads, ScoreCollector, ScoredRequest


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


def fake_pages(keys: torch.Tensor, block_size: int, values: torch.Tensor | None = None):
    """A page reader over one request's keys and values ``[Hk, tokens, D]`` laid out in blocks 0, 1, ..."""
    hk, tokens, d = keys.shape
    values = torch.zeros_like(keys) if values is None else values
    k, v = (torch.nn.functional.pad(x, (0, 0, 0, -tokens % block_size)).view(hk, -1, block_size, d)
            for x in (keys, values))

    def read(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return k[:, ids], v[:, ids]

    return read


def step_rows(other: torch.Tensor, prompt: torch.Tensor, cached: int) -> torch.Tensor:
    """A step's flat batch: rows of another request, then this prompt's tokens computed now ([H, P, D] -> rows)."""
    return torch.cat([other, prompt[:, cached:].transpose(0, 1)])


def layer_step(q, k, v, keys, values, block_size, kv_cache=None) -> LayerStep:
    cache = torch.zeros(0) if kv_cache is None else kv_cache
    return LayerStep(q, k, v, fake_pages(keys, block_size, values), 0.3, cache)


@pytest.mark.parametrize("key_chunk", [2048, 8], ids=["one-read", "block-by-block"])
@pytest.mark.parametrize("heads", ["mean", "max"])
@pytest.mark.parametrize("cached", [0, 16, 24, 36])
def test_collector_chunked_prompt_equals_whole_prompt(heads, cached, key_chunk, monkeypatch):
    monkeypatch.setattr(collector_module, "KEY_CHUNK", key_chunk)
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
        step_q = step_rows(torch.randn(2, 4, 8, generator=gen), queries, cached)
        step_k = step_rows(torch.randn(2, 2, 8, generator=gen), keys, cached)
        collector.observe(layer_step(step_q, step_k, torch.zeros_like(step_k), keys, None, block_size))
        expected += scorer.score(queries, keys, 0.3, block_size=block_size)
    got = collector.take()["r"]
    assert torch.allclose(got, expected, atol=1e-5)
    assert collector.take() == {}
    assert collector.compactions == {}  # no head scorer: nothing kept for compaction


@pytest.mark.parametrize("key_chunk", [2048, 8], ids=["one-read", "block-by-block"])
@pytest.mark.parametrize("cached", [0, 16, 36])
def test_collector_compacts_each_layer_with_its_own_scores(cached, key_chunk, monkeypatch):
    """Per layer: expected-attention scores of the whole prompt (last ``window`` queries of the head scorer) plus its window
    attention, then ``compact`` rewrites that layer's cache exactly like compact_blocks with those scores, and
    forgets them."""
    monkeypatch.setattr(collector_module, "KEY_CHUNK", key_chunk)
    gen = torch.Generator().manual_seed(5)
    tokens, block_size, layers, d = 40, 8, 2, 8
    inv_freq = 100.0 ** (-torch.arange(0, d, 2) / d)
    angles = torch.arange(256)[:, None] * inv_freq
    rope = Rope(angles.cos(), angles.sin())
    collector = ScoreCollector(WindowAttentionScorer(window=6, pool=3), ExpectedAttentionHeads(rope, window=4))
    collector.plan_step([ScoredRequest("r", token_start=2, num_cached=cached, num_prompt=tokens,
                                       block_ids=list(range(5)), block_size=block_size)])
    window = min(6, tokens - cached)
    caches, wants, per_layer, facts = [], [], [], []
    for _ in range(layers):
        queries, keys, values = (torch.randn(h, tokens, d, generator=gen) for h in (4, 2, 2))
        cache = torch.randn(6, 2, block_size, 3, generator=gen)
        q, k, v = (step_rows(torch.randn(2, x.shape[0], d, generator=gen), x, cached) for x in (queries, keys, values))
        collector.observe(layer_step(q, k, v, keys, values, block_size, cache))
        expected = expected_scores(queries[:, -4:], torch.arange(tokens - 4, tokens), keys, values, 0.3, rope)
        per_layer.append(compaction_scores(expected, window_attention(queries, keys, 0.3, window)))
        facts.append(window_attention(queries, keys, 0.3, min(FOCUS, window)).amax(0))  # a short window: no contrast
        caches.append(cache)
        wants.append(cache.clone())
    physical, span, targets = torch.tensor([5, 4, 3, 2, 1]), torch.tensor([1, 2, 3]), torch.tensor([1, 3])
    guard = fact_guard(sum(facts), span_positions(span, block_size), 2 * block_size)
    assert guard.sum() == 2  # int(0.125 * 16)
    for want, scores in zip(wants, per_layer):
        compact_blocks(want, scores, physical, span, targets, guard)
    collector.compact("r", physical.tolist(), span.tolist(), targets.tolist())
    for cache, want in zip(caches, wants):
        assert torch.allclose(cache, want)
    assert collector.compactions == collector.fact_scores == {}


def test_guard_scores_what_the_prompts_last_queries_attend_beyond_the_window():
    """With a window longer than twice ``FOCUS``, a token's guard score is, per layer, the most any query head's last
    ``FOCUS`` queries attend it beyond that head's window mean (summed over layers); a request that evicts nothing
    drops it."""
    gen = torch.Generator().manual_seed(8)
    tokens, d = 48, 8
    collector = ScoreCollector(WindowAttentionScorer(window=16), lambda layer: torch.zeros(2, layer.num_prompt))
    collector.plan_step([ScoredRequest("r", 0, 0, tokens, [0] * 6, 8)])
    want = torch.zeros(tokens)
    for _ in range(2):
        queries, keys, values = (torch.randn(h, tokens, d, generator=gen) for h in (4, 2, 2))
        q, k, v = (x.transpose(0, 1) for x in (queries, keys, values))
        collector.observe(LayerStep(q, k, v, lambda ids: None, 0.3, torch.zeros(6, 2, 8, 3)))
        focus, window = (window_attention(queries, keys, 0.3, w) for w in (FOCUS, 16))
        want += (focus - window).clamp(min=0).amax(0)
    assert torch.allclose(collector.fact_scores["r"], want, atol=1e-6)
    collector.drop(["r"])
    assert collector.fact_scores == collector.compactions == {}


def test_head_reduction_follows_the_rate():
    assert heads_for_rate(0.35) == "mean" and heads_for_rate(MASS_MAX_MIN_RATE) == "max" and heads_for_rate(0.8) == "max"
