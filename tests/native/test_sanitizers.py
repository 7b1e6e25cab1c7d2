"""The native tests once more against AddressSanitizer + UndefinedBehaviorSanitizer builds of the two libraries.

A copy of the package in a temporary folder gets sanitized builds of ``csrc/`` (same sources and flags as setup.py,
plus the sanitizers, at -O1); ``tests/native`` then runs in a subprocess that imports that copy, with libasan
preloaded into the (uninstrumented) Python. Any out-of-bounds access or undefined behaviour aborts the run.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LIBRARIES = (("_e8_quantize_cpu", "off"), ("_e8_decode_attention_cpu", "fast"))  # name, -ffp-contract (setup.py)
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer", "-g", "-O1"]


def _libasan() -> str | None:
    if shutil.which("g++") is None:
        return None
    path = subprocess.run(["g++", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


@pytest.mark.skipif(_libasan() is None, reason="no g++ with libasan")
@pytest.mark.skipif("libasan" in os.environ.get("LD_PRELOAD", ""), reason="already the sanitized run")
def test_native_tests_pass_under_asan_and_ubsan(tmp_path):
    package = tmp_path / "nexusquant_vllm"
    shutil.copytree(REPO / "nexusquant_vllm", package, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    suffix = subprocess.run([sys.executable, "-c", "import importlib.machinery as m; print(m.EXTENSION_SUFFIXES[0])"],
                            capture_output=True, text=True, check=True).stdout.strip()
    for name, contract in LIBRARIES:
        subprocess.run(["g++", "-std=c++17", "-Wno-psabi", "-fopenmp", f"-ffp-contract={contract}", *SANITIZE,
                        "-shared", "-fPIC", f"-I{REPO / 'csrc'}", str(REPO / "csrc" / f"{name.lstrip('_')}.cpp"),
                        "-o", str(package / "native" / f"{name}{suffix}")], check=True, timeout=600)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "LD_PRELOAD": _libasan(),
           "ASAN_OPTIONS": "detect_leaks=0:alloc_dealloc_mismatch=0", "UBSAN_OPTIONS": "print_stacktrace=1"}
    where = subprocess.run([sys.executable, "-c", "import nexusquant_vllm.native as n; print(n.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(package)), where  # the sanitized copy, not the installed package
    tests = sorted(str(p) for p in Path(__file__).parent.glob("test_*.py") if p.name != Path(__file__).name)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert " passed" in run.stdout, run.stdout[-2000:]
