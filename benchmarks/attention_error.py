"""Attention error of the E8 codec vs the per-token scalar baseline on SmolLM2's real Q/K/V, as vLLM sees it.

    python -m benchmarks.attention_error [--chunks 2 --tokens 1024 --batch-tokens 256]

Why: E8 beats the scalar quantizer on vector MSE by 20-23%, yet inside vLLM (``quality_ppl``) its ΔPPL is not
better. This measures where the per-vector advantage goes between the K/V vectors and the attention output.

Protocol (the one ``quality_ppl`` scores): queries at positions >= ``--batch-tokens`` attend to the *quantized* K/V
of every earlier prefill chunk (positions below the start of their own chunk) and to the raw K/V of their own chunk,
as the nexusquant backend does. Both codecs get the same Hadamard rotation, one fp16 scale per vector and the same
least-squares scale refit (``codec.quantize`` vs ``codec.scalar`` Lloyd-Max, the ``scalar-*`` dtypes of vLLM).

Per layer and configuration (K codec/bits x V codec/bits, mixed ones included, and K-only / V-only ones):
- K and V relative MSE (over all tokens);
- bias share: the energy of each head's mean error over tokens, as a fraction of the error energy (times the number
  of tokens it is 1 for independent zero-mean errors): an error shared by all tokens does not average out in P @ V;
- attention KL(P || P^) and the attention-output relative error |O^ - O|^2 / |O|^2;
- for V-only configurations, the output-error coherence |sum_j p_j e_j|^2 / sum_j p_j^2 |e_j|^2 (1: independent
  errors; > 1: errors that add up across the tokens a query attends to) and the attention-weighted V error;
- the error on the first token (the attention sink) vs the average token.
Aggregates are over the layers vLLM quantizes (the 2 + 2 protected boundary layers excluded) and over chunks.
Writes benchmarks/results/attention_error.{json,md,png}.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterator

import torch

from benchmarks.common import RESULTS_DIR, capture_qkv, corpus_token_chunks, smollm2_path, write_results
from nexusquant_vllm.codec import quantizer
from nexusquant_vllm.codec.e8 import RES8_BITS
from nexusquant_vllm.codec.quantizer import dequantize, quantize
from nexusquant_vllm.codec.rotation import rotate, unrotate
from nexusquant_vllm.codec.scalar import scalar_dequantize, scalar_quantize

V_BITS = 2
K_BITS = (3, 2)
CODECS = ("e8", "scalar")
NUM_PROTECTED = 2  # first and last layers kept in bf16 by the backend (NEXUSQUANT_PROTECT_LAYERS default)


# ---- codecs -------------------------------------------------------------------------------------------------------


def e8_roundtrip(x: torch.Tensor, bits: int, quantizer=quantize) -> torch.Tensor:
    """E8 codec round trip in the original domain: rotate, code (``quantizer``: the torch reference, or the native
    encoder, much faster), decode, un-rotate."""
    codes, scale = quantizer(rotate(x), bits)
    return unrotate(dequantize(codes, scale, bits))


def scalar_roundtrip(x: torch.Tensor, bits: int) -> torch.Tensor:
    """The ``scalar-*`` baseline (Lloyd-Max levels, same rotation/scale/refit) round trip."""
    index, scale = scalar_quantize(rotate(x), bits, "lloydmax")
    return unrotate(scalar_dequantize(index, scale, bits, "lloydmax"))


@functools.lru_cache(maxsize=None)
def symmetric_res8_table() -> torch.Tensor:
    """RES8 made antipodal: the same 58 points of shells 0.5 and 1.5, then 99 +-pairs of shell 2.5 instead of the
    first 198 points in lexicographic order (which lean towards negative first coordinates: the codebook's mean is
    (-0.16, -0.04, -0.02, ...)). Pairs are taken in lexicographic order of their negative-first member."""
    table = quantizer.STAGES[3][1].table("cpu")
    norms = (table * table).sum(-1)
    inner = table[norms < 2.4]
    shell = _shell_points(2.5)
    firsts = [p for p in shell.tolist() if tuple(p) < tuple(-v for v in p)]
    firsts.sort()
    pairs = torch.tensor(firsts[: ((1 << RES8_BITS) - inner.shape[0]) // 2])
    points = torch.cat([inner, pairs, -pairs])
    assert points.shape[0] == 1 << RES8_BITS and torch.allclose(points.mean(0), torch.zeros(8), atol=1e-6)
    return points


def _shell_points(norm2: float) -> torch.Tensor:
    """All points of E8 + (1/4)·1 with squared norm ``norm2``, float32 ``[n, 8]``."""
    import itertools

    points = []
    for coset in (0.0, 0.5):
        for p in itertools.product([v + coset for v in range(-2, 3)], repeat=8):
            if sum(p) % 2 == 0:
                q = tuple(v + 0.25 for v in p)
                if abs(sum(v * v for v in q) - norm2) < 1e-9:
                    points.append(q)
    return torch.tensor(points, dtype=torch.float32)


@contextlib.contextmanager
def res8_table_swapped(table: torch.Tensor) -> Iterator[None]:
    """Temporarily code the 3-bit second stage against ``table`` (benchmark-only; the codec is not edited)."""
    original = quantizer.STAGES[3]

    def encode(x: torch.Tensor) -> torch.Tensor:
        norms = (table * table).sum(-1)
        return torch.addmm(norms, x, table.T, alpha=-2).argmin(-1).to(torch.int32)

    second = quantizer.Stage(index_bits=RES8_BITS, step=original[1].step, encode=encode, table=lambda d: table.to(d))
    quantizer.STAGES[3] = (original[0], second)
    try:
        yield
    finally:
        quantizer.STAGES[3] = original


def e8sym_roundtrip(x: torch.Tensor, bits: int) -> torch.Tensor:
    """E8 with the antipodal RES8 (the proposed change); identical to ``e8`` at 2 bits."""
    with res8_table_swapped(symmetric_res8_table()):
        return e8_roundtrip(x, bits)


ROUNDTRIPS: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "e8": e8_roundtrip, "scalar": scalar_roundtrip, "e8sym": e8sym_roundtrip,
}
UNBIASED = {"e8u": "e8", "scalaru": "scalar"}  # the same codes with the unbiased scale (see :func:`unbiased_scale`)


def unbiased_scale(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """``x_hat`` rescaled per vector so that <x_hat, x> = |x|^2 (stored scale |x|^2 / <x, c> instead of the
    least-squares <x, c> / <c, c>; the codes and the decoder are unchanged).

    The least-squares scale makes x_hat the projection of x on the codeword: |x_hat|^2 = (1 - D)|x|^2, so every
    reconstruction is shrunk by the relative distortion D along x. That shrink is the same sign for every token, so
    attention does not average it out: P @ V^ = (1 - D) P @ V + noise, and cached logits q·k^ = (1 - D) q·k + noise."""
    dot = (x * x_hat).sum(-1, keepdim=True)
    gain = torch.where(dot > 0, x.pow(2).sum(-1, keepdim=True) / dot.clamp_min(1e-30), torch.ones_like(dot))
    return x_hat * gain


# ---- error statistics ---------------------------------------------------------------------------------------------


def bias_share(err: torch.Tensor) -> tuple[float, float]:
    """``err`` ``[heads, tokens, d]`` -> (energy of each head's mean error over tokens, summed as T |mean|^2;
    total error energy). Their ratio is ~1/T for independent zero-mean errors and 1 for a pure shared bias."""
    tokens = err.shape[-2]
    return float(tokens * err.mean(-2).pow(2).sum()), float(err.pow(2).sum())


def cached_mask(tokens: int, batch_tokens: int) -> torch.Tensor:
    """bool ``[tokens, tokens]``: key j is read back quantized by query i (j lies in an earlier prefill chunk)."""
    chunk_start = torch.arange(tokens) // batch_tokens * batch_tokens
    return torch.arange(tokens)[None, :] < chunk_start[:, None]


def attention_probs(
    q: torch.Tensor, k: torch.Tensor, k_hat: torch.Tensor | None, cached: torch.Tensor, first_query: int
) -> torch.Tensor:
    """Causal softmax(q k^T / sqrt(d)) of queries >= ``first_query``, with cached keys replaced by ``k_hat``.

    ``q`` ``[heads, T, d]``; ``k``, ``k_hat`` ``[heads, T, d]`` (already repeated to the query heads); ``cached``
    ``[T - first_query, T]``, the rows of :func:`cached_mask` of those queries."""
    tokens, d = k.shape[-2], k.shape[-1]
    qs = q[:, first_query:] / math.sqrt(d)
    logits = qs @ k.transpose(-1, -2)
    if k_hat is not None:
        logits = torch.where(cached, qs @ k_hat.transpose(-1, -2), logits)
    causal = torch.ones(tokens, tokens, dtype=torch.bool).tril()[first_query:]
    return logits.masked_fill(~causal, float("-inf")).softmax(-1)


def attention_output(
    p: torch.Tensor, v: torch.Tensor, v_hat: torch.Tensor | None, cached: torch.Tensor
) -> torch.Tensor:
    """P @ V with the cached positions (``cached`` ``[queries, T]``) reading ``v_hat``."""
    if v_hat is None:
        return p @ v
    on_cache = p * cached
    return on_cache @ v_hat + (p - on_cache) @ v


def kl_sum(p: torch.Tensor, p_hat: torch.Tensor) -> float:
    """Sum over query rows of KL(p || p_hat)."""
    terms = torch.where(p > 0, p * (p.clamp_min(1e-30).log() - p_hat.clamp_min(1e-30).log()), torch.zeros_like(p))
    return float(terms.sum())


def coherence(p_cached: torch.Tensor, err: torch.Tensor) -> tuple[float, float]:
    """(|sum_j p_j e_j|^2, sum_j p_j^2 |e_j|^2), summed over queries: equal in expectation for independent errors.

    ``p_cached`` ``[heads, Q, T]`` attention restricted to cached keys; ``err`` ``[heads, T, d]``."""
    coherent = (p_cached @ err).pow(2).sum()
    independent = (p_cached.pow(2) @ err.pow(2).sum(-1, keepdim=True)).sum()
    return float(coherent), float(independent)


# ---- one layer ----------------------------------------------------------------------------------------------------


def configurations() -> list[tuple[str, str | None, int, str | None, int]]:
    """(name, K codec or None for exact, K bits, V codec or None, V bits)."""
    configs = []
    for kb in K_BITS:
        for kc in CODECS:
            for vc in CODECS:
                name = f"{kc}-k{kb}v{V_BITS}" if kc == vc else f"K {kc}{kb} + V {vc}{V_BITS}"
                configs.append((name, kc, kb, vc, V_BITS))
        configs += [(f"K only {c}{kb}", c, kb, None, V_BITS) for c in CODECS]
        configs.append((f"e8sym-k{kb}v{V_BITS}", "e8sym", kb, "e8sym", V_BITS))
        for codec, base in UNBIASED.items():
            configs += [
                (f"{codec}-k{kb}v{V_BITS}", codec, kb, codec, V_BITS),
                (f"K {codec}{kb} + V {base}{V_BITS}", codec, kb, base, V_BITS),
                (f"K {base}{kb} + V {codec}{V_BITS}", base, kb, codec, V_BITS),
                (f"K only {codec}{kb}", codec, kb, None, V_BITS),
            ]
    configs += [(f"V only {c}{V_BITS}", None, 0, c, V_BITS) for c in (*CODECS, *UNBIASED)]
    return configs


def layer_stats(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, recon: dict[tuple[str, str, int], torch.Tensor],
    layer: int, batch_tokens: int,
) -> dict[str, dict[str, float]]:
    """Sums (not yet ratios) of every statistic of one layer of one chunk, per configuration."""
    group = q.shape[0] // k.shape[0]
    tokens = k.shape[-2]
    cached = cached_mask(tokens, batch_tokens)[batch_tokens:]
    rep = lambda t: t.repeat_interleave(group, dim=0)  # noqa: E731 - KV heads to query heads (GQA)
    p_exact = attention_probs(q, rep(k), None, cached, batch_tokens)
    o_exact = p_exact @ rep(v)
    probs: dict[tuple[str | None, int], tuple[torch.Tensor, float]] = {(None, 0): (p_exact, 0.0)}
    out: dict[str, dict[str, float]] = {}
    for name, kc, kb, vc, vb in configurations():
        if (kc, kb) not in probs:
            p = attention_probs(q, rep(k), rep(recon["k", kc, kb][layer]), cached, batch_tokens)
            probs[kc, kb] = p, kl_sum(p_exact, p)
        p, kl = probs[kc, kb]
        v_hat = None if vc is None else rep(recon["v", vc, vb][layer])
        o = attention_output(p, rep(v), v_hat, cached)
        s = dict(kl=kl, queries=float(p.shape[0] * p.shape[1]), cache_mass=float((p_exact * cached).sum()),
                 cache_mass_shift=float(((p - p_exact) * cached).sum()),
                 out_err=float((o - o_exact).pow(2).sum()), out_norm=float(o_exact.pow(2).sum()))
        if kc is None:
            err = v_hat - rep(v)
            s["coherent"], s["independent"] = coherence(p_exact * cached, err)
            weights = (p_exact * cached).sum(1)  # [heads, T]: attention mass each cached token receives
            s["wv_err"] = float((weights * err.pow(2).sum(-1)).sum())
            s["wv_norm"] = float((weights * rep(v).pow(2).sum(-1)).sum())
        out[name] = s
    return out


def vector_stats(x: torch.Tensor, x_hat: torch.Tensor) -> dict[str, float]:
    """Error sums of one layer's K or V ``[kv_heads, T, d]``: MSE, bias share, first token (attention sink)."""
    err = x_hat - x
    bias, total = bias_share(err)
    return dict(err=total, norm=float(x.pow(2).sum()), bias=bias, tokens=float(x.shape[-2]), groups=1.0,
                sink_err=float(err[:, 0].pow(2).sum()), sink_norm=float(x[:, 0].pow(2).sum()))


# ---- driver -------------------------------------------------------------------------------------------------------


def roundtrip_by_layer(codec: str, x: torch.Tensor, bits: int) -> torch.Tensor:
    """Round trip ``x`` ``[layers, heads, T, d]`` one layer at a time (the torch E8 encoder's temporaries grow
    with the batch: about 2 GB per million vectors)."""
    return torch.stack([ROUNDTRIPS[codec](layer, bits) for layer in x])


def reconstructions(keys: torch.Tensor, values: torch.Tensor) -> dict[tuple[str, str, int], torch.Tensor]:
    """Every codec's round trip of all layers' K (at each K bits) and V (at V bits)."""
    recon = {}
    for codec in ROUNDTRIPS:
        for kb in K_BITS:
            if codec == "e8sym" and kb != 3:
                recon["k", codec, kb] = recon["k", "e8", kb]
                continue
            recon["k", codec, kb] = roundtrip_by_layer(codec, keys, kb)
        recon["v", codec, V_BITS] = (
            recon["v", "e8", V_BITS] if codec == "e8sym" else roundtrip_by_layer(codec, values, V_BITS)
        )
    for codec, base in UNBIASED.items():
        for kb in K_BITS:
            recon["k", codec, kb] = unbiased_scale(keys, recon["k", base, kb])
        recon["v", codec, V_BITS] = unbiased_scale(values, recon["v", base, V_BITS])
    return recon


def accumulate(total: dict, layer: int, stats: dict[str, dict[str, float]]) -> None:
    for name, s in stats.items():
        for key, value in s.items():
            total[layer][name][key] += value


def ratios(s: dict[str, float]) -> dict[str, float]:
    """Sums -> reported ratios."""
    out = dict(out_rel_err=s["out_err"] / s["out_norm"], kl=s["kl"] / s["queries"],
               cache_mass=s["cache_mass"] / s["queries"], cache_mass_shift=s["cache_mass_shift"] / s["queries"])
    if "coherent" in s:
        out["coherence"] = s["coherent"] / s["independent"]
        out["weighted_v_rel_err"] = s["wv_err"] / s["wv_norm"]
    return out


def vector_ratios(s: dict[str, float]) -> dict[str, float]:
    return dict(rel_mse=s["err"] / s["norm"], bias_share=s["bias"] / s["err"], independent_bias_share=s["groups"] / s["tokens"],
                sink_rel_err=s["sink_err"] / s["sink_norm"])


def run(chunks: int, tokens: int, batch_tokens: int, seed: int) -> dict:
    from transformers import AutoTokenizer

    path = smollm2_path()
    token_chunks = corpus_token_chunks(AutoTokenizer.from_pretrained(path), chunks, tokens, seed)
    attn: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(float)))
    vec: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(float)))
    num_layers, t0 = 0, time.time()
    for index, ids in enumerate(token_chunks):
        qkv = capture_qkv(path, ids)
        num_layers = qkv.keys.shape[0]
        recon = reconstructions(qkv.keys, qkv.values)
        print(f"chunk {index + 1}: captured and quantized ({time.time() - t0:.0f} s)", flush=True)
        for layer in range(num_layers):
            if NUM_PROTECTED <= layer < num_layers - NUM_PROTECTED:  # vLLM keeps the others in bf16
                accumulate(attn, layer, layer_stats(qkv.queries[layer], qkv.keys[layer], qkv.values[layer], recon,
                                                    layer, batch_tokens))
            for (part, codec, bits), x_hat in recon.items():
                x = (qkv.keys if part == "k" else qkv.values)[layer]
                accumulate(vec, layer, {f"{part}{bits} {codec}": vector_stats(x, x_hat[layer])})
        print(f"chunk {index + 1}/{chunks} done ({time.time() - t0:.0f} s)", flush=True)
    return summarize(attn, vec, num_layers, dict(chunks=chunks, tokens=tokens, batch_tokens=batch_tokens, seed=seed,
                                                 wall_s=time.time() - t0))


def summarize(attn: dict, vec: dict, num_layers: int, config: dict) -> dict:
    quantized = list(range(NUM_PROTECTED, num_layers - NUM_PROTECTED))
    per_layer = [dict(layer=layer, protected=layer not in quantized,
                      attention={n: ratios(s) for n, s in attn[layer].items()},
                      vectors={n: vector_ratios(s) for n, s in vec[layer].items()}) for layer in range(num_layers)]

    def pooled(table: dict, convert: Callable) -> dict:
        sums: dict = defaultdict(lambda: defaultdict(float))
        for layer in quantized:
            for name, s in table[layer].items():
                for key, value in s.items():
                    sums[name][key] += value
        return {name: convert(s) for name, s in sums.items()}

    # the mean over layers of the per-layer ratio (each layer's output error counts equally, as in the model)
    mean_out = {name: sum(per_layer[i]["attention"][name]["out_rel_err"] for i in quantized) / len(quantized)
                for name in attn[quantized[0]]}
    attention = pooled(attn, ratios)
    for name, value in mean_out.items():
        attention[name]["out_rel_err_layer_mean"] = value
    return dict(config=config, quantized_layers=quantized, attention=attention, vectors=pooled(vec, vector_ratios),
                per_layer=per_layer)


def markdown(payload: dict) -> str:
    c = payload["config"]
    lines = [f"SmolLM2-135M, {c['chunks']} corpus chunks x {c['tokens']} tokens, chunked prefill {c['batch_tokens']}: "
             f"queries >= {c['batch_tokens']} read earlier chunks quantized, own chunk raw; layers "
             f"{payload['quantized_layers'][0]}-{payload['quantized_layers'][-1]} (vLLM's quantized ones) pooled.", "",
             "| configuration | attention KL | output rel. err (pooled) | output rel. err (layer mean) | "
             "attention mass moved onto the cache | V coherence | attn-weighted V rel. err |",
             "|---|---|---|---|---|---|---|"]
    for name, r in payload["attention"].items():
        coh = f"{r['coherence']:.3f}" if "coherence" in r else "–"
        wv = f"{r['weighted_v_rel_err']:.4f}" if "weighted_v_rel_err" in r else "–"
        lines.append(f"| {name} | {r['kl']:.5f} | {r['out_rel_err']:.5f} | {r['out_rel_err_layer_mean']:.5f} | "
                     f"{100 * r['cache_mass_shift']:+.2f}% (of {100 * r['cache_mass']:.1f}%) | {coh} | {wv} |")
    lines += ["", "| vectors | rel. MSE | bias share (x T) | first-token rel. err |", "|---|---|---|---|"]
    for name, r in sorted(payload["vectors"].items()):
        lines.append(f"| {name} | {r['rel_mse']:.4f} | {r['bias_share'] / r['independent_bias_share']:.2f} | "
                     f"{r['sink_rel_err']:.4f} |")
    return "\n".join(lines)


def plot(payload: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in payload["per_layer"] if r["attention"]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, kb in zip(axes, K_BITS):
        for codec, color in (("e8", "C0"), ("scalar", "C1"), ("e8sym", "C2")):
            name = f"{codec}-k{kb}v{V_BITS}"
            ax.semilogy([r["layer"] for r in rows], [r["attention"][name]["out_rel_err"] for r in rows], "o-",
                        color=color, ms=3, label=name)
        for layer in (r["layer"] for r in payload["per_layer"] if r["protected"]):
            ax.axvspan(layer - 0.5, layer + 0.5, color="gray", alpha=0.15, lw=0)
        ax.set_xlabel("layer (grey: kept bf16 in vLLM)")
        ax.set_title(f"k{kb}v{V_BITS}")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("attention output rel. error |O^-O|²/|O|²")
    fig.tight_layout()
    fig.savefig(RESULTS_DIR / "attention_error.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--batch-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    payload = run(args.chunks, args.tokens, args.batch_tokens, args.seed)
    table = markdown(payload)
    write_results("attention_error", payload, table)
    plot(payload)
    print(table)


if __name__ == "__main__":
    main()
