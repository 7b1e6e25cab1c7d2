"""The quality benchmarks' bookkeeping (no engine): served configurations, honest bits per element, where the loss
sits within a prefill chunk, needle answers compared prompt by prompt with their reference, and the fact prompts."""

import argparse

import numpy as np
import pytest

from transformers import AutoTokenizer

from benchmarks import facts, needle, quality_ppl
from benchmarks.common import parse_serve_config, smollm2_path
from benchmarks.facts import FactPrompt


def test_serve_config_syntax():
    assert parse_serve_config("auto") == ("auto", {})
    assert parse_serve_config("e8-k3v2@none") == ("e8-k3v2", {"protect_layers": "none"})
    assert parse_serve_config("e8-k3v2@2@e8-k4v4") == ("e8-k3v2", {"protect_layers": "2", "protect_format": "e8-k4v4"})
    assert parse_serve_config("e8-k3v2@0+29") == ("e8-k3v2", {"protect_layers": "0,29,"})
    assert parse_serve_config("e8-k3v2@0+") == ("e8-k3v2", {"protect_layers": "0,"})  # layer 0, not a count
    with pytest.raises(ValueError, match="DTYPE\\[@PROTECT\\[@FORMAT\\]\\]"):
        parse_serve_config("e8-k3v2@2@e8-k4v4@x")


def test_bits_count_protected_layers_at_what_they_store():
    def mean(config):
        bits = quality_ppl.layer_bits(config)
        return sum(bits) / len(bits)

    assert mean("auto") == 16 and mean("fp8") == 8
    assert mean("e8-k3v2@none") == 2.75  # 44 B per token-head of 64 elements, scales included
    assert mean("e8-k3v2@2@auto") == pytest.approx((4 * 16 + 26 * 2.75) / 30)  # bf16
    assert mean("e8-k3v2@2@e8-k4v4") == pytest.approx((4 * 4.25 + 26 * 2.75) / 30) == mean("e8-k3v2")  # the default
    assert quality_ppl.layer_bits("e8-k3v2@0+29@e8-k4v4")[::29] == [4.25, 4.25]


def test_loss_is_split_at_the_prefill_chunk_boundary():
    """Scored positions start at batch_tokens; the first ``recent`` of each chunk are reported apart."""
    args = argparse.Namespace(batch_tokens=8, recent=2)
    ref = np.zeros((3, 24))
    nll = ref.copy()
    nll[:, [0, 1, 8, 9, 16, 17]] = 0.5  # the first 2 positions of each of the 3 scored chunks
    run = {"nll": nll, "wall_s": 1.0, "capacity": 500}
    row = quality_ppl.config_row(args, "e8-k3v2@none", run, {"nll": ref, "capacity": 100})
    assert row["dnll_recent"] == pytest.approx(0.5) and row["dnll_rest"] == 0
    assert row["capacity_ratio"] == 5 and row["delta_ppl"] == pytest.approx(np.expm1(0.5 * 6 / 24))


def test_needle_rows_compare_each_prompt_with_its_reference():
    """Rate 0 against auto, prompt by prompt; an eviction rate against the same configuration without eviction."""
    prompts = {("number", 1024): [FactPrompt("p", ("1",), "number", (d,)) for d in (0.1, 0.5, 0.9)]}
    runs = {"auto": {"found": {"0.0|number|1024": [1, 1, 0]}, "evicted": {"0.0|number|1024": 0.0}, "capacity": 100},
            "e8-k3v2": {"found": {"0.0|number|1024": [1, 0, 1], "0.35|number|1024": [0, 0, 1]},
                        "evicted": {"0.0|number|1024": 0.0, "0.35|number|1024": 0.34}, "capacity": 542}}
    auto, e8, evicting = needle.rows_for(["auto", "e8-k3v2"], runs, prompts)
    assert auto["lost"] == auto["gained"] == 0 and auto["reference"] == "auto"
    assert (e8["recall"], e8["reference_recall"]) == (pytest.approx(2 / 3), pytest.approx(2 / 3))
    assert (e8["lost"], e8["gained"], e8["missed_depths"]) == (1, 1, [0.5])
    assert e8["capacity_ratio"] == pytest.approx(5.42)
    assert evicting["reference"] == "no eviction" and (evicting["lost"], evicting["gained"]) == (1, 0)
    assert evicting["evicted"] == 0.34 and evicting["missed_depths"] == [0.1, 0.5]


def test_fact_prompts_hide_each_fact_once_and_match_it_whole():
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_path()))
    prompts = facts.kind_prompts(tokenizer, "multi4", 8, 512, seed=3)
    assert len(prompts) == 8 and len({p.prompt.split("Question")[0] for p in prompts}) == 2  # 2 haystacks x 4
    for p in prompts:
        (value,) = p.answers
        assert len(value) == 7 and p.prompt.count(value) == 1
        assert 400 < len(tokenizer(p.prompt).input_ids) < 560
    assert facts.kind_prompts(tokenizer, "multi4", 8, 512, seed=3) == prompts  # deterministic
    every = facts.kind_prompts(tokenizer, "multi4-all", 2, 512, seed=3)
    assert len(every) == 2 and len(every[0].answers) == 4
    code = FactPrompt("", ("KQ-4821",), "code", (0.5,))
    assert code.found(" KQ-4821.") == 1 and code.found("KQ-48210") == code.found("XKQ-4821") == 0
    number = FactPrompt("", ("7312716", "8095036"), "number", (0.2, 0.7))
    assert number.found("7312716, 8095036") == 2 and number.found("7312.") == number.found("80950367") == 0
    with pytest.raises(ValueError, match="multiN"):
        facts.kind_prompts(tokenizer, "colour", 1, 512, seed=0)


def test_configurations_pair_on_the_same_chunks():
    rows = [{"config": "e8-k3v2", "per_chunk_nll": [10.0, 20.0, 30.0]},
            {"config": "e8-k3v2@2@e8-k4v4", "per_chunk_nll": [10.1, 20.1, 30.1]},
            {"config": "fp8", "error": "needs AVX-512"}]
    pair = quality_ppl.paired(rows, "e8-k3v2@2@e8-k4v4", "e8-k3v2", scored=10)
    assert pair["delta_ppl"] == pytest.approx(np.expm1(0.01)) and pair["ci_low"] == pytest.approx(pair["ci_high"])
    assert quality_ppl.paired(rows, "fp8", "e8-k3v2", scored=10) is None
