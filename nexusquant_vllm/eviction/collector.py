"""Token-importance scores collected inside attention, during the step that finishes a prompt.

A :class:`ScoreCollector` is a :class:`nexusquant_vllm.attention.LayerObserver`: the eviction connector's worker
half hands it to every attention layer, calls :meth:`ScoreCollector.plan_step` once per step with the requests whose
prompt prefill completes in that step, and the backend then calls :meth:`ScoreCollector.observe` in every layer
(E8 and protected layers alike) with that step's queries, keys and values in the model's domain. For each planned
request, in each layer:

* the last ``block_scorer.window`` prompt queries (those in this step) are scored against all its prompt keys
  (earlier chunks read back from the paged cache, this chunk raw); the ``block_scorer`` reduces them to one score
  per token, summed over layers and handed to the scheduler, which picks the blocks to free;
* when a ``head_scorer`` is set (the connector sets :class:`ExpectedAttentionHeads` once the model's RoPE is
  known), per-KV-head compaction scores are kept with the layer's cache until the scheduler's decision arrives;
  :meth:`ScoreCollector.compact` then fills each layer's kept blocks with that layer's and head's best tokens
  (:func:`nexusquant_vllm.eviction.compaction.compact_blocks`).

Both scorers are small objects in the style of kvpress's presses: a study's scorer plugs in without touching the
connector. No extra forward pass. Cost: per layer, once per request, one ``[window x prompt]`` score matrix, one
expected-logit pass over the prompt's keys and a re-read of the earlier prompt chunks' pages when the prefill was
chunked.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch

from nexusquant_vllm.attention.observer import LayerStep
from nexusquant_vllm.eviction.compaction import compact_blocks, compaction_scores
from nexusquant_vllm.eviction.expected import WINDOW as EXPECTED_WINDOW
from nexusquant_vllm.eviction.expected import Rope, expected_scores
from nexusquant_vllm.eviction.scorers import WindowAttentionScorer, window_attention


@dataclass
class ScoredRequest:
    """A request whose prompt prefill ends in this step."""

    req_id: str
    token_start: int  # row of this request's first scheduled token in the flat batch
    num_cached: int  # prompt tokens computed in earlier steps (read from pages)
    num_prompt: int
    block_ids: list[int]  # physical blocks of the request (group 0), for the cached part
    block_size: int
    heads: str = "mean"  # the block scorer's head reduction for this request's eviction rate


@dataclass
class PromptLayer:
    """What a scorer sees of one request in one layer (float32, model domain)."""

    queries: torch.Tensor  # [Hq, new, D] the prompt queries of this step (the last ``new`` of the prompt)
    keys: torch.Tensor  # [Hk, P, D] every prompt key
    values: torch.Tensor  # [Hk, P, D]
    attention: torch.Tensor  # [Hq, P] the window attention of the prompt's last queries
    scale: float


class HeadScorer(Protocol):
    def __call__(self, layer: PromptLayer) -> torch.Tensor:
        """Per-KV-head token scores ``[Hk, P]`` that the compaction keeps the best of."""


@dataclass(frozen=True)
class ExpectedAttentionHeads:
    """kvpress's ExpectedAttention statistics of the last ``window`` prompt queries plus the window attention in
    runs (:func:`nexusquant_vllm.eviction.compaction.compaction_scores`)."""

    rope: Rope
    window: int = EXPECTED_WINDOW

    def __call__(self, layer: PromptLayer) -> torch.Tensor:
        new, num_prompt = layer.queries.shape[1], layer.keys.shape[1]
        window = min(self.window, new)
        positions = torch.arange(num_prompt - window, num_prompt, device=layer.queries.device)
        expected = expected_scores(layer.queries[:, new - window :], positions, layer.keys, layer.values,
                                   layer.scale, self.rope)
        return compaction_scores(expected, layer.attention)


@dataclass
class ScoreCollector:
    """Per-step plan, the per-request block-choice score sums (float32 ``[num_prompt]``) handed to the connector,
    and the per-layer, per-KV-head compaction scores kept until the scheduler's decision."""

    block_scorer: WindowAttentionScorer
    head_scorer: HeadScorer | None = None  # None: no compaction
    plan: list[ScoredRequest] = field(default_factory=list)
    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    compactions: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)  # per layer:
    # (kv_cache, compaction scores [Hk, P]), kept until the scheduler's decision

    @property
    def active(self) -> bool:
        return bool(self.plan)

    def plan_step(self, plan: list[ScoredRequest]) -> None:
        self.plan = plan

    def observe(self, step: LayerStep) -> None:
        """One layer: score every planned request (see the module docstring)."""
        for req in self.plan:
            new = req.num_prompt - req.num_cached  # prompt tokens computed in this step
            queries = step.query[req.token_start : req.token_start + new].float().transpose(0, 1)  # [Hq, new, D]
            keys, values = self._prompt_kv(req, step)
            attention = self._window_attention(req, queries, keys, step.scale)  # [Hq, P]
            block_scores = replace(self.block_scorer, heads=req.heads).reduce(attention, req.block_size)
            total = self.scores.get(req.req_id)
            self.scores[req.req_id] = block_scores if total is None else total + block_scores
            if self.head_scorer is not None:
                per_head = self.head_scorer(PromptLayer(queries, keys, values, attention, step.scale))
                self.compactions.setdefault(req.req_id, []).append((step.kv_cache, per_head))

    def _prompt_kv(self, req: ScoredRequest, step: LayerStep) -> tuple[torch.Tensor, torch.Tensor]:
        """All prompt keys and values ``[Hk, P, D]`` (float32): earlier chunks from the pages, this step's raw."""
        this_step = slice(req.token_start, req.token_start + req.num_prompt - req.num_cached)
        keys, values = (x[this_step].float().transpose(0, 1) for x in (step.key, step.value))
        if req.num_cached > 0:
            cached = step.read_pages(self._cached_blocks(req, step.key.device))
            keys, values = (torch.cat([c.float().flatten(1, 2)[:, : req.num_cached], x], dim=1)
                            for c, x in zip(cached, (keys, values)))
        return keys, values

    def _window_attention(self, req: ScoredRequest, queries: torch.Tensor, keys: torch.Tensor,
                          scale: float) -> torch.Tensor:
        """Window attention of the last ``block_scorer.window`` prompt queries, all of them in this step."""
        new = queries.shape[1]
        window = min(self.block_scorer.window, new)
        padded = queries.new_zeros(queries.shape[0], req.num_prompt, queries.shape[2])
        padded[:, req.num_prompt - window :] = queries[:, new - window :]
        return window_attention(padded, keys, scale, window)

    def compact(self, req_id: str, block_ids: list[int], span: list[int], targets: list[int]) -> None:
        """Fill the logical blocks ``targets`` of every layer with that layer's and head's best tokens of ``span``
        (``targets`` plus the blocks being freed), then forget the request's scores."""
        layers = self.compactions.pop(req_id, None)
        if not layers or not targets:
            return
        device = layers[0][0].device
        ids, span_t, targets_t = (torch.tensor(x, device=device) for x in (block_ids, span, targets))
        for kv_cache, per_head in layers:
            compact_blocks(kv_cache, per_head, ids, span_t, targets_t)

    def drop(self, req_ids: Iterable[str]) -> None:
        """Forget the compaction scores of requests that finished, were preempted or evict nothing."""
        for req_id in req_ids:
            self.compactions.pop(req_id, None)

    @staticmethod
    def _cached_blocks(req: ScoredRequest, device: torch.device) -> torch.Tensor:
        n = -(-req.num_cached // req.block_size)
        return torch.tensor(req.block_ids[:n], dtype=torch.int64, device=device)

    def take(self) -> dict[str, torch.Tensor]:
        scores, self.scores, self.plan = self.scores, {}, []
        return scores
