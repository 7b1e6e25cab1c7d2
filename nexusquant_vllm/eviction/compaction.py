"""Per-layer, per-head compaction of a prompt's kept tokens into the blocks that stay allocated (KV-Compress-style).

Block eviction frees the same logical blocks in every layer, since all layers share one block table. Compaction keeps
that property (the freed blocks are still the same everywhere) but lets each layer and each KV head choose *which*
tokens fill the kept blocks: the ``n = len(targets) * block_size`` best-scoring tokens of the whole eligible span
(kept + freed blocks) are written, in position order, into the kept blocks' slots. Keys carry their RoPE rotation, and
after the prefill every prompt token precedes every query, so attention over the moved tokens is unchanged by the
move; only which tokens a head still sees changes.

Based on KV-Compress (Rehg, 2024, https://arxiv.org/abs/2410.00161), which evicts per head inside a paged cache.
"""

from __future__ import annotations

import torch

RUN = 8  # tokens of the window-attention term kept or dropped together (see compaction_scores)
GUARD_SHARE = 0.125  # of the kept tokens: every layer and head keeps the runs the prompt's end attends most
GUARD_REACH = (2, 12)  # tokens before and after a strongly attended token that the guard keeps with it


def compaction_scores(expected: torch.Tensor, window_attention: torch.Tensor, run: int = RUN) -> torch.Tensor:
    """Per-KV-head token scores ``[Hk, P]`` the compaction keeps the best of: the expected attention of future
    queries (``expected`` ``[Hk, P]``, :func:`nexusquant_vllm.eviction.expected.expected_scores`), plus the attention
    the prompt's last queries paid (``window_attention`` ``[Hq, P]``, averaged over each GQA group) spread over
    aligned runs of ``run`` tokens (:func:`run_max`). Both terms sum to 1 per head.

    The expected attention models the average future query, one token at a time; what only the prompt's end asks
    for (a passkey: several digit tokens and the words around them) must stay together. Measured by
    ``benchmarks/research/eviction_offline.py`` (10 passkey prompts, 24 PPL chunks): per-token choice alone recalls 0.6 /
    0.3 / 0.0 passkeys at 35 / 60 / 80% eviction (1.0 without eviction), runs of 8 on the window term 1.0 / 1.0 /
    0.9, at +0.73% / +1.88% / +4.43% PPL (per-token: +0.54% / +1.94% / +4.01%; runs of 8 on both terms: +0.92% at
    35%)."""
    num_kv_heads = expected.shape[0]
    window = window_attention.view(num_kv_heads, -1, window_attention.shape[-1]).mean(1)
    return expected + run_max(window, run)


def run_max(scores: torch.Tensor, run: int) -> torch.Tensor:
    """``[..., P]``: each position gets the maximum of its aligned run of ``run`` positions."""
    if run == 1:
        return scores
    tokens = scores.shape[-1]
    padded = torch.nn.functional.pad(scores, (0, -tokens % run))
    return padded.view(*scores.shape[:-1], -1, run).amax(-1).repeat_interleave(run, dim=-1)[..., :tokens]


def span_positions(span: torch.Tensor, block_size: int) -> torch.Tensor:
    """Token positions of the logical blocks ``span``, in order."""
    return (span[:, None] * block_size + torch.arange(block_size, device=span.device)).flatten()


def fact_guard(fact_scores: torch.Tensor, positions: torch.Tensor, keep: int, share: float = GUARD_SHARE,
               reach: tuple[int, int] = GUARD_REACH) -> torch.Tensor:
    """Bool ``[len(positions)]``: the span positions that every layer and KV head keeps.

    ``fact_scores`` ``[P]`` is, summed over layers, the attention the prompt's last queries pay each token beyond
    their window's mean, in the head where that excess is largest
    (:class:`nexusquant_vllm.eviction.collector.ScoreCollector`). A fact the question
    asks about (a number, a code, a name) is several tokens, and a head's own scores can rank one of them below its
    budget: the model then answers with a digit missing (measured through vLLM on e8 caches, ``benchmarks/needle.py``).
    The question's queries find a fact by its context (the key before the value: "the number of Lisbon is"), so
    each token takes the maximum score of the ``reach[0]`` tokens after it and the ``reach[1]`` before it: the run
    from just before a strongly attended token to well after it is kept whole. The best ``share`` of the kept tokens
    is guaranteed in every layer and head.
    """
    count = min(int(share * keep), positions.numel())
    if count == 0:
        return torch.zeros(positions.shape, dtype=torch.bool, device=positions.device)
    before, after = reach
    padded = torch.nn.functional.pad(fact_scores.float(), (after, before))
    pooled = padded.unfold(0, before + after + 1, 1).amax(-1)
    guard = torch.zeros(positions.shape, dtype=torch.bool, device=positions.device)
    guard[pooled[positions.to(pooled.device)].topk(count).indices.to(guard.device)] = True
    return guard


def compact_blocks(
    kv_cache: torch.Tensor,
    scores: torch.Tensor,
    block_ids: torch.Tensor,
    span: torch.Tensor,
    targets: torch.Tensor,
    guard: torch.Tensor | None = None,
) -> None:
    """Rewrite the ``targets`` blocks of one layer's ``kv_cache`` in place.

    ``kv_cache`` ``[num_blocks, Hk, block_size, width]`` (any dtype: E8 rows carry their own scales); ``scores``
    ``[Hk, >= positions of span]`` per KV head; ``block_ids`` ``[logical blocks]`` the request's physical blocks;
    ``span`` and ``targets`` logical block indices, ``targets`` a subset of ``span``; ``guard`` (bool, one per
    token of the span, at most as many set as the targets hold) the tokens every head keeps (:func:`fact_guard`).
    Reads every source row before writing (sources and targets overlap).
    """
    num_kv_heads, block_size, width = kv_cache.shape[1], kv_cache.shape[2], kv_cache.shape[3]
    if targets.numel() == 0:
        return
    positions = span_positions(span, block_size)
    keep = targets.numel() * block_size
    span_scores = scores[:, positions.to(scores.device)]
    if guard is not None:
        span_scores = span_scores.masked_fill(guard.to(span_scores.device), float("inf"))
    chosen = span_scores.topk(keep, dim=-1).indices.sort(-1).values  # [Hk, keep] rows of the span
    rows = kv_cache[block_ids[span]].transpose(0, 1).flatten(1, 2)  # [Hk, span tokens, width]
    kept = rows.gather(1, chosen[..., None].expand(-1, -1, width).to(rows.device))
    kv_cache[block_ids[targets]] = kept.view(num_kv_heads, targets.numel(), block_size, width).transpose(0, 1)
