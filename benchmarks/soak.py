"""Soak: a real OpenAI server on loopback (``nexusquant-vllm serve``, SmolLM2-135M, ``e8-k3v2``, eviction on) under
many concurrent streaming clients, a KV pool small enough to force preemption, and clients that go away.

Load: ``--concurrency`` clients keep requests in flight until ``--requests`` were sent or ``--duration`` seconds
passed. Each request streams a completion of a random corpus excerpt (token ids, ``SoakConfig.prompt_tokens``, a third
of them behind a shared prefix so that prefix caching is exercised) with a random output length (``ignore_eos``) and
a random per-request ``nq_eviction`` (none, a preset or a number). A client either reads the stream to the end,
disconnects after a random number of chunks, or cancels the request at a random moment (its deadline); vLLM aborts
a request whose client went away, so both are aborts.

Pass criteria (each checked and reported): the server process never exits and ``/health`` answers 200 at the end;
zero 5xx and zero other errors; every request that was not aborted ends with ``[DONE]``, ``finish_reason=length``
and exactly ``max_tokens`` tokens; after the load drains no KV block is held (``vllm:kv_cache_usage_perc`` back to its
initial value, and ``/reset_prefix_cache`` succeeds, which vLLM refuses while any block is still referenced;
vLLM's v1 pool counts prefix-cached blocks of finished requests as free, so a cached block is not a leak); the greedy
output of a fixed probe, run alone with an empty prefix cache, is identical before and after; the RSS of the
server's process tree after the load drains exceeds its value at the end of the warm-up (the first quarter of
the requests) by at most ``SoakConfig.rss_growth_bound_mib`` (256 MiB).

Reported: requests by outcome, preemptions (``vllm:num_preemptions``), evictions (the connector's log lines), errors
by kind, blocks leaked, peak and growth of RSS, peak KV usage; JSON, a markdown table and a plot of RSS and KV usage
over time in ``benchmarks/results/soak.*``.

    python -m benchmarks.soak [--requests 200] [--duration 600] [--concurrency 8] [--num-blocks 48] [--seed 0]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

from benchmarks.common import RESULTS_DIR, write_results
from nexusquant_vllm.vllm_glue.eviction.params import kv_transfer_config

MODEL_NAME = "smol"
STARTUP_TIMEOUT_S = 300
PROBE_PROMPT = (
    "Here is a description of a small harbour town. The town has a red and white lighthouse, a narrow railway to the "
    "capital and a bakery that sells rye bread with caraway seeds. Every spring the children race wooden boats along "
    "the canal, and in the autumn geese rest on the marshes south of the harbour. Most houses have slate roofs and "
    "blue doors, which are said to keep bad luck away. The library keeps old maps of the coast drawn by a local "
    "cartographer, and the fishermen still trade salted cod with the northern islands. "
    "Question: what colour are the doors of the houses? Answer:"
)
RATES = (None, "lossless", "conservative", "balanced", 0.2)  # per-request nq_eviction (None: the server default)
EVICTION_LOG = "nexusquant eviction: request"


@dataclasses.dataclass(frozen=True)
class SoakConfig:
    requests: int = 200
    duration_s: float = 600.0
    concurrency: int = 8
    prompt_tokens: tuple[int, int] = (16, 320)
    shared_prefix_tokens: int = 160
    output_tokens: tuple[int, int] = (8, 96)
    disconnect_prob: float = 0.15
    cancel_prob: float = 0.1
    cancel_after_s: tuple[float, float] = (0.1, 6.0)
    # server
    kv_cache_dtype: str = "e8-k3v2"
    eviction: str = "conservative"
    min_prompt_tokens: int = 96
    block_size: int = 16
    num_blocks: int = 48  # 752 tokens: vLLM admits a request whose prompt fits; decode growth then preempts
    max_num_seqs: int = 8
    max_model_len: int = 752  # at most (num_blocks - 1) * block_size: block 0 is vLLM's null block
    kv_space_gib: str = "1"
    # checks
    probe_tokens: int = 24
    warmup_fraction: float = 0.25
    rss_growth_bound_mib: float = 256.0
    drain_timeout_s: float = 120.0
    sample_interval_s: float = 1.0
    seed: int = 0


class Server(NamedTuple):
    url: str
    proc: subprocess.Popen
    log: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def launch_server(model: str, vllm_args: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[Server]:
    """``nexusquant-vllm serve MODEL`` on a free loopback port, up (``/health`` 200) when this yields; its process
    group is stopped on exit. Raises ``RuntimeError`` with the log's tail if it exits or is not up in time."""
    port = _free_port()
    cmd = [sys.executable, "-m", "nexusquant_vllm", "serve", model, "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", MODEL_NAME, *vllm_args]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server not up (exit code {proc.poll()}):\n{log.read_text()[-5000:]}")
            time.sleep(1)
        yield Server(url, proc, log)
    finally:
        # The server and its engine/worker children share the session we started: stop exactly that group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def server_args(cfg: SoakConfig) -> list[str]:
    """The ``vllm serve`` flags of the soak: e8 cache, eviction connector with a default rate, a tiny KV pool."""
    connector = kv_transfer_config(cfg.eviction, min_prompt_tokens=cfg.min_prompt_tokens)
    return ["--kv-cache-dtype", cfg.kv_cache_dtype, "--max-model-len", str(cfg.max_model_len), "--enforce-eager",
            "--block-size", str(cfg.block_size), "--num-gpu-blocks-override", str(cfg.num_blocks),
            "--max-num-seqs", str(cfg.max_num_seqs), "--enable-prefix-caching",
            "--kv-transfer-config", json.dumps(connector)]


def server_env(cfg: SoakConfig) -> dict[str, str]:
    # VLLM_SERVER_DEV_MODE exposes /reset_prefix_cache (the probe runs on an empty prefix cache; the leak check).
    return {"VLLM_CPU_KVCACHE_SPACE": cfg.kv_space_gib, "VLLM_SERVER_DEV_MODE": "1"}


# ---- metrics and memory --------------------------------------------------------------------------------------------

def parse_metrics(text: str) -> dict[str, Any]:
    """The vLLM gauges and counters the soak reads from ``/metrics`` (one engine)."""
    values: dict[str, Any] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "vllm:cache_config_info":
                values["num_gpu_blocks"] = int(sample.labels["num_gpu_blocks"])
            elif sample.name in ("vllm:kv_cache_usage_perc", "vllm:num_requests_running",
                                 "vllm:num_requests_waiting", "vllm:num_preemptions_total"):
                values[sample.name.removeprefix("vllm:")] = sample.value
    return values


def tree_rss_mib(pid: int) -> float:
    """Resident memory of a process and all its descendants (API server, engine core, worker)."""
    proc = psutil.Process(pid)
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total / 2**20


class Sample(NamedTuple):
    t: float
    rss_mib: float
    kv_usage: float
    running: float
    waiting: float
    finished: int


# ---- requests ------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RequestSpec:
    prompt: list[int]
    max_tokens: int
    eviction: str | float | None
    behaviour: str  # "complete", "disconnect" (after `stop_after` chunks) or "cancel" (after `stop_after` seconds)
    stop_after: float


def make_specs(cfg: SoakConfig, corpus_ids: list[int]) -> list[RequestSpec]:
    """``cfg.requests`` random requests (reproducible from ``cfg.seed``)."""
    rng = random.Random(cfg.seed)
    start = rng.randrange(len(corpus_ids) - cfg.shared_prefix_tokens)
    shared = corpus_ids[start : start + cfg.shared_prefix_tokens]
    specs = []
    for _ in range(cfg.requests):
        max_tokens = rng.randint(*cfg.output_tokens)
        n = min(rng.randint(*cfg.prompt_tokens), cfg.max_model_len - max_tokens)
        start = rng.randrange(len(corpus_ids) - n)
        prompt = corpus_ids[start : start + n]
        if rng.random() < 1 / 3 and n > cfg.shared_prefix_tokens:
            prompt = shared + prompt[cfg.shared_prefix_tokens :]
        u = rng.random()
        if u < cfg.disconnect_prob:
            behaviour, stop_after = "disconnect", rng.randint(1, max(1, max_tokens - 1))
        elif u < cfg.disconnect_prob + cfg.cancel_prob:
            behaviour, stop_after = "cancel", rng.uniform(*cfg.cancel_after_s)
        else:
            behaviour, stop_after = "complete", 0.0
        specs.append(RequestSpec(prompt, max_tokens, rng.choice(RATES), behaviour, stop_after))
    return specs


def completion_body(prompt: str | list[int], max_tokens: int, eviction: str | float | None = None,
                    stream: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                            "ignore_eos": True}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    if eviction is not None:
        body["vllm_xargs"] = {"nq_eviction": eviction}
    return body


async def run_request(client: httpx.AsyncClient, spec: RequestSpec) -> str:
    """Send one streaming request and behave as ``spec`` says; the outcome: ``completed``, ``disconnected``,
    ``cancelled`` or an error kind (``http_<status>``, ``stream_error_<code>``, ``incomplete_stream``,
    ``wrong_length``, the name of an httpx exception)."""
    request = _stream(client, spec)
    if spec.behaviour != "cancel":
        return await request
    try:
        return await asyncio.wait_for(request, spec.stop_after)
    except TimeoutError:
        return "cancelled"


async def _stream(client: httpx.AsyncClient, spec: RequestSpec) -> str:
    body = completion_body(spec.prompt, spec.max_tokens, spec.eviction, stream=True)
    chunks, finish, usage, done = 0, None, None, False
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                return f"http_{resp.status_code}"
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                event = json.loads(line[6:])
                if "error" in event:  # vLLM reports a failure after the 200 header inside the stream
                    return f"stream_error_{event['error'].get('code')}"
                usage = event.get("usage") or usage
                for choice in event.get("choices", []):
                    chunks += 1
                    finish = choice.get("finish_reason") or finish
                if spec.behaviour == "disconnect" and chunks >= spec.stop_after:
                    return "disconnected"  # leaving the block closes the connection mid-stream
    except httpx.HTTPError as e:
        return type(e).__name__
    if not done or finish != "length" or usage is None:
        return "incomplete_stream"
    return "completed" if usage["completion_tokens"] == spec.max_tokens else "wrong_length"


async def reset_prefix_cache(client: httpx.AsyncClient) -> bool:
    """vLLM refuses (``success: false``) while any block is still held by a request."""
    resp = await client.post("/reset_prefix_cache")
    resp.raise_for_status()
    return resp.json()["success"]


async def probe(client: httpx.AsyncClient, cfg: SoakConfig) -> str:
    """The fixed greedy probe on an empty prefix cache (so that it is computed, not read from cached pages)."""
    if not await reset_prefix_cache(client):
        raise RuntimeError("the prefix cache could not be reset before the probe: some KV block is still held")
    resp = await client.post("/v1/completions", json=completion_body(PROBE_PROMPT, cfg.probe_tokens))
    resp.raise_for_status()
    return resp.json()["choices"][0]["text"]


# ---- the soak ------------------------------------------------------------------------------------------------------

async def _metrics(client: httpx.AsyncClient) -> dict[str, Any]:
    resp = await client.get("/metrics")
    resp.raise_for_status()
    return parse_metrics(resp.text)


async def _sampler(client: httpx.AsyncClient, server: Server, cfg: SoakConfig, outcomes: list[str],
                   samples: list[Sample], t0: float) -> None:
    while server.proc.poll() is None:
        with contextlib.suppress(httpx.HTTPError, psutil.Error):
            m = await _metrics(client)
            samples.append(Sample(time.monotonic() - t0, tree_rss_mib(server.proc.pid), m["kv_cache_usage_perc"],
                                  m["num_requests_running"], m["num_requests_waiting"], len(outcomes)))
        await asyncio.sleep(cfg.sample_interval_s)


async def _load(client: httpx.AsyncClient, specs: list[RequestSpec], cfg: SoakConfig, outcomes: list[str]) -> None:
    """``cfg.concurrency`` clients take the next spec until none is left or the time is up."""
    queue = iter(specs)
    deadline = time.monotonic() + cfg.duration_s
    bar = tqdm(total=len(specs), desc="soak requests", unit="req")

    async def client_loop() -> None:
        for spec in queue:
            if time.monotonic() > deadline:
                return
            outcomes.append(await run_request(client, spec))
            bar.update()
            bar.set_postfix(Counter(outcomes), refresh=False)

    await asyncio.gather(*(client_loop() for _ in range(cfg.concurrency)))
    bar.close()


async def _drain(client: httpx.AsyncClient, cfg: SoakConfig) -> dict[str, Any]:
    """Wait until no request runs or waits; the metrics then. A short request first makes the engine take one more
    step, so that the gauges include the aborts of the last disconnected clients."""
    deadline = time.monotonic() + cfg.drain_timeout_s
    while True:
        await client.post("/v1/completions", json=completion_body("Hello", 1))
        m = await _metrics(client)
        if (m["num_requests_running"] == 0 and m["num_requests_waiting"] == 0) or time.monotonic() > deadline:
            return m
        await asyncio.sleep(2)


async def soak(server: Server, cfg: SoakConfig, specs: list[RequestSpec]) -> dict[str, Any]:
    """Run the load against ``server`` and measure everything the pass criteria need."""
    timeout = httpx.Timeout(300.0, connect=10.0)
    limits = httpx.Limits(max_connections=cfg.concurrency + 4)
    outcomes: list[str] = []
    samples: list[Sample] = []
    async with httpx.AsyncClient(base_url=server.url, timeout=timeout, limits=limits) as client:
        probe_before = await probe(client, cfg)
        initial = await _metrics(client)
        rss_initial = tree_rss_mib(server.proc.pid)
        t0 = time.monotonic()
        sampler = asyncio.create_task(_sampler(client, server, cfg, outcomes, samples, t0))
        await _load(client, specs, cfg, outcomes)
        load_s = time.monotonic() - t0
        if server.proc.poll() is not None:
            raise RuntimeError(f"the server died during the soak (exit code {server.proc.returncode}), outcomes "
                               f"{dict(Counter(outcomes))}:\n{server.log.read_text()[-5000:]}")
        final = await _drain(client, cfg)
        await asyncio.sleep(2 * cfg.sample_interval_s)  # a few idle samples after the drain
        sampler.cancel()
        reset_ok = await reset_prefix_cache(client)
        probe_after = await probe(client, cfg) if reset_ok else None
        rss_final = tree_rss_mib(server.proc.pid)
    health = _healthy(server.url)
    return summarize(cfg, outcomes, samples, initial, final, rss_initial, rss_final, load_s,
                     alive=server.proc.poll() is None and health, reset_ok=reset_ok,
                     probe_identical=probe_before == probe_after, evictions=server.log.read_text().count(EVICTION_LOG))


def summarize(cfg: SoakConfig, outcomes: list[str], samples: list[Sample], initial: dict, final: dict,
              rss_initial: float, rss_final: float, load_s: float, alive: bool, reset_ok: bool,
              probe_identical: bool, evictions: int) -> dict[str, Any]:
    counts = Counter(outcomes)
    errors = {k: v for k, v in counts.items() if k not in ("completed", "disconnected", "cancelled")}
    usable = final["num_gpu_blocks"] - 1  # vLLM's usage excludes the null block
    leaked = round((final["kv_cache_usage_perc"] - initial["kv_cache_usage_perc"]) * usable)
    warm = next((s for s in samples if s.finished >= cfg.warmup_fraction * len(outcomes)), None)
    rss_warm = warm.rss_mib if warm else rss_initial
    rss_peak = max([rss_initial, rss_final, *(s.rss_mib for s in samples)])
    result = {
        "requests_sent": len(outcomes),
        "completed": counts["completed"],
        "disconnected": counts["disconnected"],
        "cancelled": counts["cancelled"],
        "errors": errors,
        "http_5xx": sum(v for k, v in errors.items() if k.startswith(("http_5", "stream_error_5"))),
        "preemptions": int(final["num_preemptions_total"] - initial["num_preemptions_total"]),
        "evictions_logged": evictions,
        "blocks_leaked": leaked,
        "num_gpu_blocks": final["num_gpu_blocks"],
        "kv_usage_initial": initial["kv_cache_usage_perc"],
        "kv_usage_final": final["kv_cache_usage_perc"],
        "kv_usage_peak": max((s.kv_usage for s in samples), default=0.0),
        "prefix_cache_reset_ok": reset_ok,
        "server_alive": alive,
        "probe_identical": probe_identical,
        "rss_initial_mib": rss_initial,
        "rss_after_warmup_mib": rss_warm,
        "rss_final_mib": rss_final,
        "rss_peak_mib": rss_peak,
        "rss_growth_after_warmup_mib": rss_final - rss_warm,
        "load_seconds": load_s,
        "config": dataclasses.asdict(cfg),
        "samples": [s._asdict() for s in samples],
    }
    result["checks"] = pass_checks(result, cfg)
    result["passed"] = all(result["checks"].values())
    return result


def pass_checks(r: dict[str, Any], cfg: SoakConfig) -> dict[str, bool]:
    return {
        "no server crash": r["server_alive"],
        "no 5xx": r["http_5xx"] == 0,
        "no errors (every non-aborted request completed)": not r["errors"],
        "no leaked blocks": r["blocks_leaked"] == 0 and r["prefix_cache_reset_ok"],
        "probe identical before/after": r["probe_identical"],
        f"RSS growth after warm-up <= {cfg.rss_growth_bound_mib:g} MiB": (
            r["rss_growth_after_warmup_mib"] <= cfg.rss_growth_bound_mib
        ),
    }


def run_soak(model: str, cfg: SoakConfig, log: Path) -> dict[str, Any]:
    """Start the server, soak it, stop it."""
    from transformers import AutoTokenizer

    from benchmarks.corpus import load_corpus_text

    tokenizer = AutoTokenizer.from_pretrained(model)
    text = load_corpus_text()
    offset = random.Random(cfg.seed).randrange(len(text) // 2)  # 400K characters: enough distinct excerpts
    corpus_ids = tokenizer.encode(text[offset : offset + 400_000], add_special_tokens=False)
    specs = make_specs(cfg, corpus_ids)
    with launch_server(model, server_args(cfg), log, server_env(cfg)) as server:
        return asyncio.run(soak(server, cfg, specs))


# ---- report --------------------------------------------------------------------------------------------------------

def markdown(r: dict[str, Any], command: str) -> str:
    errors = ", ".join(f"{k}: {v}" for k, v in sorted(r["errors"].items())) or "none"
    rows = [
        ("requests sent", r["requests_sent"]),
        ("completed (full length, `[DONE]`)", r["completed"]),
        ("aborted: client disconnected mid-stream", r["disconnected"]),
        ("aborted: client cancelled (deadline)", r["cancelled"]),
        ("errors by kind", errors),
        ("HTTP 5xx", r["http_5xx"]),
        ("preemptions (`vllm:num_preemptions`)", r["preemptions"]),
        ("requests with eviction (connector log)", r["evictions_logged"]),
        ("blocks leaked after drain", f"{r['blocks_leaked']} of {r['num_gpu_blocks']}"
                                      f" (prefix-cache reset {'ok' if r['prefix_cache_reset_ok'] else 'REFUSED'})"),
        ("peak KV usage", f"{100 * r['kv_usage_peak']:.0f}%"),
        ("server crashes", 0 if r["server_alive"] else 1),
        ("greedy probe before == after", "yes" if r["probe_identical"] else "NO"),
        ("peak RSS (server process tree)", f"{r['rss_peak_mib']:.0f} MiB"),
        ("RSS growth after warm-up", f"{r['rss_growth_after_warmup_mib']:+.0f} MiB "
                                     f"(bound {r['config']['rss_growth_bound_mib']:g} MiB)"),
        ("load duration", f"{r['load_seconds']:.0f} s"),
    ]
    lines = ["| soak | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
    checks = "\n".join(f"- {'met' if ok else 'MISSED'}: {name}" for name, ok in r["checks"].items())
    return f"```bash\n{command}\n```\n\n" + "\n".join(lines) + f"\n\nPass criteria:\n{checks}\n"


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t"] for s in r["samples"]]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(t, [s["rss_mib"] for s in r["samples"]], color="tab:blue")
    ax.set_xlabel("time since load start (s)")
    ax.set_ylabel("RSS of server process tree (MiB)", color="tab:blue")
    kv = ax.twinx()
    kv.plot(t, [100 * s["kv_usage"] for s in r["samples"]], color="tab:orange", alpha=0.7)
    kv.set_ylabel("KV cache usage (%)", color="tab:orange")
    kv.set_ylim(0, 105)
    ax.set_title(f"soak: {r['requests_sent']} requests, {r['preemptions']} preemptions")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    base = SoakConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--requests", type=int, default=base.requests)
    p.add_argument("--duration", type=float, default=base.duration_s, help="seconds of load at most")
    p.add_argument("--concurrency", type=int, default=base.concurrency)
    p.add_argument("--num-blocks", type=int, default=base.num_blocks, help="KV blocks (of --block-size tokens)")
    p.add_argument("--eviction", default=base.eviction, help="server default eviction rate or preset")
    p.add_argument("--seed", type=int, default=base.seed)
    p.add_argument("--server-log", type=Path, help="where the server's output goes (default: a temporary file)")
    args = p.parse_args(argv)
    cfg = dataclasses.replace(base, requests=args.requests, duration_s=args.duration, concurrency=args.concurrency,
                              num_blocks=args.num_blocks, eviction=args.eviction, seed=args.seed)
    from nexusquant_vllm.model_store import smollm2_path

    model = args.model or str(smollm2_path())
    log = args.server_log or Path(tempfile.mkdtemp(prefix="nexusquant_soak_")) / "server.log"
    print(f"server log: {log}")
    result = run_soak(model, cfg, log)
    command = "python -m benchmarks.soak " + " ".join(argv if argv is not None else sys.argv[1:])
    table = markdown(result, command.strip())
    write_results("soak", {**result, "command": command.strip()}, table)
    plot(result, RESULTS_DIR / "soak.png")
    print(table)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
