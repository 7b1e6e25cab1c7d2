"""Capacity with prefill-time eviction: at a fixed KV memory (a fixed number of KV blocks), how many long requests
decode at once, and the output tokens/s, eviction off vs 35/60/80%.

Protocol: one in-process vLLM engine (so the scheduler is visible) with `--blocks` KV blocks of 32 tokens,
`max_num_seqs` 32, prefix caching off. For each rate, `--requests` prompts of `--prompt-len` corpus tokens (distinct
chunks; the same ones at every rate) are submitted at once, each generating `--new-tokens` tokens (ignore_eos). After
every engine step the running requests whose prompt is fully computed are counted ("decoding"); reported are the
maximum and the step-average of that count, the output tokens/s over the whole batch (prefill included) and the
mean blocks freed per request (`kv_transfer_params`). vLLM still admits a request only when its *whole* prompt fits
(`allocate_slots`), so eviction raises concurrency only after prefill, as the freed blocks admit the next request.

The KV cache runs in the model dtype through the nexusquant backend with every layer protected (`--dtype bf16`,
as in benchmarks/eviction.py) by default, because e8 prefill on this 2-core CPU (~30 tokens/s) would take ~30 min
per rate; concurrency is a matter of blocks, and the block count per request does not depend on the dtype (the same
bytes hold 5.8x more e8 blocks, see README). `--dtype e8-k3v2` runs the same with the e8 cache.

    python -m benchmarks.eviction_capacity [--blocks 112] [--requests 12] [--prompt-len 1024] [--new-tokens 64]
    python -m benchmarks.eviction report
"""

from __future__ import annotations

import argparse
import os
import time

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core in this process: the scheduler is visible
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from benchmarks.common import ALL_LAYERS_BF16  # noqa: E402
from benchmarks.common import EVICTION_BLOCK_SIZE as BLOCK_SIZE  # noqa: E402
from benchmarks.common import EVICTION_RATES as RATES  # noqa: E402

CAPACITY = "eviction_capacity"  # the results name `python -m benchmarks.eviction report` reads

BF16_BYTES_PER_TOKEN = 30 * 3 * 64 * 2 * 2  # SmolLM2-135M: layers x KV heads x head_dim x (K, V) x bf16


def start_engine(dtype: str, args):
    from vllm import LLM

    from benchmarks.common import smollm2_path
    from nexusquant_vllm.vllm_glue.eviction import kv_transfer_config

    return LLM(
        model=str(smollm2_path()), kv_cache_dtype="e8-k3v2", max_model_len=args.prompt_len + args.new_tokens + 64,
        additional_config=ALL_LAYERS_BF16 if dtype == "bf16" else {},
        block_size=BLOCK_SIZE, num_gpu_blocks_override=args.blocks, enforce_eager=True, seed=0, max_num_seqs=32,
        max_num_batched_tokens=1024, enable_prefix_caching=False,
        kv_transfer_config=kv_transfer_config("lossless", min_prompt_tokens=256),
    )


def run_rate(llm, prompts: list[list[int]], new_tokens: int, rate: float) -> dict:
    """Submit every prompt at once and step the engine to the end, counting decoding requests after each step."""
    from tqdm import tqdm
    from vllm import SamplingParams, TokensPrompt

    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    sp = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True, extra_args={"nq_eviction": rate})
    for i, ids in enumerate(prompts):
        engine.add_request(f"cap-{rate}-{i}", TokensPrompt(prompt_token_ids=ids), sp)
    decoding, finished = [], []
    t0 = time.time()
    with tqdm(total=len(prompts), desc=f"capacity, rate {rate}") as bar:
        while engine.has_unfinished_requests():
            done = [o for o in engine.step() if o.finished]
            finished += done
            bar.update(len(done))
            decoding.append(sum(r.num_computed_tokens >= r.num_prompt_tokens for r in scheduler.running))
    wall = time.time() - t0
    out_tokens = sum(len(o.outputs[0].token_ids) for o in finished)
    freed = [(o.kv_transfer_params or {}).get("nq_eviction", {}).get("blocks_freed", 0) for o in finished]
    return {"rate": rate, "max_decoding": max(decoding), "mean_decoding": sum(decoding) / len(decoding),
            "output_tokens": out_tokens, "wall_s": round(wall, 1), "output_tok_s": out_tokens / wall,
            "mean_blocks_freed": sum(freed) / len(freed), "steps": len(decoding)}


def capacity_table(rows: list[dict]) -> str:
    base = rows[0]
    lines = ["| rate | max decoding at once | vs no eviction | mean decoding | output tok/s | vs no eviction | "
             "blocks freed / request | wall (s) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['rate']:.2f} | {r['max_decoding']} | {r['max_decoding'] / base['max_decoding']:.2f}x | "
                     f"{r['mean_decoding']:.2f} | {r['output_tok_s']:.2f} | "
                     f"{r['output_tok_s'] / base['output_tok_s']:.2f}x | {r['mean_blocks_freed']:.1f} | "
                     f"{r['wall_s']:.0f} |")
    return "\n".join(lines)


def plot_capacity(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{100 * r['rate']:.0f}%" for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.8))
    ax1.bar(labels, [r["max_decoding"] for r in rows], color="C0", label="max")
    ax1.plot(labels, [r["mean_decoding"] for r in rows], "ko-", label="step average")
    ax1.set_ylabel("requests decoding at once")
    ax1.legend(fontsize=8)
    ax2.bar(labels, [r["output_tok_s"] for r in rows], color="C1")
    ax2.set_ylabel("output tokens/s (whole batch)")
    for ax in (ax1, ax2):
        ax.set_xlabel("eviction rate")
    fig.suptitle("Fixed KV blocks, long prompts: eviction off vs on", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    from transformers import AutoTokenizer

    from benchmarks.common import corpus_token_chunks, shutdown_llm, smollm2_path, write_results

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=["bf16", "e8-k3v2"], default="bf16")
    parser.add_argument("--blocks", type=int, default=112)
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rates", type=lambda s: [float(r) for r in s.split(",")], default=list(RATES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default=CAPACITY, help="results/<name>.{json,md}; `report` reads the default")
    args = parser.parse_args()

    prompts = corpus_token_chunks(AutoTokenizer.from_pretrained(str(smollm2_path())), args.requests,
                                  args.prompt_len, args.seed)
    llm = start_engine(args.dtype, args)
    try:
        rows = [run_rate(llm, prompts, args.new_tokens, rate) for rate in args.rates]
    finally:
        shutdown_llm(llm)
    kv_mib = args.blocks * BLOCK_SIZE * BF16_BYTES_PER_TOKEN / 2**20
    title = (f"Capacity ({args.dtype} cache, {args.blocks} blocks x {BLOCK_SIZE} tokens"
             + (f" = {kv_mib:.0f} MiB" if args.dtype == "bf16" else "")
             + f"; {args.requests} prompts of {args.prompt_len} tokens, {args.new_tokens} new tokens each)")
    markdown = title + "\n\n" + capacity_table(rows)
    write_results(args.name, {"config": vars(args), "title": title, "rows": rows}, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
