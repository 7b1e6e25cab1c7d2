"""What a user of vLLM's CPU build sees with an e8 KV cache against ``auto`` and ``fp8`` on SmolLM2-135M, and what
decode attention costs per element at the kernel level.

Engine runs (the default): vLLM's defaults (chunked prefill and its compiled graph; ``--enforce-eager`` to compare),
for each batch size and prompt length a batch of real-text prompts submitted together, ``--new-tokens`` greedy tokens
each (``ignore_eos``). Per run, from vLLM's own request timestamps: the batch's time to first token (submission to the
last request's first token), decode tokens/s over the window where every request decodes (the last request to get
its first token, from then to its last token: the batch makes ``batch`` tokens per step there; for batch 1 the one
request's decode), and wall time. Runs are interleaved over dtypes, so that a slow spell of a shared machine hits
every dtype, and the median of ``--repeats`` is reported.

Breakdown runs (``--breakdown``): where one batch's prefill time goes. The engine runs in this process (vLLM's
multiprocessing off, so the timers see the worker), ``max_tokens=1``, one run per dtype: the time inside the attention
paths' store and attend (every layer, E8 and protected alike) and the rest (the model, sampling, scheduling).

Kernel runs (``--kernel``): the native decode attention (``csrc/e8_decode_attention_cpu.cpp``) over E8 pages and over
bf16 pages of the same paged layout (the pages of vLLM's protected layers), batch 8, SmolLM2's heads (9 query, 3 KV,
head_dim 64), context 1K to 32K: ms per step and layer, ns and bytes per token-head.

The machine is recorded beside the numbers: CPU model and vector ISA, load average, one core's fp32 and bf16 matmul
rate (a CPU without AVX-512 BF16 runs a bf16 model many times slower, which changes every ratio; ``--model-dtype
float32`` then measures what a user of that CPU would run) and copy bandwidth.
Writes results/cpu_throughput.{json,md}, results/cpu_breakdown.{json,md} or results/cpu_kernel.{json,md,png}
(``--name`` to choose another stem).

    python -m benchmarks.cpu_throughput [--dtypes auto,fp8,e8-k3v2] [--batches 1,8] [--prompt-lens 1024,4096,8192]
        [--new-tokens 128] [--repeats 3] [--model-dtype auto] [--breakdown] [--kernel]
        [--contexts 1024,4096,16384,32768]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from collections.abc import Iterator

import torch

SMOLLM2_HEADS = (9, 3, 64)  # query heads, KV heads, head_dim
SMOLLM2_LAYERS = 30
KERNEL_BATCH = 8
KERNEL_BLOCK = 16


# ---- the machine ---------------------------------------------------------------------------------------------------

def _rate(fn, work: float, repeats: int = 3) -> float:
    """``work`` per second of ``fn``, best of ``repeats`` after one warm-up call."""
    fn()
    best = min(_seconds(fn) for _ in range(repeats))
    return work / best


def _seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def machine() -> dict:
    """CPU model, the vector ISA that matters here, load, one core's matmul rates and copy bandwidth."""
    info = open("/proc/cpuinfo").read()
    field = lambda name: next((ln.split(":", 1)[1].strip() for ln in info.splitlines()  # noqa: E731
                               if ln.startswith(name)), "")
    flags = set(field("flags").split())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
        ab, bb = a[:256, :256].bfloat16(), b[:256, :256].bfloat16()
        big = torch.empty(64 << 20)  # 256 MiB
        rates = {
            "fp32_matmul_gflops_1_core": _rate(lambda: a @ b, 2 * 1024**3) / 1e9,
            "bf16_matmul_gflops_1_core": _rate(lambda: ab @ bb, 2 * 256**3) / 1e9,
            "copy_gb_per_s_1_core": _rate(lambda: big.clone(), 2 * big.numel() * 4) / 1e9,  # read + write
        }
    finally:
        torch.set_num_threads(threads)
    return {"cpu": field("model name"), "cores": os.cpu_count(), "loadavg_1_5_15": os.getloadavg(),
            "isa": sorted(flags & {"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}), **rates}


# ---- engine runs ---------------------------------------------------------------------------------------------------

def warm_engine(model: str, dtype: str, prompts: list[list[int]], new_tokens: int, model_dtype: str,
                enforce_eager: bool, **engine_args):
    """An engine sized for one batch of ``prompts`` (no prefix caching), after one short warm-up request."""
    from vllm import LLM, SamplingParams, TokensPrompt

    llm = LLM(model=model, kv_cache_dtype=dtype, dtype=model_dtype,
              max_model_len=max(len(p) for p in prompts) + new_tokens + 16, enforce_eager=enforce_eager, seed=0,
              enable_prefix_caching=False, max_num_seqs=len(prompts), **engine_args)
    llm.generate([TokensPrompt(prompt_token_ids=prompts[0][:32])], SamplingParams(max_tokens=2), use_tqdm=False)
    return llm


def prompt_sets(args: argparse.Namespace) -> Iterator[tuple[str, int, int, list[list[int]]]]:
    """(model path, batch, prompt length, the batch's prompts) for every ``--batches`` x ``--prompt-lens``: real
    corpus text, seed 1."""
    from transformers import AutoTokenizer

    from benchmarks.common import corpus_token_chunks, smollm2_path

    model = str(smollm2_path())
    tokenizer = AutoTokenizer.from_pretrained(model)
    for batch in args.batches:
        for prompt_len in args.prompt_lens:
            yield model, batch, prompt_len, corpus_token_chunks(tokenizer, batch, prompt_len, seed=1)


def measure(model: str, dtype: str, prompts: list[list[int]], new_tokens: int, model_dtype: str,
            enforce_eager: bool) -> dict:
    """One engine, one batch: time to first token, decode tokens/s, wall time."""
    from vllm import SamplingParams, TokensPrompt

    from benchmarks.common import shutdown_llm

    llm = warm_engine(model, dtype, prompts, new_tokens, model_dtype, enforce_eager, disable_log_stats=False)
    greedy = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    start, t0 = time.monotonic(), time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], greedy, use_tqdm=False)
    wall = time.perf_counter() - t0
    shutdown_llm(llm)
    assert all(len(o.outputs[0].token_ids) == new_tokens for o in outs)
    first = [o.metrics.first_token_ts for o in outs]
    last = [o.metrics.last_token_ts for o in outs]
    i = max(range(len(outs)), key=lambda j: first[j])  # the last request to finish its prefill
    decode_s = last[i] - first[i]
    return {"ttft_s": first[i] - start, "decode_tokens_per_s": len(prompts) * (new_tokens - 1) / decode_s,
            "wall_s": wall}


def engine_rows(args: argparse.Namespace) -> list[dict]:
    rows = []
    for model, batch, prompt_len, prompts in prompt_sets(args):
        runs: dict[str, list[dict]] = {d: [] for d in args.dtypes}
        for _ in range(args.repeats):  # interleaved over dtypes
            for dtype in args.dtypes:
                runs[dtype].append(measure(model, dtype, prompts, args.new_tokens, args.model_dtype,
                                           args.enforce_eager))
                print(batch, prompt_len, dtype, runs[dtype][-1], flush=True)
        medians = {d: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for d, rs in runs.items()}
        base = medians.get("auto")
        for dtype, med in medians.items():
            rows.append({"dtype": dtype, "batch": batch, "prompt_len": prompt_len, **med, "runs": runs[dtype],
                         **{f"{k}_vs_auto": med[k2] / base[k2] if base else None
                            for k, k2 in (("ttft", "ttft_s"), ("decode", "decode_tokens_per_s"))}})
    return rows


def engine_table(rows: list[dict]) -> str:
    vs = lambda x: f"{x:.2f}x" if x is not None else "–"  # noqa: E731
    lines = ["| batch x prompt | dtype | TTFT (s) | vs auto | decode tok/s | vs auto | wall (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} x {r['prompt_len']} | {r['dtype']} | {r['ttft_s']:.1f} | {vs(r['ttft_vs_auto'])}"
                     f" | {r['decode_tokens_per_s']:.1f} | {vs(r['decode_vs_auto'])} | {r['wall_s']:.1f} |")
    return "\n".join(lines)


# ---- breakdown runs ------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def path_timers() -> Iterator[dict[str, float]]:
    """Seconds spent in every attention path's ``store`` and ``attend`` while the context is open (outermost calls
    only: a path that delegates to its parent class is counted once)."""
    from nexusquant_vllm.attention import NativeCpuPath, TorchPath

    spent = {"store": 0.0, "attend": 0.0}
    depth = [0]
    saved = [(cls, name, cls.__dict__[name]) for cls in (TorchPath, NativeCpuPath) for name in spent
             if name in cls.__dict__]

    def timed(name, fn):
        def wrapper(self, *args, **kwargs):
            depth[0] += 1
            t = time.perf_counter()
            try:
                return fn(self, *args, **kwargs)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    spent[name] += time.perf_counter() - t
        return wrapper

    for cls, name, fn in saved:
        setattr(cls, name, timed(name, fn))
    try:
        yield spent
    finally:
        for cls, name, fn in saved:
            setattr(cls, name, fn)


def breakdown(model: str, dtype: str, prompts: list[list[int]], model_dtype: str, enforce_eager: bool) -> dict:
    """One in-process engine (the caller turns vLLM's multiprocessing off), one batch prefilled to its first token:
    total, store and attention seconds."""
    from vllm import SamplingParams, TokensPrompt

    from benchmarks.common import shutdown_llm

    llm = warm_engine(model, dtype, prompts, 0, model_dtype, enforce_eager)
    with path_timers() as spent:
        t = time.perf_counter()
        llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], SamplingParams(max_tokens=1), use_tqdm=False)
        total = time.perf_counter() - t
    shutdown_llm(llm)
    return {"prefill_s": total, "store_s": spent["store"], "attention_s": spent["attend"],
            "rest_s": total - spent["store"] - spent["attend"]}


def breakdown_rows(args: argparse.Namespace) -> list[dict]:
    rows = []
    for model, batch, prompt_len, prompts in prompt_sets(args):
        for dtype in args.dtypes:
            row = {"dtype": dtype, "batch": batch, "prompt_len": prompt_len,
                   **breakdown(model, dtype, prompts, args.model_dtype, args.enforce_eager)}
            print(row, flush=True)
            rows.append(row)
    return rows


def breakdown_table(rows: list[dict]) -> str:
    lines = ["| batch x prompt | dtype | prefill (s) | store (s) | attention (s) | rest (s) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        paths = (f"{r['store_s']:.1f} | {r['attention_s']:.1f}" if r["dtype"].startswith(("e8-", "scalar-"))
                 else "– | –")  # auto / fp8 attend through vLLM's own backend, not timed here
        lines.append(f"| {r['batch']} x {r['prompt_len']} | {r['dtype']} | {r['prefill_s']:.1f} | {paths} | "
                     f"{r['rest_s']:.1f} |")
    return "\n".join(lines)


# ---- kernel runs ---------------------------------------------------------------------------------------------------

def kernel_rows(contexts: list[int], dtypes: list[str]) -> list[dict]:
    """Native decode attention over E8 pages (each e8 dtype) and bf16 pages, per context length."""
    from nexusquant_vllm import native
    from nexusquant_vllm.codec.format import get_format
    from nexusquant_vllm.codec.kv import encode_kv

    num_heads, num_kv_heads, d = SMOLLM2_HEADS
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # vLLM's CPU worker runs on one core
    rows = []
    try:
        for ctx in contexts:
            blocks = KERNEL_BATCH * ctx // KERNEL_BLOCK
            table = torch.arange(1, blocks + 1).view(KERNEL_BATCH, -1)  # block 0: vLLM's null block
            cached = torch.full((KERNEL_BATCH,), ctx)
            q = torch.randn(KERNEL_BATCH, num_heads, d)
            k, v = torch.randn(2, KERNEL_BATCH, num_kv_heads, d)
            # one block of real codes, repeated: decode work does not depend on the code values
            src_k, src_v = torch.randn(2, KERNEL_BLOCK * num_kv_heads, d)
            for dtype in ["bf16", *dtypes]:
                fmt = None if dtype == "bf16" else get_format(dtype, d)
                if fmt is None:
                    page = torch.randn(1, num_kv_heads, KERNEL_BLOCK, 2 * d).bfloat16()
                else:
                    slots = encode_kv(src_k, src_v, fmt)
                    page = slots.view(KERNEL_BLOCK, num_kv_heads, -1).transpose(0, 1)[None]
                cache = page.expand(blocks + 1, *page.shape[1:]).contiguous()
                step = lambda: native.decode_attention(q, k, v, cache, table, cached, d**-0.5, fmt)  # noqa: E731
                seconds = min(_seconds(step) for _ in range(max(3, 48 * 1024 // ctx)))
                bytes_per = cache[0, 0, 0].numel() * cache.element_size()
                rows.append({"dtype": dtype, "context": ctx, "ms_per_step_and_layer": seconds * 1e3,
                             "ns_per_token_head": seconds / (KERNEL_BATCH * num_kv_heads * ctx) * 1e9,
                             "bytes_per_token_head": bytes_per,
                             "attention_ms_per_output_token": seconds * 1e3 * SMOLLM2_LAYERS / KERNEL_BATCH})
                print(rows[-1], flush=True)
    finally:
        torch.set_num_threads(threads)
    return rows


def kernel_table(rows: list[dict]) -> str:
    bf16 = {r["context"]: r["ms_per_step_and_layer"] for r in rows if r["dtype"] == "bf16"}
    lines = ["| context | pages | ms per step and layer (batch 8) | vs bf16 pages | ns per token-head "
             "| bytes per token-head |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['context']} | {r['dtype']} | {r['ms_per_step_and_layer']:.2f} | "
                     f"{bf16[r['context']] / r['ms_per_step_and_layer']:.2f}x | {r['ns_per_token_head']:.1f} | "
                     f"{r['bytes_per_token_head']} |")
    return "\n".join(lines)


def plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        pts = [(r["context"], r["attention_ms_per_output_token"]) for r in rows if r["dtype"] == dtype]
        ax.plot(*zip(*pts), marker="o", label=f"{dtype} pages")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode attention per output token (ms)")
    ax.set_title(f"native decode attention, batch {KERNEL_BATCH}, {SMOLLM2_LAYERS} layers, one core")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    from benchmarks.common import RESULTS_DIR, write_results

    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtypes", type=lambda s: s.split(","), default="auto,fp8,e8-k2v2,e8-k3v2,e8-k4v2,e8-k4v4")
    p.add_argument("--batches", type=ints, default="1,8")
    p.add_argument("--prompt-lens", type=ints, default="1024,4096,8192")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="runs per dtype, interleaved; the median is reported")
    p.add_argument("--model-dtype", default="auto", help="vLLM's --dtype (auto: the model's bf16)")
    p.add_argument("--enforce-eager", action="store_true", help="vLLM's eager mode instead of its compiled graph")
    p.add_argument("--breakdown", action="store_true", help="where the prefill time goes (store, attention, rest)")
    p.add_argument("--kernel", action="store_true", help="the decode-attention microbenchmark instead")
    p.add_argument("--contexts", type=ints, default="1024,4096,16384,32768")
    p.add_argument("--name", default=None, help="result file stem (default: cpu_throughput or cpu_kernel)")
    args = p.parse_args(argv)
    payload = {"machine": machine(), "args": vars(args)}
    if args.kernel:
        rows = kernel_rows(args.contexts, [d for d in args.dtypes if d.startswith("e8-")])
        name = args.name or "cpu_kernel"
        plot(rows, RESULTS_DIR / f"{name}.png")
        table = kernel_table(rows)
    else:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")  # GiB: batch 8 x 8K tokens in float32 fits
        # A long e8 prefill step on a loaded machine can exceed vLLM's 300 s default.
        os.environ.setdefault("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "3600")
        if args.breakdown:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the worker in this process, where the timers are
            rows, name = breakdown_rows(args), args.name or "cpu_breakdown"
            table = breakdown_table(rows)
        else:
            rows, name = engine_rows(args), args.name or "cpu_throughput"
            table = engine_table(rows)
    payload["rows"] = rows
    payload["machine_after"] = {"loadavg_1_5_15": os.getloadavg()}
    write_results(name, payload, table)
    print(table)


if __name__ == "__main__":
    main()
