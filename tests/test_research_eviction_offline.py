"""benchmarks/research/eviction_offline.py: --vs-kvpress (the shipped scorer vs kvpress, paired by chunk on the same chunks) and
the token-level masks of the tok_* variants."""

import math

import pytest
import torch

from benchmarks.research.eviction_offline import evicted_mask, evicted_tokens_mask, key_of, vs_kvpress

CONT = 100


def results(ours: dict[float, list[float]], theirs: dict[float, list[float]], digest: str = "abc"):
    offline = {"config": {"cont_len": CONT, "chunk_digests": {"1024": "abc"}},
               "nll": {key_of(1024, 0.0, "-"): ours[0.0], key_of(1024, 0.35, "snapkv"): ours[0.35],
                       key_of(1024, 0.6, "mass_max"): ours[0.6], key_of(1024, 0.6, "snapkv"): [0.0, 0.0]}}
    kvpress = {"config": {"chunk_digests": {"1024": digest}},
               "ppl": [{"press": "P", "prefix_len": 1024, "rate": r, "nll": v} for r, v in theirs.items()]}
    return offline, kvpress


def test_each_side_against_its_own_baseline():
    """Different rate-0 NLLs on the two sides cancel: only the eviction damage is compared."""
    offline, kvpress = results({0.0: [300.0, 310.0], 0.35: [302.0, 312.0], 0.6: [305.0, 315.0]},
                               {0.0: [290.0, 300.0], 0.35: [291.0, 301.0], 0.6: [295.0, 305.0]})
    rows = {r["rate"]: r for r in vs_kvpress(offline, kvpress)}
    assert set(rows) == {0.35, 0.6}
    assert rows[0.35]["variant"] == "snapkv" and rows[0.6]["variant"] == "mass_max"
    assert rows[0.35]["ours"] == pytest.approx(math.expm1(2 / CONT))
    assert rows[0.35]["theirs"] == pytest.approx(math.expm1(1 / CONT))
    assert rows[0.35]["delta"] == pytest.approx(math.expm1(1 / CONT)) and rows[0.35]["ci_low"] <= rows[0.35]["delta"]
    assert rows[0.6]["delta"] == pytest.approx(0.0)


def test_different_chunks_are_refused():
    offline, kvpress = results({0.0: [1.0], 0.35: [1.0], 0.6: [1.0]}, {0.0: [1.0], 0.35: [1.0]}, digest="xyz")
    with pytest.raises(SystemExit, match="different chunks"):
        vs_kvpress(offline, kvpress)


def test_token_level_mask_matches_the_block_policys_budget_and_keeps():
    """The tok_* variants mask as many tokens as whole-block eviction frees, never in the sink block or window."""
    torch.manual_seed(0)
    scores = torch.rand(1024)
    scores[32:64] = -1.0  # a whole low block: both masks take it
    blocks = evicted_mask(scores[: 1024 // 32 * 32].view(-1, 32).amax(-1), 1024, 0.35)
    tokens = evicted_tokens_mask(scores, 0.35)
    assert int(tokens.sum()) == int(blocks.sum()) == 11 * 32
    assert not tokens[:32].any() and not tokens[-32:].any()
    assert tokens[32:64].all()
    assert tokens.nonzero().flatten().tolist() != blocks.nonzero().flatten().tolist()


def test_per_layer_head_masks_take_the_same_budget_in_every_row():
    """The lh_* variants: each layer and KV head masks as many tokens as whole blocks free, each its own."""
    torch.manual_seed(1)
    scores = torch.rand(2, 3, 1024)
    mask = evicted_tokens_mask(scores, 0.35)
    assert mask.shape == (2, 3, 1024)
    assert (mask.sum(-1) == 11 * 32).all()
    assert not mask[..., :32].any() and not mask[..., -32:].any()
    assert not torch.equal(mask[0, 0], mask[1, 2])
    for row, s in zip(mask.view(-1, 1024), scores.view(-1, 1024)):
        assert torch.equal(row, evicted_tokens_mask(s, 0.35))


def test_compaction_rows_come_first_when_the_run_has_them():
    offline, kvpress = results({0.0: [300.0, 310.0], 0.35: [302.0, 312.0], 0.6: [305.0, 315.0]},
                               {0.0: [290.0, 300.0], 0.35: [291.0, 301.0]})
    offline["nll"][key_of(1024, 0.35, "compaction_w8")] = [300.5, 310.5]
    rows = vs_kvpress(offline, kvpress)
    assert [r["variant"] for r in rows] == ["compaction_w8", "snapkv"]
    assert rows[0]["delta"] == pytest.approx(math.expm1(-0.5 / CONT), abs=1e-6)
