"""Prefill-time eviction through vLLM (CPU, SmolLM2-135M, e8-k3v2, block size 32): exact free-block accounting, the
worker's block table mirrors the scheduler, generation stays coherent (also in a second chat turn served from
evicted prefix-cache blocks), aborts and preemption leak nothing, an eviction point inside the prompt
(``nq_eviction_at``) evicts before the rest of the prompt is computed, the stats reach vLLM's Prometheus metrics,
invalid values are refused with clear errors.

One in-process engine (so the scheduler's block pool and the worker's tables are visible) serves every engine test.
"""

from __future__ import annotations

import pytest
from preemption import counting_preemptions

from nexusquant_vllm.vllm_glue.eviction import kv_transfer_config
from nexusquant_vllm.vllm_glue.plugin import register

register()

BLOCK_SIZE = 32
CHUNK = 512  # max_num_batched_tokens
NUM_BLOCKS = 36  # x 32 tokens: four ~290-token requests decoding 96 tokens each cannot all fit: preemption
FACTS = [
    "The harbour town of Velmora was founded by fishermen who traded salted cod with the northern islands.",
    "Its lighthouse, painted red and white, was rebuilt in 1887 after a winter storm destroyed the old tower.",
    "Every spring the town holds a festival where children race small wooden boats along the canal.",
    "The baker on Mill Street is famous for a rye bread flavoured with caraway seeds and dark honey.",
    "A narrow railway connects Velmora to the capital, crossing three stone bridges and a long tunnel.",
    "Most houses have slate roofs and blue doors, a tradition said to keep bad luck away from the sea.",
    "The town library keeps old maps of the coastline drawn by a cartographer named Ilse Brandt.",
    "In the autumn, flocks of geese rest on the marshes south of the harbour before flying further south.",
]


def long_prompt(n_sentences: int, tag: str = "") -> str:
    body = " ".join(FACTS[i % len(FACTS)] for i in range(n_sentences))
    return f"{tag}Here is a description of a town. {body} Question: what colour are the doors of the houses? Answer:"


@pytest.fixture(scope="module")
def engine(model_path, llm_factory):
    with llm_factory(
        model_path, "e8-k3v2", in_process=True, max_model_len=1088, block_size=BLOCK_SIZE,
        num_gpu_blocks_override=NUM_BLOCKS, max_num_seqs=4, enable_prefix_caching=True,
        max_num_batched_tokens=CHUNK,  # long prompts prefill in chunks: scores read the earlier chunks from pages
        disable_log_stats=False,  # vLLM's stat loggers, Prometheus included, run in this process
        kv_transfer_config=kv_transfer_config("lossless", min_prompt_tokens=256),
    ) as llm:
        core = llm.llm_engine.engine_core.engine_core
        yield {
            "llm": llm,
            "scheduler": core.scheduler,
            "pool": core.scheduler.kv_cache_manager.block_pool,
            "connector": core.scheduler.connector,
            "runner": core.model_executor.driver_worker.worker.model_runner,
        }


def _sp(rate, max_tokens=24, at=None, **kw):
    from vllm import SamplingParams

    extra = {} if rate is None else {"nq_eviction": rate}
    if at is not None:
        extra["nq_eviction_at"] = at
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, extra_args=extra, **kw)


def _event(connector, req_id):
    """The eviction event of a request (vLLM suffixes the user's request id internally)."""
    return next((e for e in connector.events if e["req_id"] == req_id or e["req_id"].startswith(req_id + "-")), None)


def worker_connector():
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    return get_kv_transfer_group()


def _assert_fluent(text: str) -> None:
    words = text.split()
    # words, not a repeated token (the length alone is no test: the model may stop early, e.g. after a short list)
    assert len(set(words)) >= 5 and max(map(words.count, words)) <= len(words) // 2, text
    assert sum(c.isalpha() or c.isspace() for c in text) >= 0.8 * len(text), text


def _step_until_evicted(engine, req_id, max_steps=50):
    llm_engine, connector = engine["llm"].llm_engine, engine["connector"]
    for _ in range(max_steps):
        llm_engine.step()
        if (event := _event(connector, req_id)) is not None:
            return event
    raise AssertionError(f"{req_id} was never evicted")


PROM_SAMPLES = ("vllm:nq_eviction_tokens_evicted_sum", "vllm:nq_eviction_blocks_freed_sum",
                "vllm:nq_eviction_blocks_freed_count")


def _prom_totals() -> list[float]:
    """The eviction histograms' samples in the Prometheus registry that a server's /metrics serves."""
    from prometheus_client import REGISTRY

    samples = [s for metric in REGISTRY.collect() for s in metric.samples]
    return [sum(s.value for s in samples if s.name == name) for name in PROM_SAMPLES]


def test_free_blocks_rise_by_exactly_the_freed_blocks_and_worker_mirrors(engine):
    """Also: the request's stats reach vLLM's Prometheus stat logger through the KV-connector stats channel (the
    histograms' sums and count grow by exactly this request's stats)."""
    llm_engine, pool, scheduler, runner = (engine[k] for k in ("llm", "pool", "scheduler", "runner"))
    llm_engine = llm_engine.llm_engine
    free_start = pool.get_num_free_blocks()
    prom_before = _prom_totals()
    llm_engine.add_request("acct", long_prompt(13, "A. "), _sp(0.35, max_tokens=8))
    event = _step_until_evicted(engine, "acct")
    rid = event["req_id"]
    assert event["blocks"], event
    assert event["blocks_freed"] == len(event["blocks"])
    # The eviction step allocated nothing new (decode stays in the prompt's last block or takes exactly one).
    blocks = scheduler.kv_cache_manager.coordinator.single_type_managers[0].req_to_blocks[rid]
    assert all(blocks[i].is_null for i in event["blocks"])
    assert sum(b.is_null for b in blocks) == len(event["blocks"])
    assert event["tokens_evicted"] == len(event["blocks"]) * BLOCK_SIZE
    assert event["tokens_evicted"] <= 0.35 * event["prompt_tokens"]
    # Compaction rewrote the other eligible blocks; none of them stays a prefix-cache entry.
    assert event["compacted"] and event["blocks_compacted"] == len(event["compacted"])
    assert not set(event["compacted"]) & set(event["blocks"])
    assert all(blocks[i].block_hash is None for i in event["compacted"])
    # Worker: both the persistent batch row and the request's block_ids hold the null block at the holes.
    state = runner.requests[rid]
    row = runner.input_batch.req_id_to_index[rid]
    table = runner.input_batch.block_table.block_tables[0].block_table.np[row]
    for i, b in enumerate(blocks):
        assert state.block_ids[0][i] == b.block_id
        assert table[i] == b.block_id
    outs = []
    while llm_engine.has_unfinished_requests():
        outs += [o for o in llm_engine.step() if o.finished]
    assert outs[0].kv_transfer_params["nq_eviction"]["blocks_freed"] == len(event["blocks"])
    assert pool.get_num_free_blocks() == free_start
    assert worker_connector().collector.head_scorer is not None  # SmolLM2's RoPE was found: the worker compacted
    assert worker_connector().collector.compactions == {}  # and dropped the compaction scores
    prom_delta = [a - b for a, b in zip(_prom_totals(), prom_before)]
    assert prom_delta == [event["tokens_evicted"], event["blocks_freed"], 1]
    print(f"\nfree blocks back to {free_start}; eviction event {event}")


def test_generation_coherent_after_35_percent_eviction(engine):
    llm = engine["llm"]
    prompt = long_prompt(46)  # ~1000 tokens
    n_prompt = len(llm.get_tokenizer()(prompt).input_ids)
    assert 900 <= n_prompt <= 1200, n_prompt
    # One after the other: the second request's prefill is mostly a prefix-cache hit on the first one's (clean)
    # prompt blocks, which it then evicts from its own table (shared blocks would be kept).
    ref = llm.generate([prompt], _sp(0.0, 32))[0]
    ev = llm.generate([prompt], _sp(0.35, 32))[0]
    stats = ev.kv_transfer_params["nq_eviction"]
    assert ref.kv_transfer_params is None
    assert stats["tokens_evicted"] >= 0.3 * n_prompt, stats
    ref_text, ev_text = ref.outputs[0].text, ev.outputs[0].text
    print(f"\n[lossless] {ref_text!r}\n[35%: {stats}] {ev_text!r}")
    _assert_fluent(ev_text)
    common = 0
    for a, b in zip(ref.outputs[0].token_ids, ev.outputs[0].token_ids):
        if a != b:
            break
        common += 1
    assert common >= 2, (ref_text, ev_text)  # same start; after that a 135M model may legitimately diverge


def test_a_number_the_question_asks_for_comes_back_whole_after_compaction(engine):
    """A 7-digit number (one token per digit) hidden in a ~900-token prompt and asked for at its end: after a 35%
    eviction and the per-head compaction, every layer and head still holds its digits (the fact guard), and the
    answer is the number, whole. (At 60%, run after it on this engine, the answer was ``731271271``: the key,
    Velmora, recurs in the filler, and the guard's 36 tokens went to those runs first: a known gap.)"""
    rate = 0.35
    llm = engine["llm"]
    sentences = [FACTS[i % len(FACTS)] for i in range(40)]
    sentences.insert(13, "The secret number of Velmora is 7312716.")
    prompt = (" ".join(sentences) + "\nQuestion: what is the secret number of Velmora? Answer: The secret number of "
              "Velmora is")
    out = llm.generate([prompt], _sp(rate, max_tokens=10))[0]
    stats = out.kv_transfer_params["nq_eviction"]
    print(f"\n[{rate:.0%}: {stats}] {out.outputs[0].text!r}")
    assert stats["tokens_evicted"] >= (rate - 0.05) * stats["prompt_tokens"], stats
    assert worker_connector().collector.guard_share == 0.125
    assert out.outputs[0].text.split(".")[0].strip() == "7312716", out.outputs[0].text


def _prom_gauge(name: str) -> float:
    from prometheus_client import REGISTRY

    return sum(s.value for metric in REGISTRY.collect() for s in metric.samples if s.name == name)


def test_abort_after_eviction_leaks_nothing(engine):
    """Neither blocks nor the connector's per-request entries (its Prometheus gauges back to 0)."""
    llm_engine, pool = engine["llm"].llm_engine, engine["pool"]
    free_start = pool.get_num_free_blocks()
    llm_engine.add_request("abort-me", long_prompt(13, "B. "), _sp(0.6, max_tokens=16))
    event = _step_until_evicted(engine, "abort-me")
    assert event["blocks_freed"] > 0
    assert _prom_gauge("vllm:nq_eviction_tracked_requests") == 1
    llm_engine.abort_request(["abort-me"])
    llm_engine.add_request("after-abort", "Hello", _sp(0.0, max_tokens=2))  # one more step reports the gauges
    while llm_engine.has_unfinished_requests():
        llm_engine.step()
    assert pool.get_num_free_blocks() == free_start
    assert _prom_gauge("vllm:nq_eviction_tracked_requests") == 0
    assert _prom_gauge("vllm:nq_eviction_pending_compactions") == 0


def test_preemption_resets_and_redoes_eviction(engine):
    llm, pool, scheduler, connector = (engine[k] for k in ("llm", "pool", "scheduler", "connector"))
    free_start = pool.get_num_free_blocks()
    with counting_preemptions(scheduler) as preempted:
        prompts = [long_prompt(13, f"{i}. ") for i in range(4)]
        outs = llm.generate(prompts, _sp(0.35, max_tokens=96))
    assert preempted, "the test needs at least one preemption"
    assert all(len(o.outputs[0].token_ids) == 96 for o in outs)
    assert all(o.kv_transfer_params["nq_eviction"]["blocks_freed"] > 0 for o in outs)
    by_req = {}
    for e in connector.events:
        by_req.setdefault(e["req_id"], []).append(e)
    redone = [r for r in set(preempted) if len(by_req.get(r, [])) >= 2]
    print(f"\npreempted {preempted}; evictions per request { {r: len(v) for r, v in by_req.items()} }")
    assert redone, "a preempted request must be evicted again after its re-prefill"
    assert pool.get_num_free_blocks() == free_start


def test_prefix_cache_never_serves_post_eviction_blocks(engine):
    """A second request with the same prompt + the first one's continuation must not hit blocks written after the
    first request's eviction (they were computed over holes)."""
    llm = engine["llm"]
    from vllm import TokensPrompt

    tok = llm.get_tokenizer()
    prompt_ids = tok(long_prompt(13, "C. ")).input_ids
    first = llm.generate([TokensPrompt(prompt_token_ids=prompt_ids)], _sp(0.35, max_tokens=40))[0]
    assert first.kv_transfer_params["nq_eviction"]["blocks_freed"] > 0
    follow = prompt_ids + list(first.outputs[0].token_ids)
    second = llm.generate([TokensPrompt(prompt_token_ids=follow)], _sp(None, max_tokens=1))[0]
    # Cached prefix: at most the first request's full prompt blocks, never a block completed after the eviction.
    assert second.num_cached_tokens <= (len(prompt_ids) // BLOCK_SIZE) * BLOCK_SIZE, second.num_cached_tokens


def test_multi_turn_resend_hits_evicted_blocks_and_stays_coherent(engine):
    """Turn 2 resends turn 1's prompt and answer plus a new question: its prefix-cache hit covers turn 1's full prompt
    blocks up to the first one the compaction rewrote (those left the prefix cache), the evicted ones included
    (freed with their hash, their KV computed over the full context), and it evicts again over its own longer
    prompt; the answer stays fluent and no block leaks."""
    from vllm import TokensPrompt

    llm, pool = engine["llm"], engine["pool"]
    tok = llm.get_tokenizer()
    free_start = pool.get_num_free_blocks()
    turn1_ids = tok(long_prompt(26, "M. ")).input_ids
    turn1 = llm.generate([TokensPrompt(prompt_token_ids=turn1_ids)], _sp(0.6, max_tokens=16))[0]
    assert turn1.kv_transfer_params["nq_eviction"]["blocks_freed"] > 0
    assert pool.get_num_free_blocks() == free_start
    question = tok("\nQuestion: what was rebuilt in 1887, and why? Answer:", add_special_tokens=False).input_ids
    turn2_ids = turn1_ids + list(turn1.outputs[0].token_ids) + question
    turn2 = llm.generate([TokensPrompt(prompt_token_ids=turn2_ids)], _sp(0.6, max_tokens=24))[0]
    stats = turn2.kv_transfer_params["nq_eviction"]
    print(f"\n[turn 1] {turn1.outputs[0].text!r}\n[turn 2: cached {turn2.num_cached_tokens}, {stats}] "
          f"{turn2.outputs[0].text!r}")
    compacted = _event(engine["connector"], turn1.request_id)["compacted"]
    assert compacted, "compaction is on by default"
    assert turn2.num_cached_tokens == min(compacted) * BLOCK_SIZE
    assert stats["blocks_freed"] > 0 and stats["prompt_tokens"] == len(turn2_ids)
    _assert_fluent(turn2.outputs[0].text)
    assert pool.get_num_free_blocks() == free_start


def test_eviction_point_teacher_forces_the_rest_of_the_prompt_over_the_evicted_cache(engine):
    """``nq_eviction_at`` = one chunk: the first chunk's prompt logprobs are those of a run without eviction, the
    tokens after it are computed over the evicted cache (their logprobs change), and the blocks are freed."""
    from vllm import TokensPrompt

    llm, connector = engine["llm"], engine["connector"]
    ids = llm.get_tokenizer()(long_prompt(28, "E. ")).input_ids
    assert len(ids) > CHUNK + 32, len(ids)

    def prompt_logprobs(sp) -> tuple[list[float], object]:
        out = llm.generate([TokensPrompt(prompt_token_ids=ids)], sp)[0]  # prompt_logprobs: no prefix-cache reads
        return [out.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))], out

    ref, _ = prompt_logprobs(_sp(0.0, max_tokens=1, prompt_logprobs=0))
    got, out = prompt_logprobs(_sp(0.6, max_tokens=1, at=CHUNK, prompt_logprobs=0))
    stats = out.kv_transfer_params["nq_eviction"]
    assert stats["evicted_at"] == stats["computed_before_eviction"] == CHUNK, stats
    assert stats["blocks_freed"] == int(0.6 * CHUNK) // BLOCK_SIZE and stats["prompt_tokens"] == len(ids)
    assert max(b for b in _event(connector, out.request_id)["blocks"]) < (CHUNK - 32) // BLOCK_SIZE
    before, after = slice(0, CHUNK), slice(CHUNK, None)  # logprob j: token j + 1, from position j's logits
    assert got[before] == pytest.approx(ref[before], abs=1e-4)
    assert max(abs(a - b) for a, b in zip(got[after], ref[after])) > 1e-2
    print(f"\nmean NLL after the eviction point: {-sum(ref[after]) / len(ref[after]):.3f} without eviction, "
          f"{-sum(got[after]) / len(got[after]):.3f} with 60% of the first {CHUNK} tokens evicted")


@pytest.mark.parametrize("field,value", [
    ("nq_eviction", "lots"), ("nq_eviction", 1.5), ("nq_eviction", -0.2), ("nq_eviction", True),
    ("nq_eviction", [0.3]), ("nq_eviction_at", 0), ("nq_eviction_at", 12.5), ("nq_eviction_at", True),
    ("nq_eviction_at", "512"), ("nq_eviction_protect", [[5, 2]]), ("nq_eviction_protect", [0, 4, 8]),
])
def test_invalid_per_request_value_is_refused(field, value):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match=field) as error:
        SamplingParams(extra_args={field: value})
    assert error.value.parameter == field


def test_eviction_point_defaults_to_the_whole_prompt_and_is_capped_by_it():
    from nexusquant_vllm.vllm_glue.eviction.params import eviction_point

    assert eviction_point(None, 700) == 700
    assert eviction_point({"nq_eviction": 0.6}, 700) == 700
    assert eviction_point({"nq_eviction_at": 512}, 700) == 512
    assert eviction_point({"nq_eviction_at": 4096}, 700) == 700


def test_eviction_stats_aggregate_and_reduce():
    from nexusquant_vllm.vllm_glue.eviction.metrics import EvictionStats

    a, b = EvictionStats(), EvictionStats()
    a.record({"prompt_tokens": 600, "tokens_evicted": 192, "blocks_freed": 6, "rate": 0.35})
    b.record({"prompt_tokens": 1000, "tokens_evicted": 576, "blocks_freed": 18})
    assert EvictionStats().is_empty() and not a.is_empty()
    merged = a.aggregate(EvictionStats(data=b.to_dict()))  # as rebuilt from the IPC payload
    assert merged.reduce() == {"requests": 2, "prompt_tokens": 1600, "tokens_evicted": 768, "blocks_freed": 24}


def test_eviction_stats_gauges_keep_the_latest_value():
    from nexusquant_vllm.vllm_glue.eviction.metrics import EvictionStats

    a, b = EvictionStats(), EvictionStats()
    a.set_gauges(tracked_requests=3, pending_compactions=1)
    assert not a.is_empty()  # a gauge change alone is reported
    b.set_gauges(tracked_requests=0, pending_compactions=0)
    merged = a.aggregate(EvictionStats(data=b.to_dict()))
    assert merged.reduce() == {"requests": 0, "prompt_tokens": 0, "tokens_evicted": 0, "blocks_freed": 0,
                               "tracked_requests": 0, "pending_compactions": 0}


def test_invalid_server_default_and_env_are_refused(monkeypatch):
    from nexusquant_vllm.config import NexusQuantConfig
    from nexusquant_vllm.vllm_glue.eviction.params import server_policy

    with pytest.raises(ValueError, match="kv_connector_extra_config.eviction"):
        kv_transfer_config("half")
    with pytest.raises(ValueError, match="kv_connector_extra_config.eviction"):
        server_policy({"eviction": 2})
    monkeypatch.setenv("NEXUSQUANT_EVICTION", "everything")
    with pytest.raises(ValueError, match="NEXUSQUANT_EVICTION"):
        NexusQuantConfig.from_env()


def test_env_var_installs_the_connector(monkeypatch):
    from types import SimpleNamespace

    from nexusquant_vllm.vllm_glue.startup import before_engine_config

    monkeypatch.setenv("NEXUSQUANT_EVICTION", "balanced")
    args = SimpleNamespace(kv_transfer_config=None, kv_cache_dtype="e8-k3v2", additional_config={})
    before_engine_config(args)
    assert args.kv_transfer_config.kv_connector == "NQEvictionConnector"
    assert args.kv_transfer_config.kv_connector_extra_config["eviction"] == "balanced"
    assert args.additional_config["nexusquant"]["eviction"] == "balanced"  # what every worker reads


def _connector(groups: int):
    from types import SimpleNamespace

    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from nexusquant_vllm.vllm_glue.eviction.connector import NQEvictionConnector

    vllm_config = SimpleNamespace(kv_transfer_config=KVTransferConfig(**kv_transfer_config("balanced")),
                                  cache_config=SimpleNamespace(cache_dtype="e8-k3v2", block_size=32))
    kv_cache_config = SimpleNamespace(kv_cache_groups=[object()] * groups)
    return NQEvictionConnector(vllm_config, KVConnectorRole.SCHEDULER, kv_cache_config)


def test_more_than_one_kv_cache_group_is_refused_at_startup():
    """It used to raise NotImplementedError inside the scheduler, at the first eviction."""
    _connector(1)
    with pytest.raises(ValueError, match="one KV-cache group; this one has 2"):
        _connector(2)


def test_a_pooling_request_is_never_evicted():
    """A request without sampling params (pooling) used to crash the worker's plan (``sampling_params.extra_args``)."""
    from types import SimpleNamespace

    assert _connector(1)._eviction_point(SimpleNamespace(sampling_params=None, num_prompt_tokens=4096)) is None


def test_blocks_shared_with_a_running_request_are_neither_freed_nor_rewritten(engine):
    """B shares A's prompt prefix (a prefix-cache hit on A's first blocks) and runs beside A while A evicts 60% with
    compaction: the shared blocks are neither freed nor compacted, and B's greedy tokens equal those of the same two
    requests without eviction."""
    from vllm import TokensPrompt

    llm, pool = engine["llm"], engine["pool"]
    tok = llm.get_tokenizer()
    shared = tok(long_prompt(14, "S. ")).input_ids
    a_ids = shared + tok(" " + " ".join(FACTS), add_special_tokens=False).input_ids
    b_ids = shared + tok(" Which bridges does the railway cross?", add_special_tokens=False).input_ids
    prompts = [TokensPrompt(prompt_token_ids=a_ids), TokensPrompt(prompt_token_ids=b_ids)]
    free_start = pool.get_num_free_blocks()
    b_tokens = {}
    for rate in (0.0, 0.6):
        llm.reset_prefix_cache()
        outs = llm.generate(prompts, [_sp(rate, max_tokens=16), _sp(None, max_tokens=16)])
        assert outs[1].num_cached_tokens >= BLOCK_SIZE, "B must hit A's blocks for this test to mean anything"
        b_tokens[rate] = list(outs[1].outputs[0].token_ids)
    event = _event(engine["connector"], outs[0].request_id)
    assert event is not None and event["blocks"], event
    shared_blocks = set(range(outs[1].num_cached_tokens // BLOCK_SIZE))
    assert not shared_blocks & (set(event["blocks"]) | set(event["compacted"])), (shared_blocks, event)
    assert b_tokens[0.6] == b_tokens[0.0]
    assert pool.get_num_free_blocks() == free_start


def test_a_prefix_hit_after_another_requests_compaction_reads_what_was_written(engine):
    """A evicts 60% and compacts, then C resends A's prompt with another question: C's prefix-cache hit stops before
    A's first compacted block (those were rewritten and left the cache), and C's greedy tokens equal those of C after
    a request without eviction left exactly the same prefix in the cache (the same hit, so the same prefill chunks:
    a different chunking alone changes the last bits, and with them greedy tokens)."""
    from vllm import TokensPrompt

    llm = engine["llm"]
    tok = llm.get_tokenizer()
    a_ids = tok(long_prompt(24, "C. ")).input_ids
    c_prompt = TokensPrompt(prompt_token_ids=a_ids + tok(" Who drew the old maps?", add_special_tokens=False).input_ids)
    llm.reset_prefix_cache()
    a = llm.generate([TokensPrompt(prompt_token_ids=a_ids)], _sp(0.6, max_tokens=4))[0]
    compacted = _event(engine["connector"], a.request_id)["compacted"]
    assert compacted
    c = llm.generate([c_prompt], _sp(None, max_tokens=16))[0]
    hit = c.num_cached_tokens
    assert 0 < hit <= min(compacted) * BLOCK_SIZE
    llm.reset_prefix_cache()
    llm.generate([TokensPrompt(prompt_token_ids=a_ids[:hit])], _sp(None, max_tokens=1))  # the same prefix, no eviction
    reference = llm.generate([c_prompt], _sp(None, max_tokens=16))[0]
    assert reference.num_cached_tokens == hit
    assert list(c.outputs[0].token_ids) == list(reference.outputs[0].token_ids)
