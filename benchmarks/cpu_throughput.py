"""CPU decode throughput of an e8 KV cache vs ``auto`` on SmolLM2-135M: batch 8, 1K-token prompts of real text.

Decode throughput comes from vLLM's per-request engine timestamps: the request whose first token came last was the
last prefill, so from its first token on every request of the batch is decoding; over that window the batch produces
``batch`` tokens per step, and throughput = batch x (N - 1) / (its last token time - its first token time).
Writes results/cpu_throughput.{json,md}.

    python -m benchmarks.cpu_throughput [--dtypes auto,e8-k3v2] [--new-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
# A long e8 prefill step on a loaded machine can exceed vLLM's 300 s default.
os.environ.setdefault("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "3600")


def measure(model: str, dtype: str, prompts: list[list[int]], new_tokens: int) -> dict:
    from vllm import LLM, SamplingParams, TokensPrompt

    from benchmarks.common import shutdown_llm

    llm = LLM(model=model, kv_cache_dtype=dtype, max_model_len=2048, enforce_eager=True, seed=0,
              enable_prefix_caching=False, max_num_seqs=len(prompts), disable_log_stats=False)
    t0 = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                        SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True), use_tqdm=False)
    wall = time.perf_counter() - t0
    assert all(len(o.outputs[0].token_ids) == new_tokens for o in outs)
    first = [o.metrics.first_token_ts for o in outs]
    last = [o.metrics.last_token_ts for o in outs]
    shutdown_llm(llm)
    i = max(range(len(outs)), key=lambda j: first[j])  # the last request to finish prefill
    decode_s = last[i] - first[i]
    return {"dtype": dtype, "wall_s": wall, "first_token_ts": first, "last_token_ts": last,
            "decode_s": decode_s, "s_per_step": decode_s / (new_tokens - 1),
            "decode_tokens_per_s": len(prompts) * (new_tokens - 1) / decode_s}


def median_run(runs: list[dict]) -> dict:
    """The run with the median decode throughput, plus every run's throughput."""
    ordered = sorted(runs, key=lambda r: r["decode_tokens_per_s"])
    return {**ordered[(len(ordered) - 1) // 2], "all_tokens_per_s": [r["decode_tokens_per_s"] for r in runs]}


def main() -> None:
    from transformers import AutoTokenizer

    from benchmarks.common import corpus_token_chunks, smollm2_path, write_results

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtypes", default="auto,e8-k3v2")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="runs per dtype, interleaved; the median is reported")
    args = p.parse_args()

    model = str(smollm2_path())
    prompts = corpus_token_chunks(AutoTokenizer.from_pretrained(model), args.batch, args.prompt_len, seed=1)
    dtypes = args.dtypes.split(",")
    runs: dict[str, list[dict]] = {d: [] for d in dtypes}
    for _ in range(args.repeats):  # interleaved, so that a slow spell of a shared machine hits every dtype
        for d in dtypes:
            runs[d].append(measure(model, d, prompts, args.new_tokens))
            print(runs[d][-1], flush=True)
    rows = [median_run(runs[d]) for d in dtypes]
    base = next((r for r in rows if r["dtype"] == "auto"), None)
    for r in rows:
        r["vs_auto"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"] if base else None
    payload = {"model": "SmolLM2-135M-Instruct (bf16)", "vllm": "vllm-cpu 0.32.0", "cpu_threads": os.cpu_count(),
               "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
               "repeats": args.repeats, "rows": rows}
    table = ["| dtype | decode tok/s (median) | vs auto | every run (tok/s) | wall incl. prefill (s) |",
             "|---|---|---|---|---|"]
    for r in rows:
        vs = f"{r['vs_auto']:.2f}x" if r["vs_auto"] is not None else "–"
        every = ", ".join(f"{x:.1f}" for x in r["all_tokens_per_s"])
        table.append(f"| {r['dtype']} | {r['decode_tokens_per_s']:.2f} | {vs} | {every} | {r['wall_s']:.1f} |")
    write_results("cpu_throughput", payload, "\n".join(table))
    print("\n".join(table))


if __name__ == "__main__":
    main()
