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


def test_a_window_over_every_token_is_exact_attention(replay):
    module, query, key, value = _inputs()
    replay.dtype = None
    exact, _ = rw.replay_attention(module, query, key, value, None)
    replay.dtype, replay.step, replay.window, replay.parts = "e8-k3v2", 1, 24, "kv"
    full_window, _ = rw.replay_attention(module, query, key, value, None)
    torch.testing.assert_close(full_window, exact, rtol=1e-5, atol=1e-5)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(3, 1), value.repeat_interleave(3, 1), is_causal=True).transpose(1, 2)
    torch.testing.assert_close(exact, sdpa, rtol=1e-4, atol=1e-4)


def test_quantized_reads_change_only_queries_that_read_the_cache(replay):
    module, query, key, value = _inputs()
    replay.dtype = None
    exact, _ = rw.replay_attention(module, query, key, value, None)
    replay.dtype, replay.step, replay.window, replay.parts = "e8-k3v2", 8, 0, "kv"
    coded, _ = rw.replay_attention(module, query, key, value, None)
    error = (coded - exact).abs().amax(dim=(0, 2, 3))  # per query position
    assert error[:8].max() < 1e-5  # the first step reads nothing from the cache
    assert (error[8:] > 1e-3).all()
