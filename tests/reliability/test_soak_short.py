"""A short soak: the code path of ``benchmarks/soak.py`` (a real server on loopback, e8-k3v2, eviction on, a tiny
KV pool, concurrent streaming and chat clients that disconnect and cancel, invalid requests, checked greedy outputs)
on a budget that fits CI (about two minutes)."""

from __future__ import annotations

import json

from benchmarks.soak import SoakConfig, run_soak

SHORT = SoakConfig(
    requests=16, duration_s=60.0, concurrency=4, prompt_tokens=(16, 96), shared_prefix_tokens=32,
    output_tokens=(24, 48), disconnect_prob=0.3, cancel_prob=0.2, cancel_after_s=(0.1, 2.0), chat_prob=0.2,
    invalid_prob=0.15, checked_prob=0.2, checked_prompts=2, checked_suffix_tokens=(16, 32), checked_tokens=8,
    min_prompt_tokens=48, block_size=16, num_blocks=14, max_num_seqs=4, max_model_len=208, chat_template_tokens=48,
    probe_tokens=8, rss_slope_bound_mib=64.0, seed=3,
)


def test_soak_short(smollm2_path, tmp_path):
    log = tmp_path / "server.log"
    r = run_soak(smollm2_path, SHORT, log)
    print("\n" + json.dumps({k: v for k, v in r.items() if k not in ("samples", "config")}, indent=1))
    failed = [name for name, ok in r["checks"].items() if not ok]
    assert not failed, f"{failed}\n{log.read_text()[-5000:]}"
    # The run must have exercised what it claims to: completions, aborts of both kinds, preemption and eviction.
    assert r["completed"] > 0 and r["disconnected"] > 0 and r["cancelled"] > 0
    assert r["rejected"] > 0 and r["checked_identical"] + r["checked_reproduced"] + r["checked_near_tie"] > 0
    assert r["preemptions"] > 0, "the 14-block pool (16 tokens each) should have forced preemption"
    assert r["evictions_logged"] > 0, "prompts over min_prompt_tokens should have been evicted"


def test_cached_prefixes_most_likely_first_then_every_block_boundary():
    from benchmarks.soak import cached_prefixes

    cfg = SoakConfig(shared_prefix_tokens=32, block_size=16)
    assert cached_prefixes(81, cfg) == [32, 80, 64, 48, 16]
    assert cached_prefixes(80, cfg) == [32, 64, 48, 16]  # vLLM computes at least the last token


def test_logprobs_close_needs_each_token_in_the_others_top():
    from benchmarks.soak import Checked, Divergence, logprobs_close

    ref = Checked([1, 2], [5, 6], [-0.1, -0.2], [frozenset({5, 7}), frozenset({6, 8})])
    assert logprobs_close(ref, Divergence(0, 1, 8, (5, 8), frozenset({8, 6})))
    assert not logprobs_close(ref, Divergence(0, 1, 8, (5, 8), frozenset({8, 9})))  # ours not in its top
    assert not logprobs_close(ref, Divergence(0, 1, 9, (5, 9), frozenset({9, 6})))  # its not in ours
    assert not logprobs_close(ref, Divergence(0, 1, -1, (5,), frozenset()))  # stopped early


def test_reproduce_runs_each_prompt_and_prefix_once(monkeypatch):
    import asyncio

    import benchmarks.soak as soak

    cfg = SoakConfig(shared_prefix_tokens=32, block_size=16)
    ref = soak.Checked(list(range(81)), [5, 6], [-0.1, -0.2], [frozenset(), frozenset()])
    calls = []

    async def run_behind_prefix(client, cfg, ref, p):
        calls.append(p)
        return (5, 7) if p == 64 else (5, 6)

    monkeypatch.setattr(soak, "run_behind_prefix", run_behind_prefix)
    runs = {}
    first = soak.Divergence(0, 1, 7, (5, 7), frozenset())
    other = soak.Divergence(0, 1, 9, (5, 9), frozenset())
    assert asyncio.run(soak.reproduce(None, cfg, ref, first, runs)) == 64
    assert asyncio.run(soak.reproduce(None, cfg, ref, other, runs)) is None
    assert calls == [32, 80, 64, 48, 16]
