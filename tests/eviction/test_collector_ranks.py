"""Tensor parallelism splits a layer's heads over ranks; the reduction across ranks that the connector installs
(``compat.tensor_parallel_reduce``: the mean of the ranks' scores for the head mean, their max for the head max)
gives back the scores of one rank holding every head."""

import pytest
import torch

from nexusquant_vllm.attention import DensePages, LayerStep
from nexusquant_vllm.eviction import WindowAttentionScorer
from nexusquant_vllm.eviction.collector import ScoreCollector, ScoredRequest

HQ, HK, D, BLOCK, PROMPT = 8, 4, 32, 16, 96
COMBINE = {"mean": lambda a, b: (a + b) / 2, "max": torch.maximum}


def _scores(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: str) -> tuple[torch.Tensor, list[str]]:
    """One layer's block-choice scores over the given heads, and the head modes ``across_ranks`` was called with."""
    modes: list[str] = []

    def across_ranks(scores: torch.Tensor, mode: str) -> torch.Tensor:
        modes.append(mode)
        return scores

    collector = ScoreCollector(WindowAttentionScorer(window=32), across_ranks=across_ranks)
    collector.plan_step([ScoredRequest("r", 0, 0, PROMPT, [], BLOCK, heads)])
    pages = torch.zeros(1, k.shape[1], BLOCK, 2 * D)
    collector.observe(LayerStep(q, k, v, DensePages(D).reader(pages), D**-0.5, pages))
    return collector.take()["r"], modes


@pytest.mark.parametrize("heads", ["mean", "max"])
def test_two_ranks_reduced_equal_one_rank(heads):
    q = torch.randn(PROMPT, HQ, D)
    k, v = torch.randn(2, PROMPT, HK, D)
    full, modes = _scores(q, k, v, heads)
    assert modes == [heads]
    half_q, half_k = HQ // 2, HK // 2  # each rank: its query heads and the KV heads they read
    rank0, _ = _scores(q[:, :half_q], k[:, :half_k], v[:, :half_k], heads)
    rank1, _ = _scores(q[:, half_q:], k[:, half_k:], v[:, half_k:], heads)
    torch.testing.assert_close(COMBINE[heads](rank0, rank1), full)
    assert not torch.allclose(rank0 + rank1, full)  # a plain sum of the ranks (the old aggregation) is not it
