"""Expected-attention scores (RoPE undo/average) and per-head compaction against brute-force references."""

from __future__ import annotations

import pytest
import torch

from nexusquant_vllm.eviction.compaction import compact_blocks, compaction_scores, fact_guard, run_max
from nexusquant_vllm.eviction.expected import Rope, expected_attention, expected_scores, query_statistics


def rope_tables(positions: int, rotary_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = base ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    freqs = torch.arange(positions, dtype=torch.float64)[:, None] * inv_freq
    return freqs.cos(), freqs.sin()


def rotate(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, neox: bool) -> torch.Tensor:
    """Forward RoPE written out independently (what vLLM's RotaryEmbedding computes)."""
    half = cos.shape[-1]
    if neox:
        x1, x2 = x[..., :half], x[..., half : 2 * half]
    else:
        x1, x2 = x[..., 0 : 2 * half : 2], x[..., 1 : 2 * half : 2]
    c, s = cos[positions], sin[positions]
    y1, y2 = x1 * c - x2 * s, x2 * c + x1 * s
    out = x.clone()
    if neox:
        out[..., :half], out[..., half : 2 * half] = y1, y2
    else:
        out[..., 0 : 2 * half : 2], out[..., 1 : 2 * half : 2] = y1, y2
    return out


@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("rotary_dim", [16, 12])  # 12 < head_dim: partial rotary
def test_rope_unrotate_inverts_rotation(neox: bool, rotary_dim: int) -> None:
    torch.manual_seed(0)
    cos, sin = rope_tables(64, rotary_dim)
    rope = Rope(cos, sin, neox)
    x = torch.randn(3, 10, 16, dtype=torch.float64)
    positions = torch.randint(0, 64, (10,))
    assert torch.allclose(rope.unrotate(rotate(x, positions, cos, sin, neox), positions), x)


@pytest.mark.parametrize("neox", [True, False])
def test_rope_average_rotation_is_mean_of_rotations(neox: bool) -> None:
    torch.manual_seed(1)
    cos, sin = rope_tables(128, 16)
    x = torch.randn(16, dtype=torch.float64)
    positions = torch.arange(40, 72)
    expected = rotate(x.expand(32, -1), positions, cos, sin, neox).mean(0)
    m = Rope(cos, sin, neox).average_rotation(40, 32, 16).double()
    assert torch.allclose(m @ x, expected, atol=1e-6)


def test_expected_attention_matches_monte_carlo() -> None:
    """Softmax of the expected logit exp(mu.k s + s^2/2 k'Ck) ~ average of exp(q.k s) over q ~ N(mu, C)."""
    torch.manual_seed(2)
    hq, hk, p, d = 4, 2, 12, 8
    q = torch.randn(hq, 20000, d, dtype=torch.float64) * 0.5 + torch.randn(hq, 1, d, dtype=torch.float64)
    keys, values = torch.randn(hk, p, d), torch.ones(hk, p, d)  # equal value norms: no reweighting
    mean, cov = query_statistics(q)
    scores = expected_attention(mean, cov, keys, values, scale=0.3)
    k = keys.double().repeat_interleave(hq // hk, dim=0)
    mc = torch.exp((q @ k.transpose(1, 2)) * 0.3).mean(1)
    mc = (mc / mc.sum(-1, keepdim=True)).view(hk, hq // hk, p).mean(1)
    assert scores.shape == (hk, p)
    assert torch.allclose(scores.sum(-1), torch.ones(hk))
    assert torch.allclose(scores.double(), mc, atol=0.01)


def test_expected_scores_value_norm_and_rope_frame() -> None:
    torch.manual_seed(3)
    hq, hk, p, d = 4, 2, 16, 8
    cos, sin = rope_tables(1024, d)
    rope = Rope(cos, sin)
    keys, values = torch.randn(hk, p, d), torch.randn(hk, p, d)
    queries = torch.randn(hq, 6, d)
    positions = torch.arange(10, 16)
    base = expected_scores(queries, positions, keys, values, 0.35, rope)
    doubled = values.clone()
    doubled[:, 3] *= 4
    assert (expected_scores(queries, positions, keys, doubled, 0.35, rope)[:, 3] > base[:, 3]).all()
    # The same pre-RoPE queries seen at other positions give the same statistics.
    pre = rope.unrotate(queries, positions)
    moved = rotate(pre.double(), positions + 100, cos, sin, True).float()
    assert torch.allclose(expected_scores(moved, positions + 100, keys, values, 0.35, rope), base, atol=1e-5)


def test_compact_blocks_keeps_each_heads_best_tokens_in_order() -> None:
    torch.manual_seed(4)
    num_blocks, hk, bs, width = 10, 3, 4, 5
    cache = torch.randint(0, 255, (num_blocks, hk, bs, width), dtype=torch.uint8)
    before = cache.clone()
    block_ids = torch.tensor([7, 2, 5, 9, 1])  # logical -> physical
    span, targets = torch.tensor([1, 2, 3]), torch.tensor([1, 3])  # logical block 2 is freed
    scores = torch.rand(hk, 5 * bs)
    compact_blocks(cache, scores, block_ids, span, targets)
    for h in range(hk):
        positions = [b * bs + o for b in span.tolist() for o in range(bs)]
        best = sorted(sorted(positions, key=lambda pos: -scores[h, pos].item())[: len(targets) * bs])
        want = torch.stack([before[block_ids[pos // bs], h, pos % bs] for pos in best])
        got = torch.cat([cache[block_ids[b], h] for b in targets.tolist()])
        assert torch.equal(got, want)
    untouched = [0, 3, 4, 6, 7, 8, 5]  # other blocks, the sink (7) and the freed one (5) included
    assert torch.equal(cache[untouched], before[untouched])


def test_fact_guard_keeps_the_run_from_just_before_a_strong_token_to_well_after_it() -> None:
    """A fact is found by its context (the key before the value): the run from 2 tokens before the strongest token to
    12 after it is guarded, limited to the share of the kept tokens and to the span."""
    scores = torch.full((96,), 0.01)
    scores[40] = 1.0  # the question's last queries point at the key
    scores[70] = 0.5
    positions = torch.arange(32, 96)  # the span: blocks 1 and 2 of 32 tokens
    guard = fact_guard(scores, positions, keep=120, share=0.125)  # 15 tokens
    assert positions[guard].tolist() == list(range(38, 53))
    two = fact_guard(scores, positions, keep=240, share=0.125)  # 30 tokens: both runs
    assert positions[two].tolist() == list(range(38, 53)) + list(range(68, 83))
    assert not fact_guard(scores, positions, keep=7, share=0.125).any()  # int(0.875) == 0
    assert not fact_guard(scores, positions, keep=120, share=0.0).any()


def test_compact_blocks_keeps_guarded_tokens_in_every_head() -> None:
    """Guarded tokens are kept in every head even where that head scores them lowest; the rest of each head's
    budget still goes to its best tokens."""
    torch.manual_seed(5)
    hk, bs = 2, 4
    cache = torch.arange(6 * hk * bs, dtype=torch.float32).view(6, hk, bs, 1)
    before = cache.clone()
    block_ids, span, targets = torch.arange(6), torch.tensor([1, 2, 3]), torch.tensor([2])
    scores = torch.rand(hk, 6 * bs) + 1
    scores[:, 5] = 0.0  # a digit both heads would drop
    guard = torch.zeros(3 * bs, dtype=torch.bool)
    guard[1] = True  # position 5 is the span's second token
    compact_blocks(cache, scores, block_ids, span, targets, guard)
    for h in range(hk):
        rest = sorted(range(4, 16), key=lambda pos: -scores[h, pos].item())[:3]
        want = torch.stack([before[pos // bs, h, pos % bs] for pos in sorted([5, *rest])])
        assert torch.equal(cache[2, h], want)


def test_compact_blocks_without_targets_is_a_no_op() -> None:
    cache = torch.arange(2 * 1 * 4 * 2, dtype=torch.float32).view(2, 1, 4, 2)
    before = cache.clone()
    no_targets = torch.tensor([], dtype=torch.int64)
    compact_blocks(cache, torch.rand(1, 8), torch.tensor([0, 1]), torch.tensor([1]), no_targets)
    assert torch.equal(cache, before)


def test_run_max_spreads_each_runs_best_score_over_it() -> None:
    x = torch.tensor([[0.1, 0.5, 0.2, 0.0, 0.3, 0.9, 0.4]])
    assert torch.equal(run_max(x, 1), x)
    assert torch.allclose(run_max(x, 2), torch.tensor([[0.5, 0.5, 0.2, 0.2, 0.9, 0.9, 0.4]]))
    assert torch.allclose(run_max(x, 4), torch.tensor([[0.5] * 4 + [0.9] * 3]))


def test_compaction_keeps_the_run_around_what_the_prompts_end_attends() -> None:
    """A token the last queries attend (one digit of a passkey) lifts its whole run above tokens the expected
    attention prefers slightly; the expected term still ranks the rest."""
    hk, groups, p = 1, 2, 32
    expected = torch.full((hk, p), 0.02)
    expected[0, 20:] = torch.linspace(0.03, 0.04, 12)  # the average future query prefers the end
    window = torch.zeros(hk * groups, p)
    window[:, 9] = 1.0  # the question attends one token
    scores = compaction_scores(expected, window, run=8)
    top = set(scores[0].topk(8).indices.tolist())
    assert top == set(range(8, 16))
    assert set(compaction_scores(expected, window, run=1)[0].topk(8).indices.tolist()) == {9, *range(25, 32)}
