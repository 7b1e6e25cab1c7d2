"""The OpenAI-compatible server, started through ``nexusquant-vllm serve`` with an e8 dtype, answers completions and
chat completions, streaming and not."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests

STARTUP_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    cmd = [sys.executable, "-m", "nexusquant_vllm", "serve", model_path, "--kv-cache-dtype", "e8-k3v2",
           "--max-model-len", "1024", "--enforce-eager", "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", "smol"]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-5000:]}")
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.time() > deadline:
                pytest.fail(f"server not up after {STARTUP_TIMEOUT_S}s:\n{log.read_text()[-5000:]}")
            time.sleep(2)
        yield url, log
    finally:
        # The server and its engine/worker children share the session we started: stop exactly that group.
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


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
