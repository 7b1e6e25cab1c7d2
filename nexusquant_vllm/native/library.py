"""Locating the native libraries that ``setup.py`` builds next to this file (plain C ABIs, loaded through ctypes), and
checking what is handed to them: the C++ side trusts every pointer, size and index it receives."""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
from collections.abc import Callable
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


def require(ok: bool, what: Callable[[], str]) -> None:
    """``ValueError`` naming the violated condition, raised before any pointer reaches the C++ side (the message is
    built only then: these checks run on every decode step)."""
    if not ok:
        raise ValueError(f"nexusquant native kernel: {what()}")


def check_pages(kv_cache: torch.Tensor, num_kv_heads: int, slot_width: int, dtypes) -> None:
    """``kv_cache`` is a CPU page tensor ``[num_blocks, Hk, block_size, slot_width]`` of one of ``dtypes`` whose
    slots are contiguous (the blocks, heads and tokens may have any strides)."""
    shape = kv_cache.shape
    require(kv_cache.is_cpu, lambda: f"kv_cache must be on the CPU, got {kv_cache.device}")
    require(kv_cache.dim() == 4, lambda: f"kv_cache must be [num_blocks, Hk, block_size, slot], got {tuple(shape)}")
    require(kv_cache.dtype in dtypes,
            lambda: f"kv_cache dtype must be one of {sorted(map(str, dtypes))}, got {kv_cache.dtype}")
    require(shape[1] == num_kv_heads, lambda: f"kv_cache holds {shape[1]} KV heads, the K/V {num_kv_heads}")
    require(shape[3] == slot_width, lambda: f"kv_cache slots are {shape[3]} wide, the format needs {slot_width}")
    require(kv_cache.stride(3) == 1, lambda: "each kv_cache slot must be contiguous (stride 1 in the last dimension)")


def check_in_range(values: torch.Tensor, low: int, high: int, what: str) -> int:
    """Every entry of the integer tensor ``values`` lies in ``[low, high)`` (one reduction); returns the largest
    (``low`` for an empty tensor)."""
    if not values.numel():
        return low
    lo, hi = (int(x) for x in torch.aminmax(values))
    require(low <= lo and hi < high, lambda: f"{what} must lie in [{low}, {high}), got values in [{lo}, {hi}]")
    return hi


def check_cpu(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        require(t.is_cpu, lambda: f"{name} must be on the CPU, got {t.device}")
