"""Distortion of the E8 codec vs scalar quantizers at the same bits, rotation and scale, on Gaussian and real K/V.

    python -m benchmarks.codec_distortion [--chunks 4 --tokens 512]

Measures (each with the same Hadamard rotation and one fp16 scale per vector, least-squares refit, for all):
- relative MSE  = sum |x - x^|^2 / sum |x|^2  at 2/3/4 bits, for E8, uniform (optimal clipping) and Lloyd-Max
  scalar quantization, on N(0, 1) vectors and on SmolLM2's real keys and values (benchmark corpus);
- the error of q·k on real queries and keys (relative MSE of the attention logits);
- the E8 relative MSE against head_dim (64, 80, 96, 128) on real keys (:func:`head_dim_rows`);
- the scale rule (rms x c search scale with/without the least-squares refit, max-abs) and the random sign diagonal;
- the honest bytes per token per head of every e8 dtype; encode (torch and native CPU encoders) and decode
  throughput on this CPU.
Writes benchmarks/results/codec_distortion.{json,md,png}.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from benchmarks.common import RESULTS_DIR, capture_qkv, corpus_token_chunks, smollm2_path, write_results
from nexusquant_vllm import native
from nexusquant_vllm.codec import E8_DTYPES, decode_kv_rotated, encode_kv, get_format, rotate
from nexusquant_vllm.codec.quantizer import dequantize, quantize
from nexusquant_vllm.codec.scalar import SCALAR_KINDS, scalar_dequantize, scalar_quantize

BITS = (2, 3, 4)
HEAD_DIMS = (64, 80, 96, 128)  # 80 and 96 (Phi-3) take the block-diagonal rotation (64 + 16, 64 + 32)
TARGET_GAIN = {2: 0.20, 3: 0.10, 4: 0.10}  # required relative-MSE reduction of E8 vs the best scalar quantizer


def rel_mse(estimate: torch.Tensor, target: torch.Tensor) -> float:
    return float(((estimate - target) ** 2).sum() / (target**2).sum())


def e8_roundtrip(x_rot: torch.Tensor, bits: int, **kwargs) -> torch.Tensor:
    codes, scale = quantize(x_rot, bits, **kwargs)
    return dequantize(codes, scale, bits)


def scalar_roundtrip(x_rot: torch.Tensor, bits: int, kind: str) -> torch.Tensor:
    return scalar_dequantize(*scalar_quantize(x_rot, bits, kind), bits, kind)


def quantizer_rows(name: str, x: torch.Tensor) -> list[dict]:
    """E8 vs each scalar quantizer at every bits, on vectors ``x`` ``[n, d]`` (rotated here)."""
    x_rot = rotate(x)
    rows = []
    for bits in BITS:
        e8 = rel_mse(e8_roundtrip(x_rot, bits), x_rot)
        scalar = {kind: rel_mse(scalar_roundtrip(x_rot, bits, kind), x_rot) for kind in SCALAR_KINDS}
        best_scalar = min(scalar.values())
        gain = 1 - e8 / best_scalar
        rows.append(
            dict(data=name, bits=bits, e8=e8, **scalar, gain_vs_best_scalar=gain, meets_target=gain >= TARGET_GAIN[bits])
        )
    return rows


def head_dim_rows(keys: torch.Tensor, vectors: int) -> list[dict]:
    """E8 relative MSE against head_dim on real keys ``[layers, kv_heads, tokens, 64]``: the KV heads of one token
    and layer side by side (192 channels, each head with its own outlier channels), cut to the first ``d``. A
    head_dim that is not a power of two is rotated block-diagonally, so its outliers spread over fewer channels."""
    side_by_side = keys.permute(0, 2, 1, 3).flatten(2).flatten(0, 1)  # [layers * tokens, kv_heads * 64]
    sample = torch.randperm(side_by_side.shape[0], generator=torch.Generator().manual_seed(1))[:vectors]
    rows = []
    for d in HEAD_DIMS:
        x_rot = rotate(side_by_side[sample, :d])
        rows += [{"head_dim": d, "bits": bits, "e8": rel_mse(e8_roundtrip(x_rot, bits), x_rot)} for bits in BITS]
    return rows


def scale_rule_rows(x: torch.Tensor) -> list[dict]:
    """Relative MSE of E8 under alternative scale rules and rotations."""
    rows = []
    for bits in BITS:
        x_rot = rotate(x)
        absmax = x_rot.abs().amax(-1, keepdim=True)
        best_absmax = min(
            rel_mse(e8_roundtrip(x_rot, bits, unit_scale=absmax / c), x_rot) for c in (1.5, 2.0, 2.5, 3.0, 3.5)
        )
        signed = rotate(x, random_signs=True)
        rows.append(
            dict(
                bits=bits,
                rms_c_refit=rel_mse(e8_roundtrip(x_rot, bits), x_rot),
                rms_c_no_refit=rel_mse(e8_roundtrip(x_rot, bits, refit_scale=False), x_rot),
                absmax_best_c=best_absmax,
                hadamard_with_random_signs=rel_mse(e8_roundtrip(signed, bits), signed),
            )
        )
    return rows


def logit_rows(queries: torch.Tensor, keys: torch.Tensor) -> list[dict]:
    """Relative MSE of q·k over all (query, key) pairs of each layer, with GQA heads mapped to their KV head."""
    group = queries.shape[1] // keys.shape[1]
    exact = queries @ keys.repeat_interleave(group, dim=1).transpose(-1, -2)
    q_rot, k_rot = rotate(queries), rotate(keys)

    def logit_error(k_hat: torch.Tensor) -> float:
        return rel_mse(q_rot @ k_hat.repeat_interleave(group, dim=1).transpose(-1, -2), exact)

    rows = []
    for bits in BITS:
        row = dict(bits=bits, e8=logit_error(e8_roundtrip(k_rot, bits)))
        for kind in SCALAR_KINDS:
            row[kind] = logit_error(scalar_roundtrip(k_rot, bits, kind))
        rows.append(row)
    return rows


def byte_rows() -> list[dict]:
    return [
        dict(
            dtype=name,
            head_dim=d,
            slot_bytes=get_format(name, d).slot_bytes,
            bits_per_element=get_format(name, d).bits_per_element,
            capacity_vs_bf16=get_format(name, d).compression_vs(2),
        )
        for name in E8_DTYPES
        for d in (64, 128)
    ]


ENCODERS = {"torch": encode_kv, "native": native.encode_kv}


def throughput(dtype: str, encoder: str, tokens: int = 4096, heads: int = 3, head_dim: int = 64) -> dict:
    """Encode (with the torch or the native CPU encoder) and decode speed in K+V elements per second."""
    fmt = get_format(dtype, head_dim)
    encode = ENCODERS[encoder]
    key, value = torch.randn(2, tokens, heads, head_dim, generator=torch.Generator().manual_seed(1))
    encode(key[:16], value[:16], fmt)  # build the tables
    wall, cpu = time.perf_counter(), time.process_time()
    slots = encode(key, value, fmt)
    encode_wall, encode_cpu = time.perf_counter() - wall, time.process_time() - cpu
    wall, cpu = time.perf_counter(), time.process_time()
    decode_kv_rotated(slots, fmt)
    decode_wall, decode_cpu = time.perf_counter() - wall, time.process_time() - cpu
    elements = 2 * key.numel()
    return dict(
        dtype=dtype,
        encoder=encoder,
        elements=elements,
        encode_elements_per_s=elements / encode_wall,
        decode_elements_per_s=elements / decode_wall,
        encode_elements_per_cpu_s=elements / encode_cpu,
        decode_elements_per_cpu_s=elements / decode_cpu,
        threads=torch.get_num_threads(),
        load_average_1min=os.getloadavg()[0],
    )


def real_kv(chunks: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q, K, V of SmolLM2 on corpus chunks: queries [layers, q_heads, tokens, d], keys/values flattened to [n, d]."""
    from transformers import AutoTokenizer

    path = smollm2_path()
    token_chunks = corpus_token_chunks(AutoTokenizer.from_pretrained(path), chunks, tokens, seed=0)
    captured = [capture_qkv(path, ids) for ids in token_chunks]
    queries = torch.cat([c.queries for c in captured], 2)
    keys = torch.cat([c.keys for c in captured], 2)
    values = torch.cat([c.values for c in captured], 2)
    return queries, keys, values


def markdown(payload: dict) -> str:
    lines = [
        "| data | bits | E8 rel. MSE | uniform | Lloyd-Max | E8 vs best scalar | target |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in payload["distortion"]:
        lines.append(
            f"| {r['data']} | {r['bits']} | {r['e8']:.4f} | {r['uniform']:.4f} | {r['lloydmax']:.4f} | "
            f"{-100 * r['gain_vs_best_scalar']:+.1f}% | {'met' if r['meets_target'] else 'MISSED'} "
            f"(-{100 * TARGET_GAIN[r['bits']]:.0f}%) |"
        )
    lines += ["", "| q·k logits, real Q/K: bits | E8 rel. MSE | uniform | Lloyd-Max |", "|---|---|---|---|"]
    lines += [f"| {r['bits']} | {r['e8']:.4f} | {r['uniform']:.4f} | {r['lloydmax']:.4f} |" for r in payload["logits"]]
    lines += ["", "| E8 rel. MSE, real K, bits | " + " | ".join(f"head_dim {d}" for d in HEAD_DIMS) + " |",
              "|---|" + "---|" * len(HEAD_DIMS)]
    lines += [f"| {bits} | " + " | ".join(f"{r['e8']:.4f}" for r in payload["head_dims"] if r["bits"] == bits) + " |"
              for bits in BITS]
    lines += [
        "",
        "| scale rule (real K), bits | rms·c search + LS refit (used) | rms·c search, no refit | max-abs (best c) | "
        "with random signs |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['bits']} | {r['rms_c_refit']:.4f} | {r['rms_c_no_refit']:.4f} | {r['absmax_best_c']:.4f} | "
        f"{r['hadamard_with_random_signs']:.4f} |"
        for r in payload["scale_rules"]
    ]
    lines += ["", "| dtype | head_dim | bytes/token/head | bits/elem | capacity vs bf16 |", "|---|---|---|---|---|"]
    lines += [
        f"| {r['dtype']} | {r['head_dim']} | {r['slot_bytes']} | {r['bits_per_element']:.3f} | "
        f"{r['capacity_vs_bf16']:.2f}x |"
        for r in payload["bytes"]
    ]
    lines += [
        "",
        "| dtype | encoder | encode M elem/s (per CPU-s) | decode M elem/s (per CPU-s) | threads | load |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {t['dtype']} | {t['encoder']} | {t['encode_elements_per_s'] / 1e6:.2f} "
        f"({t['encode_elements_per_cpu_s'] / 1e6:.2f}) | {t['decode_elements_per_s'] / 1e6:.1f} "
        f"({t['decode_elements_per_cpu_s'] / 1e6:.1f}) | {t['threads']} | {t['load_average_1min']:.1f} |"
        for t in payload["throughput"]
    ]
    return "\n".join(lines)


def plot(payload: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["data"] for r in payload["distortion"]})
    fig, axes = plt.subplots(1, len(datasets), figsize=(4 * len(datasets), 3.5), sharey=True)
    for ax, data in zip(axes, datasets):
        rows = [r for r in payload["distortion"] if r["data"] == data]
        for key, marker in (("e8", "o"), ("uniform", "s"), ("lloydmax", "^")):
            ax.semilogy([r["bits"] for r in rows], [r[key] for r in rows], marker=marker, label=key)
        ax.set_title(data)
        ax.set_xlabel("bits per element (+ fp16 scale)")
        ax.set_xticks(BITS)
    axes[0].set_ylabel("relative MSE")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(RESULTS_DIR / "codec_distortion.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=2, help="corpus chunks run through SmolLM2")
    parser.add_argument("--tokens", type=int, default=512, help="tokens per chunk")
    parser.add_argument("--vectors", type=int, default=16384, help="K and V vectors sampled for the MSE rows")
    parser.add_argument("--logit-tokens", type=int, default=256, help="tokens per chunk in the q·k rows")
    parser.add_argument("--gaussian", type=int, default=16384, help="N(0,1) vectors of dimension 64")
    args = parser.parse_args()
    torch.manual_seed(0)
    gaussian = torch.randn(args.gaussian, 64)
    queries, keys, values = real_kv(args.chunks, args.tokens)
    sample = torch.randperm(keys[..., 0].numel(), generator=torch.Generator().manual_seed(0))[: args.vectors]
    real_k, real_v = keys.flatten(0, 2)[sample], values.flatten(0, 2)[sample]
    logit_q, logit_k = queries[..., : args.logit_tokens, :], keys[..., : args.logit_tokens, :]
    payload = dict(
        config=vars(args),
        distortion=quantizer_rows("gaussian", gaussian) + quantizer_rows("real K", real_k)
        + quantizer_rows("real V", real_v),
        logits=logit_rows(logit_q, logit_k),
        head_dims=head_dim_rows(keys, args.vectors),
        scale_rules=scale_rule_rows(real_k),
        bytes=byte_rows(),
        throughput=[throughput(d, e) for d in ("e8-k3v2", "e8-k2v2", "e8-k4v4") for e in ENCODERS],
    )
    table = markdown(payload)
    write_results("codec_distortion", payload, table)
    plot(payload)
    print(table)


if __name__ == "__main__":
    main()
