"""Token-importance scorers computed from tensors attention already has during prefill (no extra forward pass).

A scorer maps one layer's prompt queries and keys to one score per prompt token; the caller sums the scores of all
layers and hands the total to :func:`nexusquant_vllm.eviction.policy.blocks_to_free`. Scores come from attention
probabilities, never from key norms (measured: key-norm scoring costs +12% to +207% perplexity).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

HEAD_REDUCTIONS = ("mean", "max")
# From this eviction rate on, blocks are scored by their attention mass in the head that needs them most
# (``heads="max"``). Measured by benchmarks/research/eviction_offline.py over 24 chunks: at 60% it beats the head mean
# by 1.44% PPL [0.26, 2.87]; at 35% the head mean is better (by 0.18% [-0.14, +0.55]).
MASS_MAX_MIN_RATE = 0.5


def heads_for_rate(rate: float) -> str:
    """The head reduction to score with at this eviction rate (see ``MASS_MAX_MIN_RATE``)."""
    return "max" if rate >= MASS_MAX_MIN_RATE else "mean"


@dataclass(frozen=True)
class WindowAttentionScorer:
    """Attention paid by the last ``window`` prompt queries to every prompt token (the SnapKV observation window).

    Based on SnapKV (Li et al., 2024, https://arxiv.org/abs/2404.14469): the queries at the end of a prompt already
    attend to what the generation will need. Each window query's softmax over the prompt keys (causal) is averaged
    over the window's queries and over the query heads of each GQA group, then over the KV heads, and smoothed by
    an average over ``pool`` neighbouring positions so that the tokens around an important one are kept with it.

    Parameters
    ----------
    window : int, default 32
        Number of final prompt queries that vote.
    pool : int, default 5
        Odd width of the average-pooling window over positions; 1 disables pooling.
    heads : {"mean", "max"}, default "mean"
        ``"mean"``: the per-token score above. ``"max"``: each block scores its attention mass (summed over its
        tokens) in the query head that attends it most, unpooled; a block that one head relies on is kept even when
        the other heads ignore it.
    """

    window: int = 32
    pool: int = 5
    heads: str = "mean"

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.pool < 1 or self.pool % 2 == 0:
            raise ValueError(f"pool must be a positive odd number, got {self.pool}")
        if self.heads not in HEAD_REDUCTIONS:
            raise ValueError(f"heads must be one of {HEAD_REDUCTIONS}, got {self.heads!r}")

    def score(
        self, queries: torch.Tensor, keys: torch.Tensor, softmax_scale: float, block_size: int | None = None
    ) -> torch.Tensor:
        """Scores ``[tokens]`` (float32) of one layer; they sum over layers, and a block scores its maximum token.

        ``queries`` ``[num_q_heads, tokens, head_dim]`` and ``keys`` ``[num_kv_heads, tokens, head_dim]`` are the
        post-RoPE prompt queries and keys of one request; only the last ``window`` queries are used. ``heads="max"``
        needs ``block_size`` (every token of a block gets the block's score).
        """
        return self.reduce(window_attention(queries, keys, softmax_scale, self.window), block_size)

    def reduce(self, per_head: torch.Tensor, block_size: int | None = None) -> torch.Tensor:
        """:meth:`score` from the window attention ``[num_q_heads, tokens]`` (:func:`window_attention`)."""
        if self.heads == "max":
            if block_size is None:
                raise ValueError('heads="max" scores whole blocks: pass block_size')
            return block_mass_max(per_head, block_size)
        return pool_positions(per_head.mean(0), self.pool)


def window_attention(queries: torch.Tensor, keys: torch.Tensor, softmax_scale: float, window: int) -> torch.Tensor:
    """``[num_q_heads, tokens]``: each query head's causal softmax over the prompt keys, averaged over the last
    ``window`` prompt queries (``queries`` ``[Hq, tokens, D]``, ``keys`` ``[Hk, tokens, D]``, GQA)."""
    tokens = queries.shape[1]
    window = min(window, tokens)
    return streamed_window_attention(queries[:, tokens - window :], tokens - window, lambda: iter([(0, keys)]),
                                     softmax_scale)


KeyChunks = Callable[[], Iterator[tuple[int, torch.Tensor]]]  # () -> (start, keys [Hk, C, D]) over the prompt


def streamed_window_attention(queries: torch.Tensor, first_position: int, key_chunks: KeyChunks,
                              softmax_scale: float,
                              reduce: Callable[[torch.Tensor], torch.Tensor] = lambda probs: probs.mean(1)
                              ) -> torch.Tensor:
    """:func:`window_attention` of the window's ``queries`` ``[Hq, W, D]`` (prompt positions ``first_position``
    onward) over keys that come in chunks, in order from position 0: two passes (the softmax's running max and sum,
    then the normalized mean), so that nothing of size query heads x prompt x head_dim is ever held. ``reduce``
    turns each chunk's probabilities ``[Hq, W, C]`` into what is returned, concatenated along the last dimension
    (default: the mean over the window's queries)."""
    row_max = row_sum = None
    for start, keys in key_chunks():
        logits = _window_logits(queries, first_position, start, keys, softmax_scale)
        chunk_max = logits.amax(-1)
        new_max = chunk_max if row_max is None else torch.maximum(row_max, chunk_max)
        mass = (logits - new_max[..., None]).exp().sum(-1)
        row_sum = mass if row_sum is None else row_sum * (row_max - new_max).exp() + mass
        row_max = new_max
    parts = [reduce((_window_logits(queries, first_position, start, keys, softmax_scale) - row_max[..., None]).exp()
                    / row_sum[..., None]) for start, keys in key_chunks()]
    return torch.cat(parts, dim=-1)


def _window_logits(queries: torch.Tensor, first_position: int, start: int, keys: torch.Tensor,
                   softmax_scale: float) -> torch.Tensor:
    """Causal logits ``[Hq, W, C]`` of the window's queries against the keys at positions ``start..start+C`` (the
    query heads of one KV head are one matmul with its keys: GQA without repeating them)."""
    num_q_heads, window, head_dim = queries.shape
    num_kv_heads, length, _ = keys.shape
    q = queries.float().reshape(num_kv_heads, -1, head_dim)
    logits = (q @ keys.float().transpose(-1, -2)).view(num_q_heads, window, length) * softmax_scale
    key_pos = torch.arange(start, start + length, device=queries.device)
    query_pos = torch.arange(first_position, first_position + window, device=queries.device)[:, None]
    return logits.masked_fill(key_pos > query_pos, float("-inf"))


def pool_positions(scores: torch.Tensor, width: int) -> torch.Tensor:
    """Average ``scores`` ``[..., tokens]`` over ``width`` (odd) neighbouring positions, same length."""
    if width == 1:
        return scores
    flat = scores.reshape(-1, 1, scores.shape[-1])
    pooled = torch.nn.functional.avg_pool1d(flat, width, stride=1, padding=width // 2, count_include_pad=False)
    return pooled.reshape(scores.shape)


def block_mass_max(per_head: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[heads, tokens]`` attention -> ``[tokens]``: each token gets its block's attention mass in the head that
    attends the block most (the last, partial block is one more block)."""
    heads, tokens = per_head.shape
    padded = torch.nn.functional.pad(per_head, (0, -tokens % block_size))
    mass = padded.view(heads, -1, block_size).sum(-1).amax(0)  # [blocks]
    return mass.repeat_interleave(block_size)[:tokens]
