"""Locating the native libraries that ``setup.py`` builds next to this file (plain C ABIs, loaded through ctypes)."""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
from pathlib import Path

import torch


@functools.lru_cache(maxsize=None)
def load(name: str, function: str, argtypes: tuple) -> ctypes._CFuncPtr | None:
    """``function`` (returning void) of the library ``name`` (e.g. ``_e8_quantize_cpu``), or None when it was not
    built."""
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"{name}{suffix}"
        if path.exists():
            fn = getattr(ctypes.CDLL(str(path)), function)
            fn.argtypes, fn.restype = list(argtypes), None
            return fn
    return None


def ptr(t: torch.Tensor) -> ctypes.c_void_p:
    """The data pointer of a contiguous CPU tensor, for a ``void*``-typed argument."""
    return ctypes.c_void_p(t.data_ptr())

