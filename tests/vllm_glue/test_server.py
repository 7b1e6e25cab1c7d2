"""The OpenAI-compatible server, started through ``nexusquant-vllm serve`` with an e8 dtype, answers completions and
chat completions, streaming and not."""

from __future__ import annotations

import json

import pytest
import requests


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    from benchmarks.soak import launch_server

    log = tmp_path_factory.mktemp("server") / "server.log"
    args = ["--kv-cache-dtype", "e8-k3v2", "--max-model-len", "1024", "--enforce-eager"]
    with launch_server(model_path, args, log, {"VLLM_CPU_KVCACHE_SPACE": "1"}) as srv:
        yield srv.url, log


def _sse_text(resp, field) -> str:
    text = []
    for line in resp.iter_lines():
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        choice = json.loads(line[6:])["choices"]
        if choice:
            text.append(field(choice[0]) or "")
    return "".join(text)


def test_completions(server):
    url, log = server
    body = {"model": "smol", "prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}
    r = requests.post(f"{url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    text = r.json()["choices"][0]["text"]
    print(f"\n/v1/completions: {text!r}")
    assert "Paris" in text
    assert "nexusquant: kv_cache_dtype=e8-k3v2" in log.read_text()

    r = requests.post(f"{url}/v1/completions", json={**body, "stream": True}, stream=True, timeout=120)
    assert r.status_code == 200
    streamed = _sse_text(r, lambda c: c.get("text"))
    print(f"/v1/completions stream: {streamed!r}")
    assert streamed == text


def test_chat_completions(server):
    url, _ = server
    body = {"model": "smol", "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 24, "temperature": 0}
    r = requests.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    text = r.json()["choices"][0]["message"]["content"]
    print(f"\n/v1/chat/completions: {text!r}")
    assert "Paris" in text

    r = requests.post(f"{url}/v1/chat/completions", json={**body, "stream": True}, stream=True, timeout=120)
    assert r.status_code == 200
    streamed = _sse_text(r, lambda c: c.get("delta", {}).get("content"))
    print(f"/v1/chat/completions stream: {streamed!r}")
    assert streamed == text
