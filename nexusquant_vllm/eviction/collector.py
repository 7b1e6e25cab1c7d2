"""Token-importance scores collected inside attention, during the step that finishes a prompt.

A :class:`ScoreCollector` is a :class:`nexusquant_vllm.attention.LayerObserver`: the eviction connector's worker
half hands it to every attention layer, calls :meth:`ScoreCollector.plan_step` once per step with the requests whose
prompt prefill completes in that step, and the backend then calls :meth:`ScoreCollector.observe` in every layer
(E8 and protected layers alike) with that step's queries, keys and values in the model's domain. For each planned
request, in each layer:

* the last ``block_scorer.window`` prompt queries (those in this step) are scored against all its prompt keys
  (earlier chunks read back from the paged cache, this chunk raw); the ``block_scorer`` reduces them to one score
  per token over the query heads of every tensor-parallel rank (``across_ranks``: a mean or a max, like the scorer's
  head reduction), summed over layers and handed to the scheduler, which picks the blocks to free;
* when a ``head_scorer`` is set (the connector sets :class:`ExpectedAttentionHeads` once the model's RoPE is
  known), per-KV-head compaction scores are kept with the layer's cache until the scheduler's decision arrives;
  :meth:`ScoreCollector.compact` then fills each layer's kept blocks with that layer's and head's best tokens
  (:func:`nexusquant_vllm.eviction.compaction.compact_blocks`).

Both scorers are small objects in the style of kvpress's presses: a study's scorer plugs in without touching the
connector. No extra forward pass. The prompt's keys are read ``KEY_CHUNK`` tokens at a time (earlier chunks' pages decoded
block by block), so scoring holds nothing of size query heads x prompt x head_dim, whatever the prompt's length:
its temporaries are bounded by the chunk, and what grows with the prompt is one score per query head and token.
Cost: per layer, once per request, two passes of the window's queries over the prompt's keys and one expected-logit
pass (three reads of the earlier prompt chunks' pages when the prefill was chunked).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch

from nexusquant_vllm.attention.observer import LayerStep
from nexusquant_vllm.eviction.compaction import (GUARD_SHARE, compact_blocks, compaction_scores, fact_guard,
                                                  span_positions)
from nexusquant_vllm.eviction.expected import WINDOW as EXPECTED_WINDOW
from nexusquant_vllm.eviction.expected import Rope, attention_of_logits, expected_logits, key_frame_statistics
from nexusquant_vllm.eviction.scorers import WindowAttentionScorer, streamed_window_attention

KEY_CHUNK = 2048  # prompt tokens whose keys are scored at a time
# The prompt's last queries whose attention, beyond the window's mean, points at the facts the answer will copy (its
# next token is the answer's first): the guard's score (compaction.fact_guard). Measured offline
# (benchmarks/research/guard_scores.py, SmolLM2, 1K-token prompts): of 32 prompts that ask for one fact, it ranks
# the fact first in 30; the window's mean attention maxed over heads in none (median rank 9 to 13). Facts asked for
# all at once are found by no candidate (5 of 32 first).
FOCUS = 4


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


PromptChunks = Callable[[], Iterator[tuple[int, torch.Tensor, torch.Tensor]]]  # () -> (start, K, V [Hk, C, D])
# (one layer's block-choice scores over this rank's query heads, the head reduction "mean" / "max") -> the scores
# over every rank's heads: identity with one rank; a tensor-parallel all-reduce otherwise (set by the connector).
AcrossRanks = Callable[[torch.Tensor, str], torch.Tensor]


def one_rank(scores: torch.Tensor, heads: str) -> torch.Tensor:
    return scores


@dataclass
class PromptLayer:
    """What a scorer sees of one request in one layer (model domain)."""

    queries: torch.Tensor  # [Hq, new, D] float32: the prompt queries of this step (the last ``new`` of the prompt)
    chunks: PromptChunks  # the prompt's keys and values, in order, KEY_CHUNK tokens at a time
    num_prompt: int
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
        new = layer.queries.shape[1]
        window = min(self.window, new)
        positions = torch.arange(layer.num_prompt - window, layer.num_prompt, device=layer.queries.device)
        mean, cov = key_frame_statistics(layer.queries[:, new - window :], positions, layer.num_prompt, self.rope)
        logits, norms = [], []
        for _, keys, values in layer.chunks():
            logits.append(expected_logits(mean, cov, keys, layer.scale))
            norms.append(values.float().norm(dim=-1))
        expected = attention_of_logits(torch.cat(logits, dim=-1), torch.cat(norms, dim=-1))
        return compaction_scores(expected, layer.attention)


@dataclass
class ScoreCollector:
    """Per-step plan, the per-request block-choice score sums (float32 ``[num_prompt]``) handed to the connector,
    and the per-layer, per-KV-head compaction scores kept until the scheduler's decision."""

    block_scorer: WindowAttentionScorer
    head_scorer: HeadScorer | None = None  # None: no compaction
    across_ranks: AcrossRanks = one_rank
    guard_share: float = GUARD_SHARE  # compaction.fact_guard's share of the kept tokens (0: no guard)
    plan: list[ScoredRequest] = field(default_factory=list)
    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    compactions: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)  # per layer:
    # (kv_cache, compaction scores [Hk, P]), kept until the scheduler's decision
    fact_scores: dict[str, torch.Tensor] = field(default_factory=dict)  # [P]: the guard's scores (fact_guard),
    # summed over this rank's layers (under pipeline parallelism each stage guards by its own layers)

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
            chunks = functools.partial(_prompt_chunks, req, step)  # each pass reads the prompt again
            window = min(self.block_scorer.window, new)
            attention, focus = streamed_window_attention(queries[:, new - window :], req.num_prompt - window,
                                                         functools.partial(_keys_of, chunks), step.scale,
                                                         _window_and_focus)
            block_scores = replace(self.block_scorer, heads=req.heads).reduce(attention, req.block_size)
            block_scores = self.across_ranks(block_scores, req.heads)
            total = self.scores.get(req.req_id)
            self.scores[req.req_id] = block_scores if total is None else total + block_scores
            if self.head_scorer is not None:
                per_head = self.head_scorer(PromptLayer(queries, chunks, req.num_prompt, attention, step.scale))
                self.compactions.setdefault(req.req_id, []).append((step.kv_cache, per_head))
            if self.head_scorer is not None and self.guard_share > 0:  # the same on every rank (one configuration)
                facts = focus - attention if window > 2 * FOCUS else focus
                facts = self.across_ranks(facts.clamp(min=0).amax(0), "max")
                total = self.fact_scores.get(req.req_id)
                self.fact_scores[req.req_id] = facts if total is None else total + facts

    def compact(self, req_id: str, block_ids: list[int], span: list[int], targets: list[int]) -> None:
        """Fill the logical blocks ``targets`` of every layer with that layer's and head's best tokens of ``span``
        (``targets`` plus the blocks being freed), the tokens of :func:`fact_guard` in all of them, then forget the
        request's scores."""
        layers = self.compactions.pop(req_id, None)
        facts = self.fact_scores.pop(req_id, None)
        if not layers or not targets:
            return
        device = layers[0][0].device
        ids, span_t, targets_t = (torch.tensor(x, device=device) for x in (block_ids, span, targets))
        block_size = layers[0][0].shape[2]
        guard = fact_guard(facts, span_positions(span_t, block_size), len(targets) * block_size, self.guard_share)
        for kv_cache, per_head in layers:
            compact_blocks(kv_cache, per_head, ids, span_t, targets_t, guard)

    def drop(self, req_ids: Iterable[str]) -> None:
        """Forget the compaction scores of requests that finished, were preempted or evict nothing."""
        for req_id in req_ids:
            self.compactions.pop(req_id, None)
            self.fact_scores.pop(req_id, None)

    def take(self) -> dict[str, torch.Tensor]:
        scores, self.scores, self.plan = self.scores, {}, []
        return scores


def _prompt_chunks(req: ScoredRequest, step: LayerStep) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """The request's prompt keys and values ``[Hk, C, D]`` in order, at most ``KEY_CHUNK`` tokens at a time (whole
    blocks): the earlier chunks read back from the pages, then this step's raw tokens."""
    per_read = max(1, KEY_CHUNK // req.block_size)
    num_blocks = -(-req.num_cached // req.block_size)
    for first in range(0, num_blocks, per_read):
        ids = torch.tensor(req.block_ids[first : min(first + per_read, num_blocks)], dtype=torch.int64,
                           device=step.key.device)
        start = first * req.block_size
        length = min(req.num_cached - start, len(ids) * req.block_size)
        keys, values = step.read_pages(ids)  # [Hk, n, block_size, D]
        yield start, keys.flatten(1, 2)[:, :length], values.flatten(1, 2)[:, :length]
    new = req.num_prompt - req.num_cached
    for offset in range(0, new, KEY_CHUNK):
        rows = slice(req.token_start + offset, req.token_start + min(new, offset + KEY_CHUNK))
        yield req.num_cached + offset, step.key[rows].transpose(0, 1), step.value[rows].transpose(0, 1)


def _window_and_focus(probs: torch.Tensor) -> torch.Tensor:
    """``[2, Hq, C]``: the mean attention of the window's queries, and of its last ``FOCUS``."""
    return torch.stack([probs.mean(1), probs[:, -FOCUS:].mean(1)])


def _keys_of(chunks: PromptChunks) -> Iterator[tuple[int, torch.Tensor]]:
    return ((start, keys) for start, keys, _ in chunks())
