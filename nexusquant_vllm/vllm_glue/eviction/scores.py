"""Worker side: token-importance scores collected inside attention, during the step that finishes a prompt.

The eviction connector's worker half (``connector.py``) calls :meth:`ScoreCollector.plan_step` once per step with
the requests whose prompt prefill completes in that step; the attention backend then calls :func:`observe` in every
layer (E8 and protected boundary layers alike) with that step's queries and keys, in the same domain as the pages
its ``read_pages`` returns. For each planned request, the last ``window`` prompt queries (those in this step) are
scored against all its prompt keys (earlier chunks read back from the paged cache, this chunk raw) with
:class:`nexusquant_vllm.eviction.WindowAttentionScorer`, and the per-layer scores are summed. No extra forward pass.

Cost: one extra ``[window x prompt]`` score matrix per layer, once per request, plus re-reading the earlier prompt
chunks' pages when the prefill was chunked.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from nexusquant_vllm.eviction import WindowAttentionScorer
from nexusquant_vllm.vllm_glue.paged_attention import PageReader


@dataclass
class ScoredRequest:
    """A request whose prompt prefill ends in this step."""

    req_id: str
    token_start: int  # row of this request's first scheduled token in the flat batch
    num_cached: int  # prompt tokens computed in earlier steps (read from pages)
    num_prompt: int
    block_ids: list[int]  # physical blocks of the request (group 0), for the cached part
    block_size: int
    heads: str = "mean"  # the scorer's head reduction for this request's eviction rate


@dataclass
class ScoreCollector:
    """Per-step plan and the per-request score sums (float32 ``[num_prompt]``), handed to the connector."""

    scorer: WindowAttentionScorer
    plan: list[ScoredRequest] = field(default_factory=list)
    scores: dict[str, torch.Tensor] = field(default_factory=dict)

    def plan_step(self, plan: list[ScoredRequest]) -> None:
        self.plan = plan

    def observe(self, query: torch.Tensor, key: torch.Tensor, read_pages: PageReader, scale: float) -> None:
        """One layer. ``query`` [T, Hq, D], ``key`` [T, Hk, D]: this step's tokens; ``read_pages(ids)`` returns
        head-major ``[Hk, n, block_size, D]`` K and V of cached blocks, in the same domain as ``key``."""
        for req in self.plan:
            new = req.num_prompt - req.num_cached  # prompt tokens computed in this step
            window = min(self.scorer.window, new)
            rows = slice(req.token_start + new - window, req.token_start + new)
            keys = key[req.token_start : req.token_start + new].float().transpose(0, 1)  # [Hk, new, D]
            if req.num_cached > 0:
                k_pages, _ = read_pages(self._cached_blocks(req, key.device))
                k_cached = k_pages.float().flatten(1, 2)[:, : req.num_cached]  # [Hk, cached, D]
                keys = torch.cat([k_cached, keys], dim=1)
            queries = query.new_zeros(query.shape[1], req.num_prompt, query.shape[2], dtype=torch.float32)
            queries[:, req.num_prompt - window :] = query[rows].float().transpose(0, 1)
            scorer = replace(self.scorer, window=window, heads=req.heads)
            layer_scores = scorer.score(queries, keys, scale, block_size=req.block_size)
            total = self.scores.get(req.req_id)
            self.scores[req.req_id] = layer_scores if total is None else total + layer_scores

    @staticmethod
    def _cached_blocks(req: ScoredRequest, device: torch.device) -> torch.Tensor:
        n = -(-req.num_cached // req.block_size)
        return torch.tensor(req.block_ids[:n], dtype=torch.int64, device=device)

    def take(self) -> dict[str, torch.Tensor]:
        scores, self.scores, self.plan = self.scores, {}, []
        return scores


_COLLECTOR: ScoreCollector | None = None


def install(collector: ScoreCollector | None) -> None:
    """Set by the eviction connector's worker half; ``None`` turns collection off."""
    global _COLLECTOR
    _COLLECTOR = collector


def collecting() -> bool:
    """True in a step where some request's prompt prefill completes and it asked for eviction (cheap check)."""
    return _COLLECTOR is not None and bool(_COLLECTOR.plan)


def observe(query: torch.Tensor, key: torch.Tensor, read_pages: PageReader, scale: float) -> None:
    """The attention backend's hook (see the module docstring); call it only when :func:`collecting` is True."""
    if _COLLECTOR is not None and _COLLECTOR.plan:
        _COLLECTOR.observe(query, key, read_pages, scale)
