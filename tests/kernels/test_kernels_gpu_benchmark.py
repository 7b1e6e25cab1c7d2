"""The GPU benchmark script parses its arguments, refuses to run without CUDA, and its dry run works on the CPU."""

import json
import tempfile
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


def test_dry_run(device):
    assert kernels_gpu.main(["--dry-run", "--dtypes", "e8-k2v2"]) == 0
    result = json.loads((Path(tempfile.gettempdir()) / "kernels_gpu_dryrun.json").read_text())
    assert {r["kernel"] for r in result["decode"]} == {"e8-k2v2", "bf16-paged", "bf16-sdpa-contiguous"}
    assert max(result["max_rel_error_vs_reference"].values()) < 1e-2
    assert result["prefill"]["rows"] and max(r["max_rel_diff"] for r in result["prefill"]["rows"]) < 2e-2
