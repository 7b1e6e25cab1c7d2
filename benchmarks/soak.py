"""Soak: a real OpenAI server on loopback (``nexusquant-vllm serve``, SmolLM2-135M, ``e8-k3v2``, eviction on) under
many concurrent clients, a KV pool small enough to force preemption, and clients that go away.

Load: ``--concurrency`` clients keep requests in flight until ``--requests`` were sent or ``--duration`` seconds
passed. Requests are reproducible from ``--seed``; each is one of

* a streamed **completion** of a random corpus excerpt (token ids, ``SoakConfig.prompt_tokens``, a third of them
  behind a shared prefix so that prefix caching is exercised) or a streamed **chat** completion of an excerpt (its
  text as the user's message), with a random output length (``ignore_eos``), a random per-request ``nq_eviction``
  (none, a preset or a number), sometimes ``nq_eviction_protect`` ranges and ``nq_eviction_at``; the client reads
  the stream to the end, disconnects after a random number of chunks, or cancels at a random moment (vLLM aborts a
  request whose client went away, so both are aborts);
* an **invalid** request (bad ``nq_*`` values, too many protected ranges, a prompt over ``max_model_len``, a
  negative ``max_tokens``), which must get HTTP 400;
* a **checked** request: one of ``SoakConfig.checked_prompts`` fixed greedy prompts behind the shared prefix, whose
  tokens are compared with a reference run of the same prompt alone on an empty prefix cache before the load.
  Under load the prompt may be prefilled in other chunks or hit the prefix cache, and an e8 cache then reads
  quantized pages where the reference attended over exact K/V, so a token may flip where the reference's top two
  were close. An output that differs is first *reproduced* after the load, alone: the prompt's first ``p`` tokens
  are cached (for each block boundary ``p``, the shared prefix and the whole-prompt hit first), then the prompt is
  run again; an output equal token for token to the one under load is what the engine computes for that prompt on
  that schedule, not a page read from the wrong place. Each (prompt, cached prefix) run happens once, however many
  outputs it is compared with, so this costs at most two requests per checked prompt and block boundary. An output
  no such schedule reproduces (a preempted request, recomputed with its first output tokens in one chunk, is not
  replayed) is a *near tie* when it passes vLLM's own criterion for outputs of two numerically different runs
  (``check_logprobs_close`` in vLLM's tests): at the first differing position each run's token is among the other's
  ``SoakConfig.top_logprobs`` most likely. Else it is *wrong*: a page read from the wrong place (a freed, compacted
  or reused block) shows up as that. Every unreproduced output is also re-scored alone on an empty prefix cache
  (the prompt and the output up to its first differing token, with ``prompt_logprobs``), and the largest gap
  between the reference token's logprob and its own is reported.

Pass criteria (each checked and reported): the server process never exits and ``/health`` answers 200 at the end;
zero 5xx and zero other errors; every request that was not aborted ends with ``[DONE]``, ``finish_reason=length``
and exactly ``max_tokens`` tokens; every invalid request gets a 400; no checked output is wrong; after the load
drains no KV block is held (``vllm:kv_cache_usage_perc`` back to its initial value, and ``/reset_prefix_cache``
succeeds, which vLLM refuses while any block is still referenced; vLLM's v1 pool counts prefix-cached blocks of
finished requests as free, so a cached block is not a leak) and the connector keeps no per-request entry
(``vllm:nq_eviction_tracked_requests`` and ``vllm:nq_eviction_pending_compactions`` back to 0); the greedy output
of a fixed probe, run alone with an empty prefix cache, is identical before and after; the RSS of the server's
process tree grows by less than ``SoakConfig.rss_slope_bound_mib`` per finished request after the warm-up (the
first quarter of the requests), the slope of a least-squares line through the samples.

Reported: requests by outcome, preemptions (``vllm:num_preemptions``), evictions (the connector's log lines), errors
by kind, blocks leaked, RSS per process over time, the connector's per-request entries over time, peak KV usage;
JSON, a markdown table and a plot of RSS, KV usage and connector entries over time in ``benchmarks/results/soak.*``.

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
INVALID_REQUESTS = (  # what each invalid request changes in a valid body; every one must get a 400
    {"vllm_xargs": {"nq_eviction": "half"}},
    {"vllm_xargs": {"nq_eviction": 1.5}},
    {"vllm_xargs": {"nq_eviction_protect": [0, 1] * 2000}},
    {"vllm_xargs": {"nq_eviction_protect": [64, 8]}},
    {"vllm_xargs": {"nq_eviction_at": 0}},
    {"vllm_xargs": {"nq_typo": 1}},
    {"max_tokens": -1},
    {"prompt": "too long"},  # replaced by a prompt of max_model_len + 1 tokens
)


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
    chat_prob: float = 0.2
    invalid_prob: float = 0.05
    checked_prob: float = 0.1
    protect_prob: float = 0.3  # of the valid requests with a prompt over min_prompt_tokens
    eviction_at_prob: float = 0.2
    checked_prompts: int = 8
    checked_suffix_tokens: tuple[int, int] = (48, 128)
    checked_tokens: int = 24
    top_logprobs: int = 5  # vLLM's check_logprobs_close default
    # server
    kv_cache_dtype: str = "e8-k3v2"
    eviction: str = "conservative"
    min_prompt_tokens: int = 96
    block_size: int = 16
    num_blocks: int = 48  # 752 tokens: vLLM admits a request whose prompt fits; decode growth then preempts
    max_num_seqs: int = 8
    max_model_len: int = 752  # at most (num_blocks - 1) * block_size: block 0 is vLLM's null block
    kv_space_gib: str = "1"
    chat_template_tokens: int = 64  # room left for the chat template around a chat request's message
    # checks
    probe_tokens: int = 24
    warmup_fraction: float = 0.25
    rss_slope_bound_mib: float = 0.1  # per finished request, after the warm-up
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

GAUGES = {"vllm:kv_cache_usage_perc": "kv_usage", "vllm:num_requests_running": "running",
          "vllm:num_requests_waiting": "waiting", "vllm:num_preemptions_total": "preemptions",
          "vllm:nq_eviction_tracked_requests": "tracked_requests",
          "vllm:nq_eviction_pending_compactions": "pending_compactions"}


def parse_metrics(text: str) -> dict[str, Any]:
    """The vLLM gauges and counters the soak reads from ``/metrics`` (one engine); the connector's gauges are 0
    until it first reports them."""
    values: dict[str, Any] = {"tracked_requests": 0.0, "pending_compactions": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "vllm:cache_config_info":
                values["num_gpu_blocks"] = int(sample.labels["num_gpu_blocks"])
            elif sample.name in GAUGES:
                values[GAUGES[sample.name]] = sample.value
    return values


def process_rss_mib(pid: int) -> dict[str, float]:
    """Resident memory of a process and each of its descendants (API server, engine core with its worker, ...),
    keyed ``name[pid]``."""
    rss = {}
    proc = psutil.Process(pid)
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            rss[f"{p.name()}[{p.pid}]"] = p.memory_info().rss / 2**20
    return rss


class Sample(NamedTuple):
    t: float
    rss_mib: float  # the whole tree
    rss_by_process: dict[str, float]
    kv_usage: float
    running: float
    waiting: float
    tracked_requests: float
    pending_compactions: float
    finished: int


# ---- requests ------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RequestSpec:
    kind: str  # "completion", "chat", "invalid" or "checked"
    prompt: list[int] | str  # token ids; the user message of a chat request
    max_tokens: int
    xargs: dict[str, Any]  # vllm_xargs
    behaviour: str = "complete"  # or "disconnect" (after `stop_after` chunks), "cancel" (after `stop_after` s)
    stop_after: float = 0.0
    invalid: int = -1  # index into INVALID_REQUESTS
    checked: int = -1  # index into the checked prompts


def checked_prompts(cfg: SoakConfig, corpus_ids: list[int], shared: list[int]) -> list[list[int]]:
    """The fixed greedy prompts whose outputs are checked: the shared prefix, then an excerpt of their own."""
    rng = random.Random(cfg.seed + 1)
    prompts = []
    for _ in range(cfg.checked_prompts):
        n = rng.randint(*cfg.checked_suffix_tokens)
        start = rng.randrange(len(corpus_ids) - n)
        prompts.append(shared + corpus_ids[start : start + n])
    return prompts


def make_specs(cfg: SoakConfig, corpus_ids: list[int], shared: list[int], decode) -> list[RequestSpec]:
    """``cfg.requests`` random requests (reproducible from ``cfg.seed``); ``decode`` turns token ids into the text
    of a chat message."""
    rng = random.Random(cfg.seed)
    specs = []
    for _ in range(cfg.requests):
        u = rng.random()
        if u < cfg.invalid_prob:
            specs.append(RequestSpec("invalid", [42] * 8, 4, {}, invalid=rng.randrange(len(INVALID_REQUESTS))))
            continue
        if u < cfg.invalid_prob + cfg.checked_prob:
            specs.append(RequestSpec("checked", [], cfg.checked_tokens, {"nq_eviction": 0.0},
                                     checked=rng.randrange(cfg.checked_prompts)))
            continue
        chat = u < cfg.invalid_prob + cfg.checked_prob + cfg.chat_prob
        max_tokens = rng.randint(*cfg.output_tokens)
        room = cfg.max_model_len - max_tokens - (cfg.chat_template_tokens if chat else 0)
        n = min(rng.randint(*cfg.prompt_tokens), room)
        start = rng.randrange(len(corpus_ids) - n)
        prompt = corpus_ids[start : start + n]
        if not chat and rng.random() < 1 / 3 and n > cfg.shared_prefix_tokens:
            prompt = shared + prompt[cfg.shared_prefix_tokens :]
        behaviour, stop_after = _behaviour(cfg, rng, max_tokens)
        specs.append(RequestSpec("chat" if chat else "completion", decode(prompt) if chat else prompt, max_tokens,
                                 _xargs(cfg, rng, n), behaviour, stop_after))
    return specs


def _behaviour(cfg: SoakConfig, rng: random.Random, max_tokens: int) -> tuple[str, float]:
    u = rng.random()
    if u < cfg.disconnect_prob:
        return "disconnect", rng.randint(1, max(1, max_tokens - 1))
    if u < cfg.disconnect_prob + cfg.cancel_prob:
        return "cancel", rng.uniform(*cfg.cancel_after_s)
    return "complete", 0.0


def _xargs(cfg: SoakConfig, rng: random.Random, n: int) -> dict[str, Any]:
    """A random per-request eviction: a rate or preset, and on long enough prompts protected ranges and an
    eviction point (of a chat request: within its message's tokens, so always inside the prompt)."""
    xargs: dict[str, Any] = {}
    if (rate := rng.choice(RATES)) is not None:
        xargs["nq_eviction"] = rate
    if n > cfg.min_prompt_tokens:
        if rng.random() < cfg.protect_prob:
            starts = sorted(rng.sample(range(n), rng.randint(1, 4)))
            # flat [s0, e0, s1, e1, ...]: vLLM's HTTP schema takes lists of numbers, not nested lists
            xargs["nq_eviction_protect"] = [x for s in starts for x in (s, min(n, s + rng.randint(1, 48)))]
        if rng.random() < cfg.eviction_at_prob:
            xargs["nq_eviction_at"] = rng.randint(cfg.min_prompt_tokens, n)
    return xargs


def completion_body(prompt: str | list[int], max_tokens: int, xargs: dict[str, Any] | None = None,
                    stream: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                            "ignore_eos": True}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    if xargs:
        body["vllm_xargs"] = xargs
    return body


def chat_body(message: str, max_tokens: int, xargs: dict[str, Any]) -> dict[str, Any]:
    body = completion_body(message, max_tokens, xargs, stream=True)
    body["messages"] = [{"role": "user", "content": body.pop("prompt")}]
    return body


def invalid_body(spec: RequestSpec, cfg: SoakConfig) -> dict[str, Any]:
    body = {**completion_body(spec.prompt, spec.max_tokens), **INVALID_REQUESTS[spec.invalid]}
    if body["prompt"] == "too long":
        body["prompt"] = [42] * (cfg.max_model_len + 1)
    return body


class Checked(NamedTuple):
    """A checked prompt's reference: its greedy token ids, their logprobs and the most likely ids at each position."""

    prompt: list[int]
    tokens: list[int]
    logprobs: list[float]
    top: list[frozenset[int]]


class Divergence(NamedTuple):
    """A checked output that differs from its reference, from ``position`` on (``got``: its token there)."""

    checked: int
    position: int
    got: int
    tokens: tuple[int, ...]  # the whole output under load
    top: frozenset[int]  # its most likely ids at ``position`` (empty when the output stopped before it)


def checked_body(prompt: list[int], max_tokens: int, cfg: SoakConfig) -> dict[str, Any]:
    return {**completion_body(prompt, max_tokens, {"nq_eviction": 0.0}), "logprobs": cfg.top_logprobs,
            "return_tokens_as_token_ids": True}


def _token_id(token: str) -> int:
    return int(token.removeprefix("token_id:"))  # the form of ids with ``return_tokens_as_token_ids``


def token_ids(logprobs: dict[str, Any]) -> list[int]:
    """The ids of a completion's ``logprobs.tokens``."""
    return [_token_id(t) for t in logprobs["tokens"]]


def top_ids(logprobs: dict[str, Any]) -> list[frozenset[int]]:
    """Per position, the ids of a completion's ``logprobs.top_logprobs``."""
    return [frozenset(_token_id(t) for t in top) for top in logprobs["top_logprobs"]]


def first_difference(ref: Checked, tokens: list[int]) -> int | None:
    """The first position where ``tokens`` leaves the reference (its length if it is a proper prefix), or None."""
    for i, (want, got) in enumerate(zip(ref.tokens, tokens)):
        if want != got:
            return i
    return None if len(tokens) == len(ref.tokens) else min(len(tokens), len(ref.tokens))


async def run_request(client: httpx.AsyncClient, spec: RequestSpec, cfg: SoakConfig,
                      references: list[Checked], divergences: list[Divergence]) -> str:
    """Send one request and behave as ``spec`` says; the outcome: ``completed``, ``disconnected``, ``cancelled``,
    ``rejected`` (an invalid request's 400), ``checked_identical``, ``checked_diverged`` (judged after the load,
    into ``divergences``) or an error kind (``http_<status>``, ``stream_error_<code>``, ``incomplete_stream``,
    ``wrong_length``, ``accepted_invalid``, the name of an httpx exception)."""
    if spec.kind == "invalid":
        return await _invalid(client, spec, cfg)
    if spec.kind == "checked":
        return await _checked(client, spec.checked, references[spec.checked], cfg, divergences)
    request = _stream(client, spec)
    if spec.behaviour != "cancel":
        return await request
    try:
        return await asyncio.wait_for(request, spec.stop_after)
    except TimeoutError:
        return "cancelled"


async def _invalid(client: httpx.AsyncClient, spec: RequestSpec, cfg: SoakConfig) -> str:
    try:
        resp = await client.post("/v1/completions", json=invalid_body(spec, cfg))
    except httpx.HTTPError as e:
        return type(e).__name__
    if resp.status_code == 400:
        return "rejected"
    return "accepted_invalid" if resp.status_code == 200 else f"http_{resp.status_code}"


async def _checked(client: httpx.AsyncClient, index: int, ref: Checked, cfg: SoakConfig,
                   divergences: list[Divergence]) -> str:
    try:
        resp = await client.post("/v1/completions", json=checked_body(ref.prompt, len(ref.tokens), cfg))
    except httpx.HTTPError as e:
        return type(e).__name__
    if resp.status_code != 200:
        tqdm.write(f"checked request: HTTP {resp.status_code}: {resp.text[:300]!r}")
        return f"http_{resp.status_code}"
    logprobs = resp.json()["choices"][0]["logprobs"]
    tokens = token_ids(logprobs)
    at = first_difference(ref, tokens)
    if at is None:
        return "checked_identical"
    diverged = at < len(tokens)
    divergences.append(Divergence(index, at, tokens[at] if diverged else -1, tuple(tokens),
                                  top_ids(logprobs)[at] if diverged else frozenset()))
    return "checked_diverged"


def cached_prefixes(prompt_len: int, cfg: SoakConfig) -> list[int]:
    """Prefix lengths a checked prompt may find cached under load, most likely first: the shared prefix, the whole
    prompt's full blocks (an earlier run of the same prompt; vLLM computes at least its last token), then every
    other block boundary (where a chunked prefill may have split it)."""
    whole = (prompt_len - 1) // cfg.block_size * cfg.block_size
    boundaries = range(whole, 0, -cfg.block_size)
    return list(dict.fromkeys([cfg.shared_prefix_tokens, whole, *boundaries]))


async def run_behind_prefix(client: httpx.AsyncClient, cfg: SoakConfig, ref: Checked, p: int) -> tuple[int, ...]:
    """The checked prompt's output, alone, when its first ``p`` tokens were cached by a one-token request."""
    await _reset_or_raise(client, "a reproduction")
    warm = await client.post("/v1/completions", json=completion_body(ref.prompt[:p], 1, {"nq_eviction": 0.0}))
    warm.raise_for_status()
    resp = await client.post("/v1/completions", json=checked_body(ref.prompt, len(ref.tokens), cfg))
    resp.raise_for_status()
    return tuple(token_ids(resp.json()["choices"][0]["logprobs"]))


async def reproduce(client: httpx.AsyncClient, cfg: SoakConfig, ref: Checked, d: Divergence,
                    runs: dict[tuple[int, int], tuple[int, ...]]) -> int | None:
    """The first prefix length of ``cached_prefixes`` whose schedule, alone, gives the diverged output token for
    token, else None. ``runs`` keeps each (checked prompt, prefix) output, so that no run happens twice."""
    for p in cached_prefixes(len(ref.prompt), cfg):
        if (d.checked, p) not in runs:
            runs[d.checked, p] = await run_behind_prefix(client, cfg, ref, p)
        if runs[d.checked, p] == d.tokens:
            return p
    return None


def logprobs_close(ref: Checked, d: Divergence) -> bool:
    """vLLM's ``check_logprobs_close``: at the first differing position, each run's token is among the other's most
    likely ones (an output that stopped early has no token there, so it fails)."""
    return d.got >= 0 and d.got in ref.top[d.position] and ref.tokens[d.position] in d.top


async def verdict(client: httpx.AsyncClient, cfg: SoakConfig, ref: Checked, d: Divergence,
                  runs: dict[tuple[int, int], tuple[int, ...]]) -> dict[str, Any]:
    """``checked_reproduced`` (with the cached prefix length), else ``checked_near_tie`` or ``checked_wrong`` by
    ``logprobs_close``, with the re-scored logprob gap."""
    cached = await reproduce(client, cfg, ref, d, runs)
    if cached is not None:
        return {"outcome": "checked_reproduced", "cached_prefix": cached, "logprob_gap": None}
    outcome = "checked_near_tie" if logprobs_close(ref, d) else "checked_wrong"
    return {"outcome": outcome, "cached_prefix": None, "logprob_gap": await rescore(client, ref, d)}


async def rescore(client: httpx.AsyncClient, ref: Checked, d: Divergence) -> float:
    """The reference token's logprob minus the diverging token's, both in the reference's context (the diverging
    one from the prompt and the output up to it, scored alone on an empty prefix cache); inf if it has none."""
    if d.got < 0:
        return float("inf")  # the output stopped early: no token to score
    await _reset_or_raise(client, "a re-score")
    prompt = ref.prompt + ref.tokens[: d.position] + [d.got]
    body = {**completion_body(prompt, 1, {"nq_eviction": 0.0}), "prompt_logprobs": 0}
    resp = await client.post("/v1/completions", json=body)
    resp.raise_for_status()
    scored = resp.json()["choices"][0]["prompt_logprobs"][-1][str(d.got)]["logprob"]
    return ref.logprobs[d.position] - scored


async def _stream(client: httpx.AsyncClient, spec: RequestSpec) -> str:
    chat = spec.kind == "chat"
    body = chat_body(spec.prompt, spec.max_tokens, spec.xargs) if chat else completion_body(
        spec.prompt, spec.max_tokens, spec.xargs, stream=True)
    chunks, finish, usage, done = 0, None, None, False
    try:
        async with client.stream("POST", "/v1/chat/completions" if chat else "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                tqdm.write(f"{spec.kind} request: HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
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


async def _reset_or_raise(client: httpx.AsyncClient, what: str) -> None:
    if not await reset_prefix_cache(client):
        raise RuntimeError(f"the prefix cache could not be reset before {what}: some KV block is still held")


async def probe(client: httpx.AsyncClient, cfg: SoakConfig) -> str:
    """The fixed greedy probe on an empty prefix cache (so that it is computed, not read from cached pages)."""
    await _reset_or_raise(client, "the probe")
    resp = await client.post("/v1/completions", json=completion_body(PROBE_PROMPT, cfg.probe_tokens))
    resp.raise_for_status()
    return resp.json()["choices"][0]["text"]


async def references(client: httpx.AsyncClient, cfg: SoakConfig, prompts: list[list[int]]) -> list[Checked]:
    """Each checked prompt alone on an empty prefix cache: its greedy tokens and their logprobs."""
    refs = []
    for prompt in prompts:
        await _reset_or_raise(client, "a reference")
        resp = await client.post("/v1/completions", json=checked_body(prompt, cfg.checked_tokens, cfg))
        resp.raise_for_status()
        logprobs = resp.json()["choices"][0]["logprobs"]
        refs.append(Checked(prompt, token_ids(logprobs), logprobs["token_logprobs"], top_ids(logprobs)))
    return refs


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
            rss = process_rss_mib(server.proc.pid)
            samples.append(Sample(time.monotonic() - t0, sum(rss.values()), rss, m["kv_usage"], m["running"],
                                  m["waiting"], m["tracked_requests"], m["pending_compactions"], len(outcomes)))
        await asyncio.sleep(cfg.sample_interval_s)


async def _load(client: httpx.AsyncClient, specs: list[RequestSpec], cfg: SoakConfig, refs: list[Checked],
                outcomes: list[str], divergences: list[Divergence]) -> None:
    """``cfg.concurrency`` clients take the next spec until none is left or the time is up."""
    queue = iter(specs)
    deadline = time.monotonic() + cfg.duration_s
    bar = tqdm(total=len(specs), desc="soak requests", unit="req")

    async def client_loop() -> None:
        for spec in queue:
            if time.monotonic() > deadline:
                return
            outcomes.append(await run_request(client, spec, cfg, refs, divergences))
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
        if (m["running"] == 0 and m["waiting"] == 0) or time.monotonic() > deadline:
            return m
        await asyncio.sleep(2)


async def soak(server: Server, cfg: SoakConfig, specs: list[RequestSpec],
               checked: list[list[int]]) -> dict[str, Any]:
    """Run the load against ``server`` and measure everything the pass criteria need."""
    timeout = httpx.Timeout(300.0, connect=10.0)
    limits = httpx.Limits(max_connections=cfg.concurrency + 4)
    outcomes: list[str] = []
    samples: list[Sample] = []
    divergences: list[Divergence] = []
    async with httpx.AsyncClient(base_url=server.url, timeout=timeout, limits=limits) as client:
        probe_before = await probe(client, cfg)
        refs = await references(client, cfg, checked)
        initial = await _metrics(client)
        t0 = time.monotonic()
        sampler = asyncio.create_task(_sampler(client, server, cfg, outcomes, samples, t0))
        await _load(client, specs, cfg, refs, outcomes, divergences)
        load_s = time.monotonic() - t0
        if server.proc.poll() is not None:
            raise RuntimeError(f"the server died during the soak (exit code {server.proc.returncode}), outcomes "
                               f"{dict(Counter(outcomes))}:\n{server.log.read_text()[-5000:]}")
        final = await _drain(client, cfg)
        await asyncio.sleep(2 * cfg.sample_interval_s)  # a few idle samples after the drain
        sampler.cancel()
        reset_ok = await reset_prefix_cache(client)
        probe_after = await probe(client, cfg) if reset_ok else None
        verdicts: dict[tuple, dict[str, Any]] = {}  # the same output of the same prompt is judged once
        runs: dict[tuple[int, int], tuple[int, ...]] = {}
        for d in tqdm(divergences if reset_ok else [], desc="judging diverged outputs", unit="output"):
            if (d.checked, d.tokens) not in verdicts:
                verdicts[d.checked, d.tokens] = await verdict(client, cfg, refs[d.checked], d, runs)
        diverged = [(d, verdicts[d.checked, d.tokens]) for d in divergences if (d.checked, d.tokens) in verdicts]
    health = _healthy(server.url)
    outcomes = [o for o in outcomes if o != "checked_diverged"] + [v["outcome"] for _, v in diverged]
    result = summarize(cfg, outcomes, samples, initial, final, load_s, alive=server.proc.poll() is None and health,
                       reset_ok=reset_ok, probe_identical=probe_before == probe_after,
                       evictions=server.log.read_text().count(EVICTION_LOG))
    result["divergences"] = [{**d._asdict(), "top": sorted(d.top), **v} for d, v in diverged]
    return result


def rss_slope(samples: list[Sample], after: int) -> dict[str, float]:
    """MiB per finished request of a least-squares line through the samples once ``after`` requests finished: of
    the whole tree (``total``) and of each process."""
    import numpy as np

    tail = [s for s in samples if s.finished >= after]
    if len({s.finished for s in tail}) < 2:
        return {"total": 0.0}
    x = np.array([s.finished for s in tail], dtype=np.float64)
    series = {"total": [s.rss_mib for s in tail]}
    for name in tail[-1].rss_by_process:
        if all(name in s.rss_by_process for s in tail):
            series[name] = [s.rss_by_process[name] for s in tail]
    return {name: float(np.polyfit(x, np.array(y), 1)[0]) for name, y in series.items()}


def summarize(cfg: SoakConfig, outcomes: list[str], samples: list[Sample], initial: dict, final: dict,
              load_s: float, alive: bool, reset_ok: bool, probe_identical: bool, evictions: int) -> dict[str, Any]:
    counts = Counter(outcomes)
    ok = ("completed", "disconnected", "cancelled", "rejected", "checked_identical", "checked_reproduced",
          "checked_near_tie")
    errors = {k: v for k, v in counts.items() if k not in ok}
    usable = final["num_gpu_blocks"] - 1  # vLLM's usage excludes the null block
    warm_after = int(cfg.warmup_fraction * len(outcomes))
    warm = next((s for s in samples if s.finished >= warm_after), None)
    result = {
        "requests_sent": len(outcomes),
        **{k: counts[k] for k in ok},
        "errors": errors,
        "http_5xx": sum(v for k, v in errors.items() if k.startswith(("http_5", "stream_error_5"))),
        "preemptions": int(final["preemptions"] - initial["preemptions"]),
        "evictions_logged": evictions,
        "blocks_leaked": round((final["kv_usage"] - initial["kv_usage"]) * usable),
        "connector_entries_final": {k: final[k] for k in ("tracked_requests", "pending_compactions")},
        "connector_entries_peak": max((s.tracked_requests for s in samples), default=0.0),
        "num_gpu_blocks": final["num_gpu_blocks"],
        "kv_usage_initial": initial["kv_usage"],
        "kv_usage_final": final["kv_usage"],
        "kv_usage_peak": max((s.kv_usage for s in samples), default=0.0),
        "prefix_cache_reset_ok": reset_ok,
        "server_alive": alive,
        "probe_identical": probe_identical,
        "rss_after_warmup_mib": warm.rss_mib if warm else None,
        "rss_final_mib": samples[-1].rss_mib if samples else None,
        "rss_peak_mib": max((s.rss_mib for s in samples), default=0.0),
        "rss_slope_mib_per_request": rss_slope(samples, warm_after),
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
        "no errors (every non-aborted request completed, every invalid one got a 400, no checked output wrong)":
            not r["errors"],
        "no leaked blocks": r["blocks_leaked"] == 0 and r["prefix_cache_reset_ok"],
        "no connector entry left": not any(r["connector_entries_final"].values()),
        "probe identical before/after": r["probe_identical"],
        f"RSS slope after warm-up < {cfg.rss_slope_bound_mib:g} MiB per request": (
            r["rss_slope_mib_per_request"]["total"] < cfg.rss_slope_bound_mib
        ),
    }


def run_soak(model: str, cfg: SoakConfig, log: Path) -> dict[str, Any]:
    """Start the server, soak it, stop it."""
    from transformers import AutoTokenizer

    from benchmarks.corpus import load_corpus_text

    tokenizer = AutoTokenizer.from_pretrained(model)
    text = load_corpus_text()
    rng = random.Random(cfg.seed)
    offset = rng.randrange(len(text) // 2)  # 400K characters: enough distinct excerpts
    corpus_ids = tokenizer.encode(text[offset : offset + 400_000], add_special_tokens=False)
    start = rng.randrange(len(corpus_ids) - cfg.shared_prefix_tokens)
    shared = corpus_ids[start : start + cfg.shared_prefix_tokens]
    specs = make_specs(cfg, corpus_ids, shared, tokenizer.decode)
    checked = checked_prompts(cfg, corpus_ids, shared)
    with launch_server(model, server_args(cfg), log, server_env(cfg)) as server:
        return asyncio.run(soak(server, cfg, specs, checked))


# ---- report --------------------------------------------------------------------------------------------------------

def markdown(r: dict[str, Any], command: str) -> str:
    errors = ", ".join(f"{k}: {v}" for k, v in sorted(r["errors"].items())) or "none"
    slope = r["rss_slope_mib_per_request"]
    per_process = ", ".join(f"{k} {v:+.3f}" for k, v in slope.items() if k != "total")
    rows = [
        ("requests sent", r["requests_sent"]),
        ("completed (full length, `[DONE]`)", r["completed"]),
        ("aborted: client disconnected mid-stream", r["disconnected"]),
        ("aborted: client cancelled (deadline)", r["cancelled"]),
        ("invalid requests refused with 400", r["rejected"]),
        ("checked greedy outputs: identical / reproduced with a cached prefix / near tie / wrong",
         f"{r['checked_identical']} / {r['checked_reproduced']} / {r['checked_near_tie']} / "
         f"{r['errors'].get('checked_wrong', 0)}"),
        ("cached prefix lengths that reproduced them", ", ".join(sorted({
            str(d["cached_prefix"]) for d in r.get("divergences", []) if d["cached_prefix"] is not None})) or "none"),
        (f"near tie: each token among the other's top {r['config']['top_logprobs']} (vLLM's check_logprobs_close); "
         "largest re-scored logprob gap of the unreproduced", f"{max(gaps):.3f} nats" if (gaps := [
             d["logprob_gap"] for d in r.get("divergences", []) if d["logprob_gap"] is not None]) else "none"),
        ("errors by kind", errors),
        ("HTTP 5xx", r["http_5xx"]),
        ("preemptions (`vllm:num_preemptions`)", r["preemptions"]),
        ("requests with eviction (connector log)", r["evictions_logged"]),
        ("blocks leaked after drain", f"{r['blocks_leaked']} of {r['num_gpu_blocks']}"
                                      f" (prefix-cache reset {'ok' if r['prefix_cache_reset_ok'] else 'REFUSED'})"),
        ("connector entries: peak / after drain",
         f"{r['connector_entries_peak']:.0f} / {sum(r['connector_entries_final'].values()):.0f}"),
        ("peak KV usage", f"{100 * r['kv_usage_peak']:.0f}%"),
        ("server crashes", 0 if r["server_alive"] else 1),
        ("greedy probe before == after", "yes" if r["probe_identical"] else "NO"),
        ("peak RSS (server process tree)", f"{r['rss_peak_mib']:.0f} MiB"),
        ("RSS slope after warm-up (MiB per request)", f"{slope['total']:+.3f} (per process: {per_process})"),
        ("load duration", f"{r['load_seconds']:.0f} s"),
    ]
    lines = ["| soak | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
    checks = "\n".join(f"- {'met' if ok else 'MISSED'}: {name}" for name, ok in r["checks"].items())
    return f"```bash\n{command}\n```\n\n" + "\n".join(lines) + f"\n\nPass criteria:\n{checks}\n"


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = r["samples"]
    t = [s["t"] / 60 for s in samples]
    fig, (ax, entries) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, height_ratios=(2, 1))
    ax.plot(t, [s["rss_mib"] for s in samples], color="black", label="whole tree")
    for name in samples[-1]["rss_by_process"] if samples else ():
        ax.plot(t, [s["rss_by_process"].get(name, float("nan")) for s in samples], label=name)
    ax.set_ylabel("RSS (MiB)")
    ax.legend(loc="center left", fontsize=7)
    kv = ax.twinx()
    kv.plot(t, [100 * s["kv_usage"] for s in samples], color="tab:orange", alpha=0.3)
    kv.set_ylabel("KV cache usage (%)", color="tab:orange")
    kv.set_ylim(0, 105)
    entries.plot(t, [s["tracked_requests"] for s in samples], label="scheduler request states")
    entries.plot(t, [s["pending_compactions"] for s in samples], label="worker compaction scores")
    entries.set_ylabel("connector entries")
    entries.set_xlabel("time since load start (min)")
    entries.legend(loc="upper right", fontsize=7)
    ax.set_title(f"soak: {r['requests_sent']} requests, {r['preemptions']} preemptions, "
                 f"RSS slope {r['rss_slope_mib_per_request']['total']:+.3f} MiB/request after warm-up")
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
    write_results("soak", {**result, "command": command.strip(), "commit": _commit()}, table)
    plot(result, RESULTS_DIR / "soak.png")
    print(table)
    return 0 if result["passed"] else 1


def _commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    return None


if __name__ == "__main__":
    sys.exit(main())
