"""GPU benchmark of the Triton kernels at Llama-3-8B shapes (32 query heads, 8 KV heads, head_dim 128), one layer.

    python -m benchmarks.kernels_gpu                # full sweep on a CUDA GPU -> benchmarks/results/kernels_gpu.*
    python -m benchmarks.kernels_gpu --dry-run      # tiny smoke run on the CPU under TRITON_INTERPRET=1
    python -m benchmarks.kernels_gpu --model-only   # static roofline, no GPU -> results/kernels_gpu_roofline.*

Decode attention, batch 1/8/32 x context 1K..128K, for each e8 dtype, for the bf16 paged kernel of the same
structure (``decode_attention(fmt=None)``), and for torch SDPA over contiguous bf16 K/V (a sanity floor). Reported:
time per call, bytes the kernel must read (pages + block table), achieved bandwidth and its fraction of the
device's measured copy bandwidth and of the static roofline (``--model-only``). Then the fused store kernel (rotate + encode + pack + scatter of a 4K-token prefill's
K/V) against a proxy of one layer's prefill (its bf16 GEMMs + causal SDPA), and one decode step (the store of one
token per sequence of the largest batch and the decode attention) replayed from a CUDA graph, which also checks
that both are capturable. Then
continuation prefill (one request, a chunk of 256..4096 new tokens over 4K..32K cached tokens): the fused kernel
(``prefill_attention``, pages decoded in registers) against dequantizing the request's pages into a bf16 workspace
plus torch SDPA, and the crossover chunk size from which the workspace path is faster. Imports only torch, triton,
matplotlib (optional) and this package's kernels and codec: the GPU machine has no vLLM.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.results_io import RESULTS_DIR, write_results

HQ, HK, D, PAGE = 32, 8, 128, 16  # Llama-3-8B attention shapes, vLLM's default page
HIDDEN, FFN = 4096, 14336
# HBM bandwidth, dense fp16 tensor-core and fp32 CUDA-core throughput of the lent GPUs (SXM datasheets)
GPUS = {gpu: {"hbm_bytes_per_s": bw, "fp16_tensor_flops": 989e12, "fp32_flops": 67e12}
        for gpu, bw in (("H100", 3.35e12), ("H200", 4.8e12))}
# CUDA-core work per decoded element (the pattern lookup, shifts, sign, shift add, scale fold; stage 2 doubles it)
DECODE_OPS = {2: 4, 3: 8, 4: 8}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--context", type=int, nargs="+", default=[1024 << i for i in range(8)])  # 1K .. 128K
    p.add_argument("--dtypes", nargs="+", default=["e8-k3v2", "e8-k2v2"])
    p.add_argument("--max-gib", type=float, default=24.0, help="skip cases whose bf16 cache exceeds this")
    p.add_argument("--prefill-tokens", type=int, default=4096)
    p.add_argument("--prefill-chunks", type=int, nargs="+", default=[256 << i for i in range(5)])  # 256 .. 4096
    p.add_argument("--prefill-contexts", type=int, nargs="+", default=[4096 << i for i in range(4)])  # 4K .. 32K
    p.add_argument("--name", default="kernels_gpu", help="results/<name>.{json,md,png}")
    p.add_argument("--dry-run", action="store_true", help="tiny case on the CPU under TRITON_INTERPRET=1")
    p.add_argument("--model-only", action="store_true", help="the static roofline only (no GPU needed)")
    p.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    return p.parse_args(argv)


def decode_step_cost(kernel: str, batch: int, ctx: int) -> dict[str, float]:
    """Bytes one layer's decode attention must read (pages, scales, block table) and its work: 4 FLOPs per cached
    element and query head (the two dots, on tensor cores) and, for E8 pages, the decode work per K and V element
    once per KV head (``DECODE_OPS``, on CUDA cores; the group's query heads share it)."""
    from nexusquant_vllm.codec import get_format

    elements = batch * ctx * HK * D  # per K (and per V)
    table = batch * (ctx // PAGE) * 4
    dots = 2 * 2 * batch * ctx * HQ * D
    if kernel == "bf16-paged":
        return {"bytes": 2 * 2 * elements + table, "dot_flops": dots, "decode_ops": 0}
    fmt = get_format(kernel, D)
    return {"bytes": batch * ctx * HK * fmt.slot_bytes + table, "dot_flops": dots,
            "decode_ops": elements * (DECODE_OPS[fmt.k_bits] + DECODE_OPS[fmt.v_bits])}


def ideal_ms(cost: dict[str, float], gpu: str) -> float:
    """Roofline time: the slower of reading the bytes at HBM bandwidth and the work (dots on tensor cores plus
    the decode on CUDA cores, counted one after the other)."""
    spec = GPUS[gpu]
    work = cost["dot_flops"] / spec["fp16_tensor_flops"] + cost["decode_ops"] / spec["fp32_flops"]
    return 1e3 * max(cost["bytes"] / spec["hbm_bytes_per_s"], work)


def roofline(args) -> dict:
    rows = []
    for batch in args.batch:
        for ctx in args.context:
            for kernel in ["bf16-paged", *args.dtypes]:
                cost = decode_step_cost(kernel, batch, ctx)
                rows.append(dict(kernel=kernel, batch=batch, context=ctx, **cost,
                                 **{f"ideal_ms_{gpu}": ideal_ms(cost, gpu) for gpu in GPUS}))
    return {"shapes": dict(q_heads=HQ, kv_heads=HK, head_dim=D, page=PAGE), "gpus": GPUS, "decode_ops": DECODE_OPS,
            "rows": rows}


def roofline_markdown(result: dict) -> str:
    lines = ["# Static roofline of one layer's decode attention, Llama-3-8B shapes (no GPU measured)", "",
             "`python -m benchmarks.kernels_gpu --model-only`: bytes read and work per decode call; ideal time = "
             "max(bytes / HBM bandwidth, dot FLOPs / fp16 tensor-core peak + decode ops / fp32 CUDA-core peak).", "",
             "| kernel | batch | context | MiB read | dot GFLOP | decode Gop | bytes/elem | ideal ms H100 | ideal ms H200 "
             "| vs bf16 (H100) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    base = {(r["batch"], r["context"]): r for r in result["rows"] if r["kernel"] == "bf16-paged"}
    for r in result["rows"]:
        per_elem = r["bytes"] / (2 * r["batch"] * r["context"] * HK * D)
        speedup = base[(r["batch"], r["context"])]["ideal_ms_H100"] / r["ideal_ms_H100"]
        lines.append(f"| {r['kernel']} | {r['batch']} | {r['context']} | {r['bytes'] / 2**20:.1f} | "
                     f"{r['dot_flops'] / 1e9:.2f} | {r['decode_ops'] / 1e9:.2f} | {per_elem:.3f} | {r['ideal_ms_H100']:.4f} | {r['ideal_ms_H200']:.4f} | "
                     f"{speedup:.2f}x |")
    return "\n".join(lines)


def random_e8_cache(fmt, num_blocks: int, device: str) -> torch.Tensor:
    """Random codes (every index is a valid codeword) with fp16 scales of 1: same bytes read as a real cache."""
    cache = torch.randint(0, 256, (num_blocks, HK, PAGE, fmt.slot_bytes), dtype=torch.uint8, device=device)
    ones = torch.ones(2, dtype=torch.float16).view(torch.uint8)  # K and V scale bytes
    cache[..., fmt.k_scale_offset:] = ones.to(device)
    return cache


def bench(fn, device: str) -> float:
    """Median milliseconds of ``fn`` (triton.testing.do_bench on a GPU; one timed call in a dry run)."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))
    fn()
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def copy_bandwidth(device: str) -> float:
    """Measured device-to-device copy bandwidth in bytes/s (read + write)."""
    if device != "cuda":
        return float("nan")
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), device)
    return 2 * src.numel() / (ms * 1e-3)


def max_rel_error(dtypes: list[str], device: str) -> dict[str, float]:
    """Kernel vs torch reference on a real encoded cache (batch 2, 1K context, or 64 in a dry run), per dtype."""
    from nexusquant_vllm.codec import encode_kv, get_format
    from nexusquant_vllm.kernels import decode_attention, paged_decode_attention_ref

    ctx = 1024 if device == "cuda" else 64
    blocks = ctx // PAGE
    table = (torch.randperm(2 * blocks) + 1).view(2, blocks).int()
    lens = torch.tensor([ctx, ctx - 7], dtype=torch.int32)
    q = torch.randn(2, HQ, D)
    errors = {}
    for name in ["bf16", *dtypes]:
        fmt = None if name == "bf16" else get_format(name, D)
        k, v = torch.randn(2, 2 * blocks + 1, PAGE, HK, D)
        cache = (encode_kv(k, v, fmt) if fmt else torch.cat([k, v], -1).bfloat16()).transpose(1, 2).contiguous()
        ref = paged_decode_attention_ref(q, cache, table, lens, D**-0.5, fmt)
        out = decode_attention(q.to(device), cache.to(device), table.to(device), lens.to(device), D**-0.5, fmt)
        errors[name] = float((out.cpu() - ref).abs().max() / ref.abs().max())
    print("max relative error vs torch reference:", errors)
    return errors


def decode_cases(args, device: str, copy_bw: float) -> list[dict]:
    from nexusquant_vllm.codec import get_format
    from nexusquant_vllm.kernels import decode_attention

    rows = []
    for batch in args.batch:
        for ctx in args.context:
            bf16_gib = batch * ctx * HK * 2 * D * 2 / 2**30
            if bf16_gib > args.max_gib:
                print(f"skip batch {batch} context {ctx}: bf16 cache {bf16_gib:.1f} GiB > --max-gib")
                continue
            blocks_per_seq = ctx // PAGE
            num_blocks = batch * blocks_per_seq + 1  # block 0 is the null block
            table = (torch.randperm(num_blocks - 1, device=device) + 1).view(batch, blocks_per_seq).int()
            lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
            q = torch.randn(batch, HQ, D, device=device, dtype=torch.bfloat16)
            table_bytes = table.numel() * 4
            for name in args.dtypes:
                fmt = get_format(name, D)
                cache = random_e8_cache(fmt, num_blocks, device)
                ms = bench(lambda cache=cache: decode_attention(q, cache, table, lens, D**-0.5, fmt, max_seq_len=ctx), device)
                nbytes = batch * ctx * HK * fmt.slot_bytes + table_bytes
                rows.append(_row(name, batch, ctx, ms, nbytes, copy_bw))
                del cache
            kv = torch.randn(num_blocks, HK, PAGE, 2 * D, device=device, dtype=torch.bfloat16)
            ms = bench(lambda kv=kv: decode_attention(q, kv, table, lens, D**-0.5, None, max_seq_len=ctx), device)
            rows.append(_row("bf16-paged", batch, ctx, ms, batch * ctx * HK * 4 * D + table_bytes, copy_bw))
            del kv
            k = torch.randn(batch, HK, ctx, D, device=device, dtype=torch.bfloat16)
            v = torch.randn_like(k)
            q4 = q[:, :, None]
            sdpa = torch.nn.functional.scaled_dot_product_attention
            ms = bench(lambda k=k, v=v: sdpa(q4, k, v, enable_gqa=True), device)
            rows.append(_row("bf16-sdpa-contiguous", batch, ctx, ms, 2 * k.numel() * 2, copy_bw))
            del k, v
            print(" | ".join(f"{r['kernel']} {r['ms']:.3f} ms" for r in rows[-len(args.dtypes) - 2:]), f"[b{batch} ctx{ctx}]")
    return rows


def _row(kernel: str, batch: int, ctx: int, ms: float, nbytes: int, copy_bw: float) -> dict:
    bw = nbytes / (ms * 1e-3)
    gpu = next((g for g in GPUS if g in _device_name()), None)
    ideal = ideal_ms(decode_step_cost(kernel, batch, ctx), gpu) if gpu and kernel != "bf16-sdpa-contiguous" else None
    return dict(kernel=kernel, batch=batch, context=ctx, ms=ms, bytes=nbytes, gbps=bw / 1e9, frac_copy_bw=bw / copy_bw,
                frac_roofline=ideal / ms if ideal else None)


def _device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def store_vs_prefill(args, device: str) -> list[dict]:
    """Fused store of one layer's K/V for a prefill vs one layer's prefill proxy (GEMMs + causal SDPA), per dtype;
    on a GPU also a decode step (store + decode attention) replayed from a CUDA graph."""
    from nexusquant_vllm.codec import get_format
    from nexusquant_vllm.kernels import store_kv

    n = args.prefill_tokens
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    hidden, ffn = args.hidden, args.ffn
    x = torch.randn(n, hidden, device=device, dtype=dt)
    weights = [torch.randn(hidden, o, device=device, dtype=dt) * 0.01 for o in (hidden + 2 * HK * D, hidden, 2 * ffn)]
    w_down = torch.randn(ffn, hidden, device=device, dtype=dt) * 0.01
    q = torch.randn(1, HQ, n, D, device=device, dtype=dt)
    kv = torch.randn(1, HK, n, D, device=device, dtype=dt)

    def prefill_layer():
        for w in weights:
            x @ w
        torch.randn(n, ffn, device=device, dtype=dt) @ w_down
        torch.nn.functional.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True)

    prefill_ms = bench(prefill_layer, device)
    key, value = torch.randn(2, n, HK, D, device=device, dtype=dt)
    slots = torch.randperm(n + PAGE, device=device)[:n]
    rows = []
    for name in args.dtypes:
        fmt = get_format(name, D)
        cache = torch.zeros((n + PAGE) // PAGE + 1, HK, PAGE, fmt.slot_bytes, dtype=torch.uint8, device=device)
        ms = bench(lambda: store_kv(key, value, cache, slots, fmt), device)
        decode_ms = decode_store_graph_ms(fmt, max(args.batch), device) if device == "cuda" else float("nan")
        rows.append(dict(dtype=name, tokens=n, store_ms=ms, prefill_layer_ms=prefill_ms, ratio=ms / prefill_ms,
                         decode_batch=max(args.batch), decode_store_graph_ms=decode_ms))
        print(f"store {name}: {ms:.3f} ms vs prefill layer {prefill_ms:.3f} ms ({100 * ms / prefill_ms:.1f}%); "
              f"decode step (store + attention, 1K context) of {max(args.batch)} sequences from a CUDA graph "
              f"{decode_ms:.4f} ms")
    return rows


def decode_store_graph_ms(fmt, batch: int, device: str) -> float:
    """Replay time of a CUDA graph holding one decode step of one layer: the store of one token per sequence and
    the decode attention over 1K cached tokens (capturing both is the check)."""
    from nexusquant_vllm.kernels import decode_attention, store_kv

    ctx = 1024
    key, value = torch.randn(2, batch, HK, D, device=device, dtype=torch.bfloat16)
    q = torch.randn(batch, HQ, D, device=device, dtype=torch.bfloat16)
    blocks = ctx // PAGE
    cache = random_e8_cache(fmt, batch * blocks + 1, device)
    table = (torch.arange(batch * blocks, device=device) + 1).view(batch, blocks).int()
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    slots = table[:, -1].long() * PAGE + PAGE - 1  # the last slot of each sequence's last page
    out = torch.empty_like(q)

    def step():
        store_kv(key, value, cache, slots, fmt)
        decode_attention(q, cache, table, lens, D**-0.5, fmt, out=out, max_seq_len=ctx)

    step()  # compiles the kernels and builds their tables before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return bench(graph.replay, device)


def workspace_prefill(q, k, v, cache, block_ids, ctx: int, fmt, rot: torch.Tensor) -> torch.Tensor:
    """The unfused alternative to ``prefill_attention`` for one request: dequantize its pages (the codec's torch
    table gathers) into a bf16 workspace, append the chunk's rotated K/V, SDPA with a lower-right causal mask (torch
    dispatches it to flash attention on sm80+, GQA native), un-rotate."""
    from torch.nn.attention.bias import causal_lower_right

    from nexusquant_vllm.codec import decode_kv_rotated

    n = q.shape[0]
    k_ctx, v_ctx = decode_kv_rotated(cache[block_ids].transpose(0, 1), fmt, torch.bfloat16)  # [Hk, blocks, PAGE, D]
    k_all, v_all = (torch.cat([page.flatten(1, 2)[:, :ctx], (x.float() @ rot).bfloat16().transpose(0, 1)], 1)
                    for page, x in ((k_ctx, k), (v_ctx, v)))
    q_rot = (q.float() @ rot).bfloat16().transpose(0, 1)
    out = torch.nn.functional.scaled_dot_product_attention(
        q_rot[None], k_all[None], v_all[None], attn_mask=causal_lower_right(n, ctx + n), scale=D**-0.5,
        enable_gqa=True)
    return (out[0].transpose(0, 1).float() @ rot.T).to(q.dtype)


def prefill_cases(args, device: str) -> dict:
    """One layer's continuation prefill of one request, a chunk of n new tokens over ctx cached tokens, per dtype:
    ``prefill_attention`` (fused) vs :func:`workspace_prefill`. Each row also holds the two outputs' max relative
    difference (the workspace path is bf16 throughout). ``crossover[dtype][ctx]``: the smallest chunk from which
    the workspace path is faster at every larger chunk measured (None: the fused kernel wins at the largest)."""
    from nexusquant_vllm.codec import get_format
    from nexusquant_vllm.codec.rotation import rotation_matrix
    from nexusquant_vllm.kernels import prefill_attention

    rot = rotation_matrix(D, device)
    rows, crossover = [], {}
    for name in args.dtypes:
        fmt = get_format(name, D)
        crossover[name] = {}
        for ctx in args.prefill_contexts:
            blocks = ctx // PAGE
            cache = random_e8_cache(fmt, blocks + 1, device)
            block_ids = torch.randperm(blocks, device=device) + 1
            table = block_ids.view(1, blocks).int()
            for n in args.prefill_chunks:
                q = torch.randn(n, HQ, D, device=device, dtype=torch.bfloat16)
                k, v = torch.randn(2, n, HK, D, device=device, dtype=torch.bfloat16)
                starts = torch.tensor([0, n], dtype=torch.int32, device=device)
                lens = torch.tensor([ctx + n], dtype=torch.int32, device=device)

                def fused():
                    return prefill_attention(q, k, v, cache, table, starts, lens, D**-0.5, fmt, max_query_len=n)

                def workspace():
                    return workspace_prefill(q, k, v, cache, block_ids, ctx, fmt, rot)

                ref = workspace().float()
                diff = float((fused().float() - ref).abs().max() / ref.abs().max())
                rows.append(dict(dtype=name, context=ctx, chunk=n, fused_ms=bench(fused, device),
                                 workspace_ms=bench(workspace, device), max_rel_diff=diff))
                r = rows[-1]
                print(f"prefill {name} ctx {ctx} chunk {n}: fused {r['fused_ms']:.3f} ms, "
                      f"workspace + SDPA {r['workspace_ms']:.3f} ms, max rel diff {diff:.4f}")
            crossover[name][ctx] = _crossover([r for r in rows if r["dtype"] == name and r["context"] == ctx])
    print("prefill crossover (chunk from which dequantize + SDPA is faster):", crossover)
    return dict(rows=rows, crossover=crossover)


def _crossover(rows: list[dict]) -> int | None:
    """The smallest chunk from which the workspace path wins at every larger chunk (None if it loses the largest)."""
    chunk = None
    for r in sorted(rows, key=lambda r: r["chunk"], reverse=True):
        if r["workspace_ms"] >= r["fused_ms"]:
            break
        chunk = r["chunk"]
    return chunk


def markdown(result: dict) -> str:
    lines = [f"# Decode attention, Llama-3-8B shapes, one layer ({result['device']})", "",
             f"Copy bandwidth: {result['copy_gbps']:.0f} GB/s", "",
             "| kernel | batch | context | ms | GB/s | of copy bw | of roofline |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['kernel']} | {r['batch']} | {r['context']} | {r['ms']:.4f} | {r['gbps']:.0f} | {r['frac_copy_bw']:.2f} "
              f"| {'-' if r['frac_roofline'] is None else format(r['frac_roofline'], '.2f')} |" for r in result["decode"]]
    lines += ["", "| store dtype | tokens | store ms | prefill layer ms | ratio | decode batch | decode step ms (graph) |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['dtype']} | {r['tokens']} | {r['store_ms']:.3f} | {r['prefill_layer_ms']:.3f} | {r['ratio']:.3f} "
              f"| {r['decode_batch']} | {r['decode_store_graph_ms']:.4f} |" for r in result["store"]]
    lines += ["", "| prefill dtype | context | chunk | fused ms | dequantize + SDPA ms | faster | max rel diff |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['dtype']} | {r['context']} | {r['chunk']} | {r['fused_ms']:.3f} | {r['workspace_ms']:.3f} "
              f"| {'fused' if r['fused_ms'] <= r['workspace_ms'] else 'workspace'} | {r['max_rel_diff']:.4f} |"
              for r in result["prefill"]["rows"]]
    lines += ["", "Prefill crossover (chunk from which dequantize + SDPA is faster; None: fused at every chunk):", ""]
    lines += [f"- {name}: " + ", ".join(f"ctx {ctx}: {chunk}" for ctx, chunk in by_ctx.items())
              for name, by_ctx in result["prefill"]["crossover"].items()]
    return "\n".join(lines)


def _plot(path: Path, rows: list[dict]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        for kernel in sorted({r["kernel"] for r in rows}):
            pts = sorted((r["context"], r["ms"]) for r in rows if r["batch"] == batch and r["kernel"] == kernel)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=kernel)
        ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="ms per decode call", title=f"batch {batch}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.hidden, args.ffn = HIDDEN, FFN
    if args.model_only:
        result = roofline(args)
        json_path, _ = write_results("kernels_gpu_roofline", result, roofline_markdown(result), args.out or RESULTS_DIR)
        print(roofline_markdown(result))
        return 0
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined
        args.batch, args.context, args.prefill_tokens, args.hidden, args.ffn = [1], [64], 16, 256, 512
        args.prefill_chunks, args.prefill_contexts = [16], [32]
        args.name, results_dir = "kernels_gpu_dryrun", args.out or Path(tempfile.gettempdir())  # never in results/
        device = "cpu"
    elif not torch.cuda.is_available():
        print("kernels_gpu.py needs a CUDA GPU (none found); use --dry-run for a CPU smoke test.", file=sys.stderr)
        return 2
    else:
        device, results_dir = "cuda", args.out or RESULTS_DIR
    copy_bw = copy_bandwidth(device)
    result = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu (TRITON_INTERPRET dry run)",
                  copy_gbps=copy_bw / 1e9, max_rel_error_vs_reference=max_rel_error(args.dtypes, device), shapes=dict(q_heads=HQ, kv_heads=HK, head_dim=D, page=PAGE),
                  decode=decode_cases(args, device, copy_bw), store=store_vs_prefill(args, device),
                  prefill=prefill_cases(args, device))
    json_path, _ = write_results(args.name, result, markdown(result), results_dir)
    _plot(json_path.with_suffix(".png"), result["decode"])
    print(f"wrote {json_path}, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
