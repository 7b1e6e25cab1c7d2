"""The GPU benchmark script parses its arguments, refuses to run without CUDA, and its dry run works on the CPU,
through the prepared device run (``benchmarks/gpu_check.sh --dry-run``); the static roofline needs no GPU."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from benchmarks import kernels_gpu


def test_parse_args_defaults():
    args = kernels_gpu.parse_args([])
    assert args.batch == [1, 8, 32] and args.context[0] == 1024 and args.context[-1] == 128 * 1024
    assert args.dtypes == ["e8-k3v2", "e8-k2v2"] and not args.dry_run


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA exit")
def test_exits_cleanly_without_cuda(capsys):
    assert kernels_gpu.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_gpu_check_dry_run(device, tmp_path):
    """The device script's steps on the CPU: kernel tests, the benchmark's tiny case, the roofline, all in $OUT."""
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "OUT": str(tmp_path)}, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "kernels_gpu_dryrun.json").read_text())
    assert {r["kernel"] for r in result["decode"]} == {"e8-k3v2", "bf16-paged", "bf16-sdpa-contiguous"}
    assert max(result["max_rel_error_vs_reference"].values()) < 1e-2
    assert result["prefill"]["rows"] and max(r["max_rel_diff"] for r in result["prefill"]["rows"]) < 2e-2
    assert (tmp_path / "kernels_gpu_dryrun.png").exists() and (tmp_path / "kernel_tests.xml").exists()
    assert (tmp_path / "kernels_gpu_roofline.json").exists()


def test_roofline_reads_fewer_bytes_for_e8(tmp_path):
    assert kernels_gpu.main(["--model-only", "--batch", "8", "--context", "32768", "--out", str(tmp_path)]) == 0
    rows = {r["kernel"]: r for r in json.loads((tmp_path / "kernels_gpu_roofline.json").read_text())["rows"]}
    bf16, e8 = rows["bf16-paged"], rows["e8-k3v2"]
    assert bf16["bytes"] / e8["bytes"] > 5  # 16 bits per element against 2.625 (codes and scales)
    assert e8["ideal_ms_H100"] < bf16["ideal_ms_H100"] and e8["ideal_ms_H200"] <= e8["ideal_ms_H100"]
