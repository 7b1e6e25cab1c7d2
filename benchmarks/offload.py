"""The compressed KV tier (NQOffloadConnector) on SmolLM2 through vLLM's CPU build: bytes per token in each tier,
codec throughput, time to first token from RAM and disk against recomputing, and a fault run.

1. **Bytes.** For e8-k3v2 with the first and last 2 layers protected in bf16, with none, and with every
   layer bf16 (the `auto` reference), an engine prefills `--chunks` corpus chunks of `--chunk-len` tokens with the
   tier's disk directory on; every saved record is then decoded and re-encoded with each transform per stream
   (raw pages, + zstd, + byte planes, + scale deltas, + a zstd dictionary trained on the other half of the blocks).
   Two chunk seeds: the defaults were chosen on seed 0; seed 1 checks them on fresh text.
2. **Time to first token** of a `--prompt-len`-token prompt (`max_tokens=1`, wall time of `generate`): recompute,
   RAM hit (prefix cache reset), disk hit with the page cache warm and cold (`posix_fadvise(DONTNEED)` on every
   record; an engine with no RAM tier, started on the same directory: a restart), and the same for a batch of 8
   prompts sharing a `--shared-len`-token prefix (fresh suffixes each time).
3. **Faults.** The first record of each prompt truncated, bit-flipped, swapped with another key's, replaced by an
   e8-k2v2 record, or emptied: nothing of the prompt may load, so its greedy output must equal the cold run's (a
   loaded prefix legitimately changes an e8 output: attention then reads pages where the cold run read the chunk's
   own K/V). And a disk directory on a 3 MiB tmpfs that fills up mid-run: cold outputs, then (blocks cached) the
   outputs of a prefix hit. No request may fail.

    python -m benchmarks.offload [--chunks 8] [--chunk-len 1024] [--prompt-len 4096] [--shared-len 3072]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

BLOCK_SIZE = 128  # vLLM's CPU default
LAYERS, KV_HEADS, HEAD_DIM = 30, 3, 64  # SmolLM2-135M
BF16_BYTES_PER_TOKEN = LAYERS * KV_HEADS * HEAD_DIM * 2 * 2
PROTECTIONS = {"2 + 2 bf16": "2", "none": "none", "all bf16": "15"}  # protected layers in bf16 (layout() models that)
NAME = "offload"


# ---- engines ------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def engine(dtype: str, protect: str, tier: dict, max_model_len: int):
    from vllm import LLM

    from benchmarks.common import shutdown_llm, smollm2_path
    from nexusquant_vllm.vllm_glue.offload import kv_transfer_config

    llm = LLM(model=str(smollm2_path()), kv_cache_dtype=dtype, max_model_len=max_model_len, enforce_eager=True,
              seed=0, block_size=BLOCK_SIZE, kv_transfer_config=kv_transfer_config(**tier),
              additional_config={"nexusquant": {"protect_layers": protect, "protect_format": "auto"}})
    try:
        yield llm
    finally:
        shutdown_llm(llm)


def generate(llm, prompts: list[list[int]], max_tokens: int = 1) -> tuple[float, list[list[int]], list[int]]:
    """Wall seconds, greedy output ids and prefix-hit tokens per prompt."""
    from vllm import SamplingParams, TokensPrompt

    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    t = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
    return time.perf_counter() - t, [list(o.outputs[0].token_ids) for o in outs], [o.num_cached_tokens for o in outs]


def generate_each(llm, prompts: list[list[int]], max_tokens: int) -> tuple[list[list[int]], list[int]]:
    """One prompt at a time, so each prefills in one chunk whatever the engine's timing (an e8 output depends on
    where chunks start: a chunk attends to its own raw K/V and to earlier tokens' pages)."""
    runs = [generate(llm, [p], max_tokens) for p in prompts]
    return [r[1][0] for r in runs], [r[2][0] for r in runs]


def settle(llm, records: Path, expected: int) -> None:
    """Let the background saver finish: wait for the expected number of records on disk (each is put in RAM
    first), then a tiny request carries the RAM tier's changes to the scheduler."""
    deadline = time.time() + 120
    while len(list(records.rglob("*.nqkv"))) < expected and time.time() < deadline:
        time.sleep(0.2)
    generate(llm, [[1, 2, 3]])


def drop_page_cache(folder: Path) -> None:
    for path in folder.rglob("*.nqkv"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def chunks(n: int, length: int, seed: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    from benchmarks.common import corpus_token_chunks, smollm2_path

    return corpus_token_chunks(AutoTokenizer.from_pretrained(smollm2_path()), n, length, seed)


# ---- 1. bytes -----------------------------------------------------------------------------------------------------

def layout(dtype: str, protect: str):
    """The record layout the connector builds for SmolLM2 (layers in name order: model.layers.0, .1, .10, ...)."""
    from nexusquant_vllm.codec.format import get_format
    from nexusquant_vllm.config import parse_protect_layers
    from nexusquant_vllm.offload import BlockLayout, LayerPages

    fmt = get_format(dtype, HEAD_DIM)
    protected = set(parse_protect_layers(protect, LAYERS))
    order = sorted(range(LAYERS), key=lambda i: f"model.layers.{i}.self_attn.attn")
    return BlockLayout(tuple(
        LayerPages(KV_HEADS, BLOCK_SIZE, 4 * HEAD_DIM) if i in protected
        else LayerPages(KV_HEADS, BLOCK_SIZE, fmt.slot_bytes, fmt.k_scale_offset)
        for i in order
    ))


def saved_blocks(dtype: str, protect: str, prompts: list[list[int]], folder: Path):
    """Prefill ``prompts`` with the disk tier on; every record decoded back (with its namespace and key)."""
    from nexusquant_vllm.offload import RecordCodec

    with engine(dtype, protect, {"ram_gb": 0.5, "disk_dir": folder}, max_model_len=4608) as llm:
        generate(llm, prompts)
        settle(llm, folder, sum(len(p) - 1 for p in prompts) // BLOCK_SIZE)
    blocks = []
    for path in sorted(folder.rglob("*.nqkv")):
        record, key = path.read_bytes(), bytes.fromhex(path.stem)
        codec = RecordCodec(bytes.fromhex(path.parent.parent.name), layout(dtype, protect))
        blocks.append((record, codec.decode(key, record)))
    return blocks


def stream_sizes(blocks, lay) -> list[dict]:
    """Bytes per token of each stream under every transform, zstd on and off, and with a trained dictionary."""
    import zstandard

    from nexusquant_vllm.offload.record import TRANSFORMS, ZSTD_LEVEL, applies, forward_transform, split_streams

    streams = [split_streams(pages, lay) for _, pages in blocks]
    tokens = len(blocks) * BLOCK_SIZE
    rows = []
    for stream in ("codes", "scales", "dense"):
        if not streams[0][stream].size:
            continue
        for name in TRANSFORMS:
            if not applies(name, stream):
                continue
            data = [forward_transform(name, stream, s[stream], lay) for s in streams]
            zstd = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
            half = len(data) // 2
            trained = zstandard.train_dictionary(16384, data[:half] * 4) if half >= 2 else None
            with_dict = zstandard.ZstdCompressor(level=ZSTD_LEVEL, dict_data=trained) if trained else None
            rows.append({
                "stream": stream, "transform": name,
                "raw": sum(map(len, data)) / tokens,
                "zstd": sum(min(len(zstd.compress(d)), len(d)) for d in data) / tokens,
                "zstd_dict_heldout": (sum(min(len(with_dict.compress(d)), len(d)) for d in data[half:])
                                      / ((len(data) - half) * BLOCK_SIZE)) if with_dict else None,
                "zstd_heldout": sum(min(len(zstd.compress(d)), len(d)) for d in data[half:])
                / ((len(data) - half) * BLOCK_SIZE),
            })
    return rows


def throughput(blocks, codec) -> dict:
    """Encode and decode MB/s of page bytes, one thread, default transforms."""
    key = bytes(32)
    pages = [p for _, p in blocks[:16]]
    raw = sum(sum(x.nbytes for x in p) for p in pages)
    t = time.perf_counter()
    records = [codec.encode(key, p) for p in pages]
    encode = time.perf_counter() - t
    t = time.perf_counter()
    for r in records:
        codec.decode(key, r)
    decode = time.perf_counter() - t
    return {"encode_mb_s": raw / encode / 1e6, "decode_mb_s": raw / decode / 1e6}


def bytes_rows(args, work: Path) -> tuple[list[dict], list[dict]]:
    from nexusquant_vllm.offload import RecordCodec

    rows, details = [], []
    for seed, (label, protect) in itertools.product((0, 1), PROTECTIONS.items()):
        folder = work / f"bytes-{seed}-{protect}"
        blocks = saved_blocks("e8-k3v2", protect, chunks(args.chunks, args.chunk_len, seed), folder)
        lay = layout("e8-k3v2", protect)
        tokens = len(blocks) * BLOCK_SIZE
        records = sum(len(r) for r, _ in blocks) / tokens
        codec = RecordCodec(bytes(16), lay)
        rows.append({"seed": seed, "protection": label, "blocks": len(blocks),
                     "page_bytes_per_token": lay.nbytes / BLOCK_SIZE, "record_bytes_per_token": records,
                     "vs_bf16": BF16_BYTES_PER_TOKEN / records, **throughput(blocks, codec)})
        details += [{"seed": seed, "protection": label, **r} for r in stream_sizes(blocks, lay)]
        shutil.rmtree(folder)
    return rows, details


# ---- 2. time to first token ---------------------------------------------------------------------------------------

def ttft_rows(args, work: Path) -> list[dict]:
    folder = work / "ttft"
    long_chunks = chunks(10, args.prompt_len, 2)
    prompt, batch_chunks = long_chunks[0], long_chunks[1:9]
    shared = long_chunks[1][: args.shared_len]
    batches = [[shared + c[args.shared_len :] for c in batch_chunks[:8]]]
    suffixes = chunks(24, args.prompt_len - args.shared_len, 3)
    batches += [[shared + s for s in suffixes[8 * i : 8 * i + 8]] for i in range(3)]
    rows = []
    with engine("e8-k3v2", "2", {"ram_gb": 2.0, "disk_dir": folder}, max_model_len=args.prompt_len + 512) as llm:
        generate(llm, chunks(1, 256, 4))  # warm-up
        rows.append(_row("single", "recompute", *generate(llm, [prompt])))
        settle(llm, folder, (len(prompt) - 1) // BLOCK_SIZE)
        llm.reset_prefix_cache()
        rows.append(_row("single", "RAM hit", *generate(llm, [prompt])))
        rows.append(_row("batch of 8", "recompute", *generate(llm, batches[0])))
        saved = len({tuple(p[: BLOCK_SIZE * (i + 1)]) for p in [prompt, *batches[0]] for i in range((len(p) - 1) // BLOCK_SIZE)})
        settle(llm, folder, saved)
        llm.reset_prefix_cache()
        rows.append(_row("batch of 8", "RAM hit", *generate(llm, batches[1])))
    with engine("e8-k3v2", "2", {"ram_gb": 0, "disk_dir": folder}, max_model_len=args.prompt_len + 512) as llm:
        generate(llm, chunks(1, 256, 4))
        rows.append(_row("single", "disk hit, warm", *generate(llm, [prompt])))
        llm.reset_prefix_cache()
        drop_page_cache(folder)
        rows.append(_row("single", "disk hit, cold", *generate(llm, [prompt])))
        llm.reset_prefix_cache()
        rows.append(_row("batch of 8", "disk hit, warm", *generate(llm, batches[2])))
        llm.reset_prefix_cache()
        drop_page_cache(folder)
        rows.append(_row("batch of 8", "disk hit, cold", *generate(llm, batches[3])))
    for row in rows:
        base = next(r for r in rows if r["prompts"] == row["prompts"] and r["source"] == "recompute")
        row["vs_recompute"] = row["seconds"] / base["seconds"]
    shutil.rmtree(folder)
    return rows


def _row(prompts: str, source: str, seconds: float, _outputs, cached: list[int]) -> dict:
    return {"prompts": prompts, "source": source, "seconds": seconds, "hit_tokens": sum(cached)}


# ---- 3. faults ----------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def small_tmpfs(size: str):
    """A tmpfs that fills up (needs root); None where it cannot be mounted."""
    folder = Path(tempfile.mkdtemp(prefix="nq-full-"))
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True).returncode == 0
    try:
        yield folder if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], check=False)
        shutil.rmtree(folder, ignore_errors=True)


def fault_rows(args, work: Path) -> list[dict]:
    """Each prompt's first block is damaged one way: nothing of it may load, so its output must be the cold one.
    The disk-full run must give the cold outputs, then (same engine, blocks now cached) the warm ones."""
    from nexusquant_vllm.vllm_glue.compat import block_hashes

    folder, other = work / "faults", work / "faults-k2v2"
    damage = {
        "truncated": lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
        "bit flipped": lambda p: p.write_bytes(_flip(p.read_bytes())),
        "swapped with another key": lambda p: p.write_bytes(records[-1].read_bytes()),
        "written by e8-k2v2": lambda p: p.write_bytes(foreign[0].read_bytes()),
        "empty": lambda p: p.write_bytes(b""),
    }
    prompts = chunks(len(damage), 1024, 5)
    tier = lambda path: {"ram_gb": 0.25, "disk_dir": path}  # noqa: E731
    with engine("e8-k3v2", "2", tier(folder), 2048) as llm:
        cold, _ = generate_each(llm, prompts, 16)
        warm, _ = generate_each(llm, prompts, 16)
        settle(llm, folder, sum(len(p) - 1 for p in prompts) // BLOCK_SIZE)
    with engine("e8-k2v2", "2", tier(other), 2048) as llm:
        generate(llm, prompts[:1])
        settle(llm, other, (len(prompts[0]) - 1) // BLOCK_SIZE)
    records, foreign = sorted(folder.rglob("*.nqkv")), sorted(other.rglob("*.nqkv"))
    by_key = {p.stem: p for p in records}
    firsts = [by_key[block_hashes(p, BLOCK_SIZE)[0].hex()] for p in prompts]
    for path, fn in zip(firsts, damage.values()):
        fn(path)
    rows = []
    with engine("e8-k3v2", "2", tier(folder), 2048) as llm:
        outputs, cached = generate_each(llm, prompts, 16)
    rows.append({"case": "first block " + ", ".join(damage), "requests": len(prompts),
                 "wrong_outputs": sum(a != b for a, b in zip(outputs, cold)), "hit_tokens": sum(cached),
                 "damaged_records_left": sum(p.exists() for p in firsts)})
    with small_tmpfs("3M") as full:
        if full is not None:
            with engine("e8-k3v2", "2", tier(full), 2048) as llm:
                first, _ = generate_each(llm, prompts, 16)
                second, cached = generate_each(llm, prompts, 16)
            rows.append({"case": "disk fills up mid-run (3 MiB tmpfs)", "requests": 2 * len(prompts),
                         "wrong_outputs": sum(a != b for a, b in zip(first + second, cold + warm)),
                         "hit_tokens": sum(cached), "damaged_records_left": 0})
    return rows


def _flip(data: bytes) -> bytes:
    out = bytearray(data)
    out[len(out) * 2 // 3] ^= 0x08
    return bytes(out)


# ---- report -------------------------------------------------------------------------------------------------------

def table(payload: dict) -> str:
    lines = ["| seed | protection | page B/token | record B/token (default transforms + zstd) | vs bf16 | encode MB/s | "
             "decode MB/s |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['seed']} | {r['protection']} | {r['page_bytes_per_token']:.0f} | {r['record_bytes_per_token']:.0f} "
              f"| {r['vs_bf16']:.2f}x | {r['encode_mb_s']:.0f} | {r['decode_mb_s']:.0f} |" for r in payload["bytes"]]
    lines += ["", "| seed | protection | stream | transform | raw B/token | + zstd | + zstd, held-out half | "
              "+ trained dictionary, held-out half |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['seed']} | {r['protection']} | {r['stream']} | {r['transform']} | {r['raw']:.1f} | {r['zstd']:.1f} "
              f"| {r['zstd_heldout']:.1f} | {_number(r['zstd_dict_heldout'])} |" for r in payload["streams"]]
    lines += ["", "| prompts | source | seconds | vs recompute | hit tokens |", "|---|---|---|---|---|"]
    lines += [f"| {r['prompts']} | {r['source']} | {r['seconds']:.2f} | {r['vs_recompute']:.3f} | {r['hit_tokens']} |"
              for r in payload["ttft"]]
    lines += ["", "| fault case | requests | wrong outputs | hit tokens | damaged records left |", "|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['requests']} | {r['wrong_outputs']} | {r['hit_tokens']} | {r['damaged_records_left']} |"
              for r in payload["faults"]]
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    seed0 = [r for r in payload["bytes"] if r["seed"] == 0]
    labels = [r["protection"] for r in seed0]
    x = np.arange(len(labels))
    a.bar(x - 0.2, [r["page_bytes_per_token"] for r in seed0], 0.4, label="pages")
    a.bar(x + 0.2, [r["record_bytes_per_token"] for r in seed0], 0.4, label="record (transforms + zstd)")
    a.axhline(BF16_BYTES_PER_TOKEN / 6, color="k", ls="--", lw=1, label="1/6 of bf16")
    a.set_xticks(x, [f"e8-k3v2\n{lab}" for lab in labels])
    a.set_ylabel("bytes per token (all layers)")
    a.set_yscale("log")
    a.legend(fontsize=8)
    ttft = payload["ttft"]
    names = [f"{r['prompts']}\n{r['source']}" for r in ttft]
    b.barh(range(len(ttft)), [r["seconds"] for r in ttft])
    b.set_yticks(range(len(ttft)), names, fontsize=7)
    b.set_xscale("log")
    b.set_xlabel("time to first token (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    from benchmarks.common import RESULTS_DIR, write_results
    from benchmarks.cpu_throughput import machine

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--chunk-len", type=int, default=1024)
    parser.add_argument("--prompt-len", type=int, default=4096)
    parser.add_argument("--shared-len", type=int, default=3072)
    parser.add_argument("--parts", default="bytes,ttft,faults")
    parser.add_argument("--name", default=NAME)
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    payload: dict = {"bytes": [], "streams": [], "ttft": [], "faults": []}
    previous = RESULTS_DIR / f"{args.name}.json"
    if parts != {"bytes", "ttft", "faults"} and previous.exists():  # rerun some parts, keep the others
        payload = json.loads(previous.read_text())
    payload.setdefault("runs", {})
    for part in parts:
        payload["runs"][part] = {"args": vars(args), "machine": machine()}
    with tempfile.TemporaryDirectory(prefix="nq-offload-") as tmp:
        work = Path(tmp)
        if "bytes" in parts:
            payload["bytes"], payload["streams"] = bytes_rows(args, work)
        if "ttft" in parts:
            payload["ttft"] = ttft_rows(args, work)
        if "faults" in parts:
            payload["faults"] = fault_rows(args, work)
    write_results(args.name, payload, table(payload))
    if payload["bytes"] and payload["ttft"]:
        plot(payload, RESULTS_DIR / f"{args.name}.png")
    print(table(payload))


if __name__ == "__main__":
    main()
