"""Passkey retrieval through vLLM with prefill-time eviction at several rates (e8 KV cache, SmolLM2-135M, CPU).

Protocol: a 5-digit passkey sentence is buried at a relative depth of the prompt inside filler text of BBC News
corpus sentences; the prompt ends with a question and the model answers greedily (8 tokens). A trial counts as
recalled if the passkey appears in the answer. The same prompts run at every rate in one engine (the rate is set per
request through ``extra_args={"nq_eviction": rate}``), so only eviction differs. Also reported per rate: mean tokens
evicted and blocks freed, from ``RequestOutput.kv_transfer_params["nq_eviction"]``.

Not measured here (yet): continuation perplexity over an evicted cache and the kvpress baseline; see the eviction
issue.

    python -m benchmarks.eviction [--prompt-tokens 1000] [--trials 6] [--rates 0,0.35,0.6,0.8]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

BLOCK_SIZE = 32


def passkey_prompts(tokenizer, n_trials: int, prompt_tokens: int, seed: int) -> list[tuple[str, str, float]]:
    """(prompt, passkey, depth) triples; depths spread evenly over (0.1, 0.9)."""
    from benchmarks.corpus import load_corpus_text

    rng = random.Random(seed)
    sentences = [s.strip() + "." for s in load_corpus_text().split(".") if 40 < len(s.strip()) < 300]
    out = []
    for t in range(n_trials):
        key = str(rng.randint(10000, 99999))
        depth = 0.1 + 0.8 * t / max(n_trials - 1, 1)
        needle = f" The passkey is {key}. Remember it: {key}."
        filler, n = [], 0
        while n < prompt_tokens - 60:
            s = rng.choice(sentences)
            filler.append(s)
            n += len(tokenizer(s).input_ids)
        cut = int(len(filler) * depth)
        body = " ".join(filler[:cut]) + needle + " " + " ".join(filler[cut:])
        out.append((f"{body}\nQuestion: what is the passkey? Answer: The passkey is", key, depth))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-tokens", type=int, default=1000)
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--rates", default="0,0.35,0.6,0.8")
    parser.add_argument("--kv-cache-dtype", default="e8-k3v2")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    from benchmarks.common import write_results
    from nexusquant_vllm.model_store import smollm2_path
    from nexusquant_vllm.vllm_glue.eviction import kv_transfer_config

    rates = [float(r) for r in args.rates.split(",")]
    llm = LLM(
        model=str(smollm2_path()), kv_cache_dtype=args.kv_cache_dtype, max_model_len=args.prompt_tokens + 256,
        block_size=BLOCK_SIZE, enforce_eager=True, seed=0, max_num_seqs=4, enable_prefix_caching=False,
        kv_transfer_config=kv_transfer_config("lossless", min_prompt_tokens=256),
    )
    trials = passkey_prompts(llm.get_tokenizer(), args.trials, args.prompt_tokens, args.seed)
    rows = []
    for rate in rates:
        t0 = time.time()
        sp = SamplingParams(temperature=0, max_tokens=8, extra_args={"nq_eviction": rate})
        outs = llm.generate([p for p, _, _ in trials], sp, use_tqdm=False)
        hits, evicted, freed = [], [], []
        for out, (_, key, depth) in zip(outs, trials):
            hits.append(key in out.outputs[0].text)
            stats = (out.kv_transfer_params or {}).get("nq_eviction", {})
            evicted.append(stats.get("tokens_evicted", 0) / len(out.prompt_token_ids))
            freed.append(stats.get("blocks_freed", 0))
        rows.append({
            "rate": rate, "recall": sum(hits) / len(hits), "hits": hits,
            "depths": [round(d, 2) for _, _, d in trials], "mean_fraction_evicted": sum(evicted) / len(evicted),
            "mean_blocks_freed": sum(freed) / len(freed), "seconds": round(time.time() - t0, 1),
        })
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["recall"] or float("nan")
    table = "| rate | recall | vs rate 0 | fraction evicted | blocks freed |\n|---|---|---|---|---|\n" + "".join(
        f"| {r['rate']:.2f} | {r['recall']:.2f} | {r['recall'] / base:.2f} | {r['mean_fraction_evicted']:.2f} "
        f"| {r['mean_blocks_freed']:.1f} |\n" for r in rows
    )
    payload = {"config": vars(args), "rows": rows}
    print(table)
    write_results("eviction_passkey", payload, table)


if __name__ == "__main__":
    main()
