"""Worker side: token-importance scores collected inside attention, during the step that finishes a prompt.

The eviction connector's worker half (``connector.py``) calls :meth:`ScoreCollector.plan_step` once per step with
the requests whose prompt prefill completes in that step; the attention backend then calls :func:`observe` in every
layer (E8 and protected boundary layers alike) with that step's queries, keys and values, in the same domain as the
pages its ``read_pages`` returns. For each planned request, in each layer:

* the last ``window`` prompt queries (those in this step) are scored against all its prompt keys (earlier chunks read
  back from the paged cache, this chunk raw) with :class:`nexusquant_vllm.eviction.WindowAttentionScorer`; the sum over
  layers goes to the scheduler, which picks the blocks to free;
* when the model's RoPE is known (``rope``), per-KV-head compaction scores
  (:func:`nexusquant_vllm.eviction.compaction.compaction_scores`: the expected attention of future queries modelled
  from the last ``expected_window`` prompt queries, plus the same window attention in runs of tokens) are kept on
  the worker with the layer's cache until the scheduler's decision arrives; :meth:`ScoreCollector.compact` then fills
  each layer's kept blocks with that layer's and head's best tokens
  (:func:`nexusquant_vllm.eviction.compaction.compact_blocks`).

No extra forward pass. Cost: per layer, once per request, one ``[window x prompt]`` score matrix, one expected-logit
pass over the prompt's keys and a re-read of the earlier prompt chunks' pages when the prefill was chunked.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import torch

from nexusquant_vllm.eviction import WindowAttentionScorer
from nexusquant_vllm.eviction.compaction import compact_blocks, compaction_scores
from nexusquant_vllm.eviction.expected import WINDOW as EXPECTED_WINDOW
from nexusquant_vllm.eviction.expected import Rope, expected_scores
from nexusquant_vllm.eviction.scorers import window_attention
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
class LayerStep:
    """One attention layer's tensors of a step, as the backend hands them to :func:`observe`."""

    query: torch.Tensor  # [T, Hq, D] this step's tokens, in the pages' domain
    key: torch.Tensor  # [T, Hk, D]
    value: torch.Tensor  # [T, Hk, D]
    read_pages: PageReader  # ids -> head-major [Hk, n, block_size, D] K and V of cached blocks
    scale: float
    kv_cache: torch.Tensor  # the layer's paged cache [num_blocks, Hk, block_size, width], rewritten by compact()
    to_model: Callable[[torch.Tensor], torch.Tensor]  # pages' domain -> the model's post-RoPE frame (last dim)


@dataclass
class ScoreCollector:
    """Per-step plan, the per-request block-choice score sums (float32 ``[num_prompt]``) handed to the connector,
    and the per-layer, per-KV-head compaction scores kept until the scheduler's decision."""

    scorer: WindowAttentionScorer
    rope: Rope | None = None  # set once the model is loaded; None: no compaction
    expected_window: int = EXPECTED_WINDOW
    plan: list[ScoredRequest] = field(default_factory=list)
    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    compactions: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)  # per layer:
    # (kv_cache, compaction scores [Hk, P]), kept until the scheduler's decision

    def plan_step(self, plan: list[ScoredRequest]) -> None:
        self.plan = plan

    def observe(self, step: LayerStep) -> None:
        """One layer: score every planned request (see the module docstring)."""
        for req in self.plan:
            new = req.num_prompt - req.num_cached  # prompt tokens computed in this step
            queries = step.query[req.token_start : req.token_start + new].float().transpose(0, 1)  # [Hq, new, D]
            keys, values = self._prompt_kv(req, step)
            attention = self._window_attention(req, queries, keys, step.scale)  # [Hq, P]
            block_scores = replace(self.scorer, heads=req.heads).reduce(attention, req.block_size)
            total = self.scores.get(req.req_id)
            self.scores[req.req_id] = block_scores if total is None else total + block_scores
            if self.rope is not None:
                window = min(self.expected_window, new)
                positions = torch.arange(req.num_prompt - window, req.num_prompt, device=queries.device)
                expected = expected_scores(step.to_model(queries[:, new - window :]), positions,
                                           step.to_model(keys), values, step.scale, self.rope)
                per_head = compaction_scores(expected, attention)
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
        """Window attention of the last ``scorer.window`` prompt queries, all of them in this step."""
        new = queries.shape[1]
        window = min(self.scorer.window, new)
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


_COLLECTOR: ScoreCollector | None = None


def install(collector: ScoreCollector | None) -> None:
    """Set by the eviction connector's worker half; ``None`` turns collection off."""
    global _COLLECTOR
    _COLLECTOR = collector


def collecting() -> bool:
    """True in a step where some request's prompt prefill completes and it asked for eviction (cheap check)."""
    return _COLLECTOR is not None and bool(_COLLECTOR.plan)


def observe(step: LayerStep) -> None:
    """The attention backend's hook (see the module docstring); call it only when :func:`collecting` is True."""
    if _COLLECTOR is not None and _COLLECTOR.plan:
        _COLLECTOR.observe(step)
