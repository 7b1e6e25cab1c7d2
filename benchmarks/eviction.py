"""Prefill-time eviction through vLLM (CPU, SmolLM2-135M-Instruct): continuation perplexity and passkey recall vs
the eviction rate, for the `e8-k3v2` cache and an uncompressed `bf16` cache; `report` adds the kvpress baseline
(eviction_kvpress.py) and the capacity run (eviction_capacity.py) and writes results/eviction.{json,md} + PNGs.

**Continuation perplexity** (the protocol eviction_kvpress.py repeats in HF transformers):

* chunks: for each prefix length P (`--prefix-lens`, 512 and 1024), `--chunks` windows of P + C + 1 tokens of the
  BBC News corpus (`common.corpus_token_chunks`, seed 0), C = `--cont-len` (128).
* one request per chunk and rate: the whole window is the prompt, with `prompt_logprobs` and
  `extra_args={"nq_eviction": rate, "nq_eviction_at": P}`. Prefill is chunked at 256 tokens with one request
  scheduled at a time, so the first P tokens are prefilled over the full cache, scored (SnapKV-style window of their
  last 32 queries) and evicted (whole 32-token blocks; the first block and the last 32 prefix tokens kept; the kept
  blocks refilled per layer and KV head with its best tokens unless `--no-compaction`), and the following chunks
  compute the continuation over the evicted cache: teacher forcing. Each request's stats must say
  `computed_before_eviction == P` (checked).
* scored: the C tokens at positions P+1..P+C, predicted by the logits of positions P..P+C-1, all computed after the
  eviction (position P itself is predicted from the prefix's last position, before the eviction).
* reported: PPL per (dtype, P, rate), the paired ΔPPL vs rate 0 of the same dtype with a 95% bootstrap CI over
  chunks (`common.paired_delta`), and the fraction of the prefix evicted (whole blocks, so <= rate).

**Passkey**: `common.passkey_prompts` (a 5-digit key at depths 0.1..0.9 of BBC filler sentences, then a question);
recall = the key appears in the greedy 8-token answer; eviction after the whole prompt (the default).

**dtypes**: `e8-k3v2`, and `bf16`: vLLM's `auto` cannot evict (its CPU attention does not mask freed blocks, so the
connector refuses it); `bf16` is the model-dtype cache served by the nexusquant backend with all 30 layers
protected (`NEXUSQUANT_PROTECT_LAYERS=15`): uncompressed KV with the holes masked.

Cost on the 2-core CPU: e8 prefill runs at ~30 tokens/s (the E8 encoder), so the defaults are small (4 chunks per
prefix length, 5 passkey depths); results say so.

    python -m benchmarks.eviction quality [--dtypes e8-k3v2,bf16] [--chunks 4] [--prefix-lens 512,1024]
    python -m benchmarks.eviction report
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from benchmarks.common import ALL_LAYERS_BF16, passkey_prompts  # noqa: E402
from benchmarks.common import EVICTION_BLOCK_SIZE as BLOCK_SIZE  # noqa: E402
from benchmarks.common import EVICTION_RATES as RATES  # noqa: E402

PREFILL_CHUNK = 256  # max_num_batched_tokens: every prefix length must be a multiple
QUALITY, KVPRESS, CAPACITY = "eviction_quality", "eviction_kvpress", "eviction_capacity"


def continuation_chunks(tokenizer, prefix_len: int, cont_len: int, n_chunks: int, seed: int) -> list[list[int]]:
    """The evaluation windows of one prefix length: prefix_len + cont_len + 1 tokens each."""
    from benchmarks.common import corpus_token_chunks

    return corpus_token_chunks(tokenizer, n_chunks, prefix_len + cont_len + 1, seed)


def scored_positions(prefix_len: int, cont_len: int) -> range:
    """Token positions whose NLL counts: predicted from logits computed after the eviction."""
    return range(prefix_len + 1, prefix_len + cont_len + 1)


def chunk_digest(chunks: list[list[int]]) -> str:
    """A short fingerprint, so that the report can check that vLLM and kvpress scored the same tokens."""
    import hashlib

    return hashlib.sha256(json.dumps(chunks).encode()).hexdigest()[:16]


# ---- vLLM runs ------------------------------------------------------------------------------------------------


def start_engine(dtype: str, max_model_len: int, compaction: bool = True):
    """One engine for all rates (set per request): prefix caching off, one request at a time, 256-token chunks."""
    from vllm import LLM

    from benchmarks.common import smollm2_path
    from nexusquant_vllm.vllm_glue.eviction import kv_transfer_config

    return LLM(
        model=str(smollm2_path()), kv_cache_dtype="e8-k3v2", max_model_len=max_model_len, block_size=BLOCK_SIZE,
        additional_config=ALL_LAYERS_BF16 if dtype == "bf16" else {},
        enforce_eager=True, seed=0, max_num_seqs=1, max_num_batched_tokens=PREFILL_CHUNK, enable_chunked_prefill=True,
        enable_prefix_caching=False,
        kv_transfer_config=kv_transfer_config("lossless", min_prompt_tokens=256, compaction=compaction),
    )


def eviction_stats(output) -> dict:
    return (output.kv_transfer_params or {}).get("nq_eviction", {})


def continuation_nll(llm, chunks: list[list[int]], prefix_len: int, cont_len: int, rate: float) -> dict:
    """Summed NLL of the scored continuation tokens per chunk, with the prefix evicted at `rate` after its prefill."""
    from vllm import SamplingParams, TokensPrompt

    extra = {"nq_eviction": rate, "nq_eviction_at": prefix_len}
    sp = SamplingParams(max_tokens=1, prompt_logprobs=0, extra_args=extra)
    outs = llm.generate([TokensPrompt(prompt_token_ids=c) for c in chunks], sp, use_tqdm=False)
    nll, evicted = [], []
    for out, chunk in zip(outs, chunks):
        stats = eviction_stats(out)
        if rate > 0 and stats.get("computed_before_eviction") != prefix_len:
            raise RuntimeError(f"eviction did not fire at the chunk boundary {prefix_len}: {stats}")
        nll.append(-sum(out.prompt_logprobs[p][chunk[p]].logprob for p in scored_positions(prefix_len, cont_len)))
        evicted.append(stats.get("tokens_evicted", 0) / prefix_len)
    return {"nll": nll, "fraction_evicted": sum(evicted) / len(evicted)}


def passkey_recall(llm, trials: list[tuple[str, str, float]], rate: float) -> dict:
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=8, extra_args={"nq_eviction": rate})
    outs = llm.generate([p for p, _, _ in trials], sp, use_tqdm=False)
    hits = [key in out.outputs[0].text for out, (_, key, _) in zip(outs, trials)]
    evicted = [eviction_stats(o).get("tokens_evicted", 0) / len(o.prompt_token_ids) for o in outs]
    return {"recall": sum(hits) / len(hits), "hits": hits, "depths": [round(d, 2) for _, _, d in trials],
            "fraction_evicted": sum(evicted) / len(evicted)}


def run_dtype(dtype: str, args, chunks_by_len: dict[int, list[list[int]]]) -> tuple[list[dict], list[dict]]:
    """PPL rows and passkey rows of one dtype, one engine."""
    from tqdm import tqdm

    from benchmarks.common import shutdown_llm

    max_len = max(max(chunks_by_len) + args.cont_len + 1, args.passkey_tokens + 64)
    llm = start_engine(dtype, -(-max_len // BLOCK_SIZE) * BLOCK_SIZE, compaction=not args.no_compaction)
    ppl_rows, passkey_rows = [], []
    trials = passkey_prompts(llm.get_tokenizer(), args.passkey_trials, args.passkey_tokens, args.seed)
    try:
        for prefix_len, chunks in chunks_by_len.items():
            for rate in tqdm(args.rates, desc=f"{dtype} PPL, prefix {prefix_len}"):
                t0 = time.time()
                row = continuation_nll(llm, chunks, prefix_len, args.cont_len, rate)
                ppl_rows.append({"dtype": dtype, "prefix_len": prefix_len, "rate": rate, **row,
                                 "wall_s": round(time.time() - t0, 1)})
        for rate in tqdm(args.rates, desc=f"{dtype} passkey"):
            passkey_rows.append({"dtype": dtype, "rate": rate, **passkey_recall(llm, trials, rate)})
    finally:
        shutdown_llm(llm)
    return ppl_rows, passkey_rows


def quality(args) -> None:
    from transformers import AutoTokenizer

    from benchmarks.common import smollm2_path, write_results

    if any(p % PREFILL_CHUNK for p in args.prefix_lens):
        raise SystemExit(f"prefix lengths must be multiples of the prefill chunk {PREFILL_CHUNK}")
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_path()))
    chunks_by_len = {
        p: continuation_chunks(tokenizer, p, args.cont_len, args.chunks, args.seed) for p in args.prefix_lens
    }
    payload = {"config": {**vars(args), "prefill_chunk": PREFILL_CHUNK, "block_size": BLOCK_SIZE,
                          "chunk_digests": {p: chunk_digest(c) for p, c in chunks_by_len.items()}},
               "ppl": [], "passkey": []}
    for dtype in args.dtypes:
        ppl_rows, passkey_rows = run_dtype(dtype, args, chunks_by_len)
        payload["ppl"] += ppl_rows
        payload["passkey"] += passkey_rows
        table = ppl_table(with_deltas(payload["ppl"], "dtype", args.cont_len))
        write_results(args.name, payload, table)  # partial results survive
    print(table)


# ---- report -----------------------------------------------------------------------------------------------------


def with_deltas(rows: list[dict], method_key: str, cont_len: int) -> list[dict]:
    """Each row plus PPL and the paired ΔPPL (95% bootstrap CI) vs rate 0 of the same method and prefix length."""
    import numpy as np

    from benchmarks.common import paired_delta

    base = {(r[method_key], r["prefix_len"]): np.array(r["nll"]) for r in rows if r["rate"] == 0}
    out = []
    for r in rows:
        nll = np.array(r["nll"])
        point, lo, hi = paired_delta(nll, base[(r[method_key], r["prefix_len"])], cont_len)
        out.append({**r, "method": r[method_key], "ppl": math.exp(nll.sum() / (cont_len * len(nll))),
                    "delta_ppl": point, "ci_low": lo, "ci_high": hi})
    return out


def ppl_table(rows: list[dict]) -> str:
    """``rows`` from :func:`with_deltas`."""
    lines = ["| method | prefix | rate | prefix evicted | PPL | ΔPPL vs rate 0 | 95% CI |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['prefix_len']} | {r['rate']:.2f} | {r['fraction_evicted']:.2f} | "
                     f"{r['ppl']:.3f} | {100 * r['delta_ppl']:+.2f}% | "
                     f"[{100 * r['ci_low']:+.2f}%, {100 * r['ci_high']:+.2f}%] |")
    return "\n".join(lines)


def passkey_table(rows: list[dict]) -> str:
    base = {r["dtype"]: r["recall"] for r in rows if r["rate"] == 0}
    lines = ["| dtype | rate | recall | vs rate 0 | hits by depth | prompt evicted |", "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r["recall"] / base[r["dtype"]] if base[r["dtype"]] else float("nan")
        hits = " ".join(f"{d:.1f}:{'y' if h else 'n'}" for d, h in zip(r["depths"], r["hits"]))
        lines.append(f"| {r['dtype']} | {r['rate']:.2f} | {r['recall']:.2f} | {ratio:.2f} | {hits} | "
                     f"{r['fraction_evicted']:.2f} |")
    return "\n".join(lines)


def load_results(name: str) -> dict | None:
    from benchmarks.common import RESULTS_DIR

    path = RESULTS_DIR / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def report(args) -> None:
    from benchmarks.common import RESULTS_DIR, write_results
    from benchmarks.eviction_capacity import capacity_table, plot_capacity  # (eviction_capacity imports no eviction)

    quality_ = load_results(QUALITY)
    kvpress = load_results(KVPRESS)
    capacity = load_results(CAPACITY)
    cont_len = quality_["config"]["cont_len"]
    rows = [{**r, "method": f"nexusquant {r['dtype']}"} for r in quality_["ppl"]]
    if kvpress is not None:
        check_same_chunks(quality_, kvpress)
        rows += [{**r, "method": f"kvpress {r['press']} (fp32)"} for r in kvpress["ppl"]]
    ppl_rows = with_deltas(rows, "method", cont_len)
    sections = [
        f"Continuation PPL over an evicted prefix ({quality_['config']['chunks']} chunks per prefix length, "
        f"{cont_len} scored tokens each; ΔPPL paired vs rate 0 of the same method)\n\n"
        + ppl_table(ppl_rows),
        f"Passkey recall ({quality_['config']['passkey_trials']} depths, ~{quality_['config']['passkey_tokens']}-token "
        "prompts)\n\n" + passkey_table(quality_["passkey"]),
    ]
    if capacity is not None:
        sections.append(capacity["title"] + "\n\n" + capacity_table(capacity["rows"]))
        plot_capacity(capacity["rows"], RESULTS_DIR / "eviction_capacity.png")
    sections.append("Targets\n\n" + "\n".join(targets(ppl_rows, quality_["passkey"], capacity)))
    sections.append(NOTES)
    plot_ppl(ppl_rows, RESULTS_DIR / "eviction_ppl.png")
    markdown = "\n\n".join(sections)
    write_results("eviction", {"ppl": ppl_rows, "passkey": quality_["passkey"],
                               "capacity": capacity and capacity["rows"]}, markdown)
    print(markdown)


NOTES = """Notes

- Small samples (the 2-core CPU is shared; e8 prefill is encoder-bound): the CIs are over 4 chunks, the passkey
  recall over 5 prompts. Treat differences inside the CIs as noise.
- nexusquant evicts whole 32-token blocks chosen once for all layers and heads (that is what frees memory in vLLM's
  paged cache); kvpress drops single tokens per layer and KV head and frees nothing in a paged cache. kvpress runs
  in float32 HF transformers, nexusquant in vLLM with the model's bf16; each ΔPPL is paired against its own rate 0.
- `bf16` = model-dtype KV served by the nexusquant backend with every layer protected (vLLM's `auto` cannot evict).
- "prefix evicted" is what was freed: the budget rounds down to whole blocks and the first block and the last 32
  prefix tokens are always kept.
- Capacity "output tok/s" is wall-clock on a 2-core machine shared with other vLLM jobs whose load changed during
  the run (the rates ran one after the other, minutes apart): it is not a reliable throughput comparison; the
  request counts are (they depend only on the block accounting)."""


def check_same_chunks(quality_: dict, kvpress: dict) -> None:
    ours, theirs = quality_["config"]["chunk_digests"], kvpress["config"]["chunk_digests"]
    if any(theirs.get(p) != d for p, d in ours.items()):
        raise SystemExit(f"kvpress scored other chunks than vLLM: {theirs} vs {ours}")


def targets(ppl_rows: list[dict], passkey_rows: list[dict], capacity: dict | None) -> list[str]:
    """The issue's targets, evaluated on the measured rows (met / missed / not measured)."""
    lines = []
    base = {r["dtype"]: r["recall"] for r in passkey_rows if r["rate"] == 0}
    for r in passkey_rows:
        if r["rate"] == 0.35:
            ok = r["recall"] >= 0.95 * base[r["dtype"]]
            lines.append(f"- 35%, {r['dtype']}: passkey recall {r['recall']:.2f} vs {base[r['dtype']]:.2f} at rate 0 "
                         f"(target >= 95%): {'met' if ok else 'missed'}")
    at35 = [r for r in ppl_rows if r["rate"] == 0.35]
    for r in (r for r in at35 if r["method"].startswith("nexusquant")):
        presses = [p for p in at35 if p["method"].startswith("kvpress") and p["prefix_len"] == r["prefix_len"]]
        if not presses:
            lines.append(f"- 35%, {r['method']}, prefix {r['prefix_len']}: kvpress not measured")
            continue
        best = min(presses, key=lambda p: p["delta_ppl"])
        ok = r["delta_ppl"] <= best["delta_ppl"]
        overlap = r["ci_low"] <= best["ci_high"] and best["ci_low"] <= r["ci_high"]
        lines.append(f"- 35%, {r['method']}, prefix {r['prefix_len']}: ΔPPL {100 * r['delta_ppl']:+.2f}% vs kvpress "
                     f"best ({best['method']}) {100 * best['delta_ppl']:+.2f}%: {'met' if ok else 'missed'} "
                     f"on point estimates ({'the 95% CIs overlap' if overlap else 'the 95% CIs do not overlap'})")
    if capacity is None:
        lines.append("- 60%: capacity not measured")
    else:
        by_rate = {r["rate"]: r for r in capacity["rows"]}
        ratio = by_rate[0.6]["max_decoding"] / by_rate[0.0]["max_decoding"]
        lines.append(f"- 60%: {ratio:.2f}x the concurrently decoding requests of no eviction (target >= 2x): "
                     f"{'met' if ratio >= 2 else 'missed'}")
    return lines


def plot_ppl(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prefix_lens = sorted({r["prefix_len"] for r in rows})
    fig, axes = plt.subplots(1, len(prefix_lens), figsize=(5.5 * len(prefix_lens), 4.2), squeeze=False)
    for ax, prefix_len in zip(axes[0], prefix_lens):
        for i, method in enumerate(sorted({r["method"] for r in rows})):
            pts = sorted((r for r in rows if r["method"] == method and r["prefix_len"] == prefix_len),
                         key=lambda r: r["rate"])
            x = [100 * r["rate"] + 0.6 * i for r in pts]  # small offsets keep the error bars apart
            y = [100 * r["delta_ppl"] for r in pts]
            err = [[yy - 100 * r["ci_low"] for yy, r in zip(y, pts)],
                   [100 * r["ci_high"] - yy for yy, r in zip(y, pts)]]
            ax.errorbar(x, y, yerr=err, fmt="o-", capsize=3, label=method)
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_title(f"prefix {prefix_len} tokens, continuation scored over the evicted cache", fontsize=9)
        ax.set_xlabel("eviction rate (% of prefix tokens)")
        ax.set_ylabel("ΔPPL vs rate 0 (%), 95% bootstrap CI")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quality", help="continuation PPL and passkey through vLLM")
    q.add_argument("--dtypes", type=lambda s: s.split(","), default=["e8-k3v2", "bf16"])
    q.add_argument("--rates", type=lambda s: [float(r) for r in s.split(",")], default=list(RATES))
    q.add_argument("--prefix-lens", type=lambda s: [int(p) for p in s.split(",")], default=[512, 1024])
    q.add_argument("--cont-len", type=int, default=128)
    q.add_argument("--chunks", type=int, default=4)
    q.add_argument("--passkey-trials", type=int, default=5)
    q.add_argument("--passkey-tokens", type=int, default=768)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--no-compaction", action="store_true", help="whole-block eviction only (no per-head refill)")
    q.add_argument("--name", default=QUALITY, help="results/NAME.{json,md}; `report` reads the default name")
    sub.add_parser("report", help="tables, targets and plots from the results JSON files")
    args = parser.parse_args()
    if args.command == "quality" and 0.0 not in args.rates:
        args.rates.insert(0, 0.0)
    {"quality": quality, "report": report}[args.command](args)


if __name__ == "__main__":
    main()
