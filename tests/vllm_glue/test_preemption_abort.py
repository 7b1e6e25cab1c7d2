"""Preemption (tiny KV pool) and aborts return every block: the free-block count ends where it started."""

import json
import os
import subprocess
import sys
from pathlib import Path

PROBE = Path(__file__).with_name("scheduler_probe.py")


def test_preemption_and_abort_free_all_blocks(model_path):
    proc = subprocess.run(
        [sys.executable, str(PROBE), model_path, "e8-k3v2"],
        capture_output=True, text=True, timeout=600, env=dict(os.environ),
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE_RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    r = json.loads(lines[-1].split(" ", 1)[1])
    print("\n" + json.dumps(r, indent=1))
    assert r["num_preemptions"] > 0, "the tiny pool should have forced preemption"
    assert r["lengths"] == [r["expected_length"]] * len(r["lengths"])
    assert r["free_after_preempt"] == r["free_start"]
    assert r["free_mid_abort"] < r["free_start"]
    assert r["free_after_abort"] == r["free_start"]
    assert r["finished_after_abort"] == ["abort-2", "abort-3"]
