"""Tensor and pipeline parallelism with E8 pages on vLLM's CPU build (two ranks, one core each), on SmolLM2 with
its KV heads duplicated (``model_store.split_smollm2``: the same function, 6 KV heads, which TP=2 splits 3 + 3).

Every rank serves its own heads (TP) or layers (PP) from E8 pages, protected layers where they live; eviction is
decided once from the scores of every rank, and every rank frees the blocks one rank would free; log-probabilities
stay as close to one rank as ``auto``'s own do. The engines run through ``benchmarks/parallel.py`` (one corpus
chunk here; ``python -m benchmarks.parallel`` measures more and against ``auto``).
"""

from __future__ import annotations

import pytest

from benchmarks.parallel import CONFIGS, Config, chunks, compare, serve
from nexusquant_vllm.dtypes import get_format
from nexusquant_vllm.vllm_glue.plugin import register

register()

E8_LAYER = ["uint8", "e8-k3v2"]  # a layer's cache dtype and served dtype
PROTECTED = {0, 1, 28, 29}  # SmolLM2's 30 layers, the default protection


@pytest.fixture(scope="module")
def token_chunks() -> list[list[int]]:
    return chunks(1, seed=0)


RATES = (0.35, 0.6)  # the head mean and the head max (heads_for_rate): two reductions across ranks


@pytest.fixture(scope="module")
def tp1(token_chunks) -> dict:
    return serve(CONFIGS["e8-k3v2-tp1"], token_chunks, RATES)


@pytest.fixture(scope="module")
def tp2(token_chunks) -> dict:
    return serve(CONFIGS["e8-k3v2-tp2"], token_chunks, RATES)


@pytest.fixture(scope="module")
def pp2(token_chunks) -> dict:
    return serve(CONFIGS["e8-k3v2-pp2"], token_chunks, RATES)


def _layer_index(name: str) -> int:
    return int(name.split(".layers.")[1].split(".")[0])


def _check_layers(rank: dict, layers: range, heads: int) -> None:
    assert sorted(_layer_index(n) for n in rank["layers"]) == list(layers)
    for name, (shape, dtype, served) in rank["layers"].items():
        assert shape[1] == heads, name
        if _layer_index(name) in PROTECTED:
            assert [dtype, served, shape[-1]] == ["bfloat16", "auto", 128], name
        else:
            assert [dtype, served, shape[-1]] == [*E8_LAYER, 44], name  # 44 B per token-head


def test_tp2_each_rank_serves_half_the_heads_of_every_layer(tp2):
    ranks = sorted(tp2["ranks"], key=lambda r: r["rank"])
    assert [(r["rank"], r["world"]) for r in ranks] == [(0, 2), (1, 2)]
    for rank in ranks:
        _check_layers(rank, range(30), heads=3)


def test_pp2_each_rank_serves_its_layers_with_their_protection(pp2):
    ranks = sorted(pp2["ranks"], key=lambda r: r["rank"])
    _check_layers(ranks[0], range(15), heads=6)
    _check_layers(ranks[1], range(15, 30), heads=6)


@pytest.mark.parametrize("name", ["tp2", "pp2"])
def test_every_rank_frees_the_blocks_one_rank_frees(name, tp1, tp2, pp2):
    """One decision, applied on every rank, from the scores one rank computes over every head and layer (at 35%
    the mean over heads, at 60% the max: a sum of the ranks' scores would double the first and misrank the
    second; one rank's scores alone differ by 10-25%), and so the blocks one rank frees."""
    run = {"tp2": tp2, "pp2": pp2}[name]
    c = compare(run, tp1)
    assert c["block_score_relative_error"] < 0.05, c["block_score_relative_error"]
    assert run["freed"] == tp1["freed"] and all(run["freed"])
    for rank in run["ranks"]:
        assert rank["applied"] == run["freed"], rank["rank"]


def test_tp2_outputs_match_one_rank(tp1, tp2):
    """Bounds: ``benchmarks/parallel.py`` measured top-1 agreement 0.974 and mean |Δ log-probability| 0.041 without
    eviction (``auto``'s own TP=2: 0.979, 0.039), 0.953 and 0.082 on the continuation after eviction (4 chunks)."""
    c = compare(tp2, tp1)
    print("TP=2 vs TP=1:", c)
    assert c["plain"]["top1_agreement"] >= 0.95 and c["plain"]["mean_abs_dlogprob"] <= 0.08
    assert c["evicted"]["top1_agreement"] >= 0.85 and c["evicted"]["mean_abs_dlogprob"] <= 0.2


def test_pp2_outputs_match_one_rank(tp1, pp2):
    """Stages split layers, not sums: the same numbers as one rank without eviction. With eviction, the pipeline
    computes the continuation's first tokens while the decision is on its way (see the eviction connector)."""
    c = compare(pp2, tp1)
    print("PP=2 vs TP=1:", c, "computed before eviction:", pp2["computed_before_eviction"])
    assert c["plain"]["top1_agreement"] >= 0.99 and c["plain"]["mean_abs_dlogprob"] <= 0.01
    assert c["evicted"]["top1_agreement"] >= 0.85 and c["evicted"]["mean_abs_dlogprob"] <= 0.2


def test_startup_budget_over_all_ranks_does_not_depend_on_the_split():
    """The log line's all-ranks figure: the whole cache, however TP and PP cut it (6 KV heads x (26 E8 layers x 44 B
    + 4 protected layers x 256 B in bf16, or x 68 B in e8-k4v4) per token)."""
    from vllm.engine.arg_utils import EngineArgs

    from nexusquant_vllm.model_store import split_smollm2
    from nexusquant_vllm.vllm_glue.startup import all_ranks_budget

    for protect_format, protected_slot in [("auto", 256), ("e8-k4v4", 68)]:
        for tp, pp in [(1, 1), (2, 1), (1, 2), (3, 2)]:
            config = EngineArgs(model=split_smollm2(), kv_cache_dtype="e8-k3v2", max_model_len=512,
                                tensor_parallel_size=tp, pipeline_parallel_size=pp,
                                additional_config={"nexusquant": {"protect_format": protect_format}},
                                ).create_engine_config()
            budget = all_ranks_budget(config)
            assert budget == {"bytes_per_token": 6 * (26 * 44 + 4 * protected_slot),
                              "dense_bytes_per_token": 6 * 30 * 256, "ranks": tp * pp, "protected": 4}, (tp, pp)


SHORT = 256  # prompt tokens, prefilled 64 at a time: the later chunks read the earlier ones from the pages


@pytest.fixture(scope="module")
def auto_short(token_chunks) -> dict:
    return serve(CONFIGS["auto-tp1"], [token_chunks[0][:SHORT]], rates=(), chunk=64)


# (top-1 agreement, mean |Δ log-probability|) vs auto at TP=1 on the short prompt: measured 0.875 / 0.295 (k2v2),
# 0.965 / 0.138 (k3v3), 0.945 / 0.120 (k4v2), 0.965 / 0.073 (k4v4); bounds with ~1.5x margin on the deviation.
DTYPE_BOUNDS = {"e8-k2v2": (0.82, 0.45), "e8-k3v3": (0.91, 0.21), "e8-k4v2": (0.89, 0.18), "e8-k4v4": (0.91, 0.11)}


@pytest.mark.parametrize("dtype", sorted(DTYPE_BOUNDS))
def test_tp2_serves_every_e8_dtype(dtype, token_chunks, auto_short):
    """Each rank's pages have the dtype's slot size, and the prompt's log-probabilities, read back from the pages of
    the earlier chunks, stay near ``auto``'s (a garbage path is off by nats)."""
    run = serve(Config(dtype, tp=2), [token_chunks[0][:SHORT]], rates=(), chunk=64)
    for rank in run["ranks"]:
        e8 = [shape for shape, dtype_, served in rank["layers"].values() if served == dtype]
        assert len(e8) == 26 and all(s[1] == 3 and s[-1] == get_format(dtype, 64).slot_bytes for s in e8)
    c = compare(run, auto_short)["plain"]
    print(dtype, "TP=2 vs auto TP=1:", c)
    top1, deviation = DTYPE_BOUNDS[dtype]
    assert c["top1_agreement"] >= top1 and c["mean_abs_dlogprob"] <= deviation
