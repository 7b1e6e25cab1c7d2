"""The eviction decision: which whole KV blocks of a prompt to free, once, right after its prefill.

All attention layers share one block table, so the decision is per logical block and global across layers. The
first ``sink_blocks`` blocks (attention sink / BOS), every block touching the last ``recent_tokens`` prompt tokens,
the partially filled last block, and any user-protected position range are always kept. Of the rest, the blocks
whose most important token scores lowest are freed until ``rate`` of the prompt's tokens are gone (rounded down to
whole blocks), or no eligible block is left. A block is scored by its maximum token score, so a block that holds a
single crucial token (a passkey, a name) survives even if its neighbours are unimportant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

PRESETS: dict[str, float] = {"lossless": 0.0, "conservative": 0.35, "balanced": 0.60, "aggressive": 0.80}


def parse_rate(value: object, field_name: str = "eviction") -> float:
    """A preset name or a number in [0, 1) -> the fraction of prompt tokens to evict.

    Raises ``ValueError`` naming ``field_name`` for anything else (negative, >= 1, NaN, bool, other strings).
    """
    if isinstance(value, str) and value.strip().lower() in PRESETS:
        return PRESETS[value.strip().lower()]
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{field_name} must be a number in [0, 1) or one of {list(PRESETS)}, got {value!r}")
    try:
        rate = float(value)
    except ValueError:
        raise ValueError(f"{field_name} must be a number in [0, 1) or one of {list(PRESETS)}, got {value!r}") from None
    if not 0.0 <= rate < 1.0:  # also rejects NaN
        raise ValueError(f"{field_name} must be in [0, 1), got {rate}")
    return rate


@dataclass(frozen=True)
class EvictionPolicy:
    """Per-request eviction knobs.

    Parameters
    ----------
    rate : float
        Fraction of the prompt's tokens to evict, in [0, 1) (see ``PRESETS``).
    min_prompt_tokens : int, default 512
        Prompts shorter than this are never evicted.
    recent_tokens : int, default 32
        The last prompt tokens, always kept (the observation window and the generation's local context).
    sink_blocks : int, default 1
        Leading blocks always kept (attention sinks, BOS, system prompt start).
    protected : tuple of (start, end) position ranges, default ()
        Half-open token ranges the user asks to keep.
    """

    rate: float = 0.0
    min_prompt_tokens: int = 512
    recent_tokens: int = 32
    sink_blocks: int = 1
    protected: tuple[tuple[int, int], ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        parse_rate(self.rate, "rate")
        for name in ("min_prompt_tokens", "recent_tokens", "sink_blocks"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for start, end in self.protected:
            if not 0 <= start <= end:
                raise ValueError(f"protected range ({start}, {end}) must satisfy 0 <= start <= end")


def eligible_blocks(num_prompt_tokens: int, block_size: int, policy: EvictionPolicy) -> list[int]:
    """Logical blocks that may be freed: full, after the sinks, before the recent window, not protected.

    A block is protected when a range overlaps it (``start < range_end and range_start < end``; an empty range
    inside a block protects it). O(blocks + ranges): each range marks its first and last block in a difference
    array, whatever its length.
    """
    num_blocks = num_prompt_tokens // block_size
    before_recent = max(0, num_prompt_tokens - policy.recent_tokens) // block_size  # blocks ending before it
    marks = [0] * (num_blocks + 1)
    for range_start, range_end in policy.protected:
        first, last = max(range_start // block_size, 0), min((range_end - 1) // block_size, num_blocks - 1)
        if first <= last:
            marks[first] += 1
            marks[last + 1] -= 1
    eligible, depth = [], 0
    for block in range(min(num_blocks, before_recent)):
        depth += marks[block]
        if block >= policy.sink_blocks and depth == 0:
            eligible.append(block)
    return eligible


def blocks_to_free(token_scores: torch.Tensor, block_size: int, policy: EvictionPolicy) -> list[int]:
    """Sorted logical block indices to free for a prompt scored by ``token_scores`` ``[num_prompt_tokens]``."""
    num_prompt_tokens = token_scores.shape[0]
    if policy.rate == 0.0 or num_prompt_tokens < policy.min_prompt_tokens:
        return []
    eligible = eligible_blocks(num_prompt_tokens, block_size, policy)
    budget = min(math.floor(policy.rate * num_prompt_tokens / block_size), len(eligible))
    if budget == 0:
        return []
    block_scores = token_scores[: (num_prompt_tokens // block_size) * block_size].view(-1, block_size).amax(-1)
    candidates = torch.tensor(eligible)
    lowest = block_scores[candidates].argsort(stable=True)[:budget]
    return sorted(candidates[lowest].tolist())
