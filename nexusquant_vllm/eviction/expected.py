"""Expected-attention token scores per KV head, for choosing each layer's and head's kept tokens.

Based on ExpectedAttention (NVIDIA kvpress, https://github.com/NVIDIA/kvpress): a head's future queries are modelled as
a Gaussian with the mean and covariance of the prompt's pre-RoPE queries, rotated by the RoPE rotation averaged over
the next ``future`` positions. Key ``k`` then gets the expected attention ``exp(s mu.k + s^2/2 k'Ck)`` (softmax over
the prompt), times the norm of its value (renormalised), averaged over the query heads of its GQA group.

kvpress takes the statistics over the whole prompt; here they come from its last ``window`` queries (those of the
step that completes the prefill), which measured as well: ``benchmarks/research/eviction_offline.py`` (24 chunks, 1024-token
prefixes), tokens chosen per layer and per KV head, gives +0.46% PPL at 35% eviction and +1.91% at 60% from the last
256 queries (+0.62% / +1.86% from all of them), against +0.93% / +2.63% for the block scorers shared by all layers
(benchmarks/research/results/eviction_offline_layerhead3.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FUTURE_POSITIONS = 512  # kvpress ExpectedAttention's n_future_positions
WINDOW = 256  # prompt queries the statistics come from: the best of 64/128/256/all, measured (see above)


@dataclass(frozen=True)
class Rope:
    """A model's rotary position embedding as tables, to undo it on queries and to average it over future positions.

    ``cos`` and ``sin`` are ``[max_positions, rotary_dim // 2]``; ``neox`` pairs dimension ``i`` with
    ``i + rotary_dim // 2`` (GPT-NeoX / Llama), otherwise ``2i`` with ``2i + 1`` (GPT-J). Dimensions past
    ``rotary_dim`` are not rotated.
    """

    cos: torch.Tensor
    sin: torch.Tensor
    neox: bool = True

    def _pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        half = self.cos.shape[-1]
        i = torch.arange(half)
        return (i, i + half) if self.neox else (2 * i, 2 * i + 1)

    def unrotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``x`` ``[..., T, D]`` rotated at ``positions`` ``[T]`` -> the same vectors before RoPE."""
        a, b = self._pairs()
        at = positions.to(self.cos.device)
        cos, sin = self.cos[at].to(x), self.sin[at].to(x)
        out = x.clone()
        out[..., a] = x[..., a] * cos + x[..., b] * sin
        out[..., b] = x[..., b] * cos - x[..., a] * sin
        return out

    def average_rotation(self, start: int, count: int, head_dim: int) -> torch.Tensor:
        """``[D, D]``: the RoPE rotation matrix averaged over positions ``start .. start + count - 1``
        (clamped to the table), acting on column vectors."""
        positions = torch.arange(start, start + count, device=self.cos.device).clamp(max=self.cos.shape[0] - 1)
        cos, sin = self.cos[positions].float().mean(0).cpu(), self.sin[positions].float().mean(0).cpu()
        a, b = self._pairs()
        m = torch.eye(head_dim)
        m[a, a], m[b, b] = cos, cos
        m[a, b], m[b, a] = -sin, sin
        return m


def query_statistics(queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[Hq, T, D]`` -> per head mean ``[Hq, D]`` and covariance ``[Hq, D, D]`` (population, float32)."""
    q = queries.float()
    mean = q.mean(1)
    centered = q - mean[:, None]
    return mean, centered.transpose(1, 2) @ centered / q.shape[1]


def expected_logits(mean: torch.Tensor, cov: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """Expected logits ``[Hq, C]`` of the post-RoPE ``keys`` ``[Hk, C, D]`` for queries ~ N(``mean`` ``[Hq, D]``,
    ``cov`` ``[Hq, D, D]``): ``scale <k, mean> + scale^2 / 2 k^T cov k``. The query heads of one KV head are a view of
    its keys (no copy per query head), so the keys can come in chunks of any length."""
    num_kv_heads, length, head_dim = keys.shape
    groups = mean.shape[0] // num_kv_heads
    k = keys.float()[:, None]  # [Hk, 1, C, D]
    linear = (k @ mean.view(num_kv_heads, groups, head_dim, 1))[..., 0]  # [Hk, g, C]
    quadratic = ((k @ cov.view(num_kv_heads, groups, head_dim, head_dim)) * k).sum(-1)
    return (linear * scale + 0.5 * scale**2 * quadratic).reshape(num_kv_heads * groups, length)


def attention_of_logits(logits: torch.Tensor, value_norms: torch.Tensor) -> torch.Tensor:
    """Scores ``[Hk, P]`` (each row sums to 1) from expected logits ``[Hq, P]`` and value norms ``[Hk, P]``: the
    softmax over the prompt times the value norm, renormalized, averaged over each KV head's query heads."""
    num_kv_heads = value_norms.shape[0]
    p = logits.softmax(-1).view(num_kv_heads, -1, logits.shape[-1]) * value_norms[:, None]
    return (p / p.sum(-1, keepdim=True)).mean(1)


def expected_attention(
    mean: torch.Tensor, cov: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
) -> torch.Tensor:
    """Scores ``[Hk, P]`` (float32, each row sums to 1) of the post-RoPE ``keys`` / ``values`` ``[Hk, P, D]`` for
    future queries ~ N(``mean`` ``[Hq, D]``, ``cov`` ``[Hq, D, D]``), in the keys' rotary frame."""
    return attention_of_logits(expected_logits(mean, cov, keys, scale), values.float().norm(dim=-1))


def key_frame_statistics(queries: torch.Tensor, positions: torch.Tensor, prompt_len: int, rope: Rope,
                         future: int = FUTURE_POSITIONS) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[Hq, D]`` and covariance ``[Hq, D, D]`` of future queries in the keys' rotary frame, from a sample of
    post-RoPE ``queries`` ``[Hq, T, D]`` at ``positions`` ``[T]``: RoPE undone, then averaged over the next
    ``future`` positions after the prompt."""
    mean, cov = query_statistics(rope.unrotate(queries.float(), positions))
    m = rope.average_rotation(prompt_len, future, queries.shape[-1]).to(mean.device)
    return mean @ m.T, m @ cov @ m.T


def expected_scores(
    queries: torch.Tensor,
    positions: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scale: float,
    rope: Rope,
    future: int = FUTURE_POSITIONS,
) -> torch.Tensor:
    """Per-KV-head scores ``[Hk, P]`` of a prompt's ``keys`` / ``values`` ``[Hk, P, D]`` from a sample of its
    post-RoPE ``queries`` ``[Hq, T, D]`` at ``positions`` ``[T]``."""
    mean, cov = key_frame_statistics(queries, positions, keys.shape[1], rope, future)
    return expected_attention(mean, cov, keys, values, scale)
