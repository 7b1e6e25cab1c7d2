"""The compile gate (``benchmarks/compile_gate.py``): every launch the Triton wrappers make, compiled for sm_80 and
sm_90 without a GPU; no compile error, no register spill, shared memory and registers within both targets. It runs
in a subprocess, since this folder's kernels are interpreted (``TRITON_INTERPRET=1``) and the gate compiles them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_launch_compiles_for_sm80_and_sm90_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.compile_gate", "--out", str(tmp_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=1800)
    table = (tmp_path / "compile_gate.md").read_text() if (tmp_path / "compile_gate.md").exists() else ""
    print(table)
    assert proc.returncode == 0, f"{table}\n{proc.stderr[-3000:]}"
    rows = json.loads((tmp_path / "compile_gate.json").read_text())["rows"]
    kernels = {r["kernel"] for r in rows}
    assert {"_store_kernel", "_split_kernel", "_combine_kernel", "_prefill_kernel", "_scatter_rows_kernel"} <= kernels
    assert {r["target"] for r in rows} == {80, 90}
