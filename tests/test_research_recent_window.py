"""The recent-window replay reads what it claims: raw inside a query's own step and window, E8 elsewhere."""

from types import SimpleNamespace

import pytest
import torch

from benchmarks.research import recent_window as rw


def test_raw_masks_cover_the_own_step_and_the_window():
    raw_k, raw_v = rw.raw_masks(8, step=4, window=1, parts="kv")
    assert torch.equal(raw_k, raw_v)
    # query 5 (step 4..7): its own step from 4 on, and 1 newest token before it (4: already in the step)
    assert raw_k[5].nonzero().flatten().tolist() == [4, 5, 6, 7]
    # query 4 (first of its step): key 3 is the one newest token before it
    assert raw_k[4].nonzero().flatten().tolist() == [3, 4, 5, 6, 7]
    only_k, only_v = rw.raw_masks(8, step=1, window=2, parts="k")
    assert only_k[6].nonzero().flatten().tolist() == [4, 5, 6, 7]
    assert only_v[6].nonzero().flatten().tolist() == [6, 7]


def _inputs(tokens: int = 24, head_dim: int = 64):
    g = torch.Generator().manual_seed(0)
    query = torch.randn(1, 6, tokens, head_dim, generator=g)
    key = torch.randn(1, 2, tokens, head_dim, generator=g)
    value = torch.randn(1, 2, tokens, head_dim, generator=g)
    return SimpleNamespace(layer_idx=5), query, key, value


@pytest.fixture
def replay():
    saved = (rw.Replay.dtype, rw.Replay.step, rw.Replay.window, rw.Replay.parts)
    yield rw.Replay
    rw.Replay.dtype, rw.Replay.step, rw.Replay.window, rw.Replay.parts = saved


def _attend(replay, dtype, step=1, window=0, parts="kv"):
    replay.dtype, replay.step, replay.window, replay.parts = dtype, step, window, parts
    module, query, key, value = _inputs()
    return rw.replay_attention(module, query, key, value, None)[0]


def test_a_window_over_every_token_is_exact_attention(replay):
    exact = _attend(replay, None)
    torch.testing.assert_close(_attend(replay, "e8-k3v2", window=24), exact, rtol=1e-5, atol=1e-5)
    _, query, key, value = _inputs()
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(3, 1), value.repeat_interleave(3, 1), is_causal=True).transpose(1, 2)
    torch.testing.assert_close(exact, sdpa, rtol=1e-4, atol=1e-4)


def test_quantized_reads_change_only_queries_that_read_the_cache(replay):
    error = (_attend(replay, "e8-k3v2", step=8) - _attend(replay, None)).abs().amax(dim=(0, 2, 3))  # per query
    assert error[:8].max() < 1e-5  # the first step reads nothing from the cache
    assert (error[8:] > 1e-3).all()
