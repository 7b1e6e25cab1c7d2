"""The worker-side score collector (pure torch): scoring a prompt whose earlier chunks are read back from pages must
equal scoring the whole prompt at once with the same scorer, summed over layers."""

import pytest
import torch

from nexusquant_vllm.eviction import WindowAttentionScorer
from nexusquant_vllm.vllm_glue.eviction.scores import ScoreCollector, ScoredRequest


def fake_pages(keys: torch.Tensor, block_size: int):
    """A page reader over one request's keys ``[Hk, tokens, D]`` laid out in blocks 0, 1, ... (values unused)."""
    hk, tokens, d = keys.shape
    pages = torch.nn.functional.pad(keys, (0, 0, 0, -tokens % block_size)).view(hk, -1, block_size, d)

    def read(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return pages[:, ids], torch.zeros_like(pages[:, ids])

    return read


@pytest.mark.parametrize("cached", [0, 16, 24, 36])
def test_collector_chunked_prompt_equals_whole_prompt(cached):
    gen = torch.Generator().manual_seed(3)
    tokens, block_size, layers = 40, 8, 3
    scorer = WindowAttentionScorer(window=6, pool=3)
    collector = ScoreCollector(scorer)
    collector.plan_step([ScoredRequest("r", token_start=2, num_cached=cached, num_prompt=tokens,
                                       block_ids=list(range(5)), block_size=block_size)])
    expected = torch.zeros(tokens)
    window = min(6, tokens - cached)  # only this step's prompt queries vote
    for _ in range(layers):
        queries, keys = torch.randn(4, tokens, 8, generator=gen), torch.randn(2, tokens, 8, generator=gen)
        # this step's flat batch: 2 rows of another request, then the prompt tokens computed now
        step_q = torch.cat([torch.randn(2, 4, 8, generator=gen), queries[:, cached:].transpose(0, 1)])
        step_k = torch.cat([torch.randn(2, 2, 8, generator=gen), keys[:, cached:].transpose(0, 1)])
        collector.observe(step_q, step_k, fake_pages(keys, block_size), 0.3)
        expected += WindowAttentionScorer(window=window, pool=3).score(queries, keys, 0.3)
    got = collector.take()["r"]
    assert torch.allclose(got, expected, atol=1e-5)
    assert collector.take() == {}
