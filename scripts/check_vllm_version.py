"""What can be checked of the plugin against an installed vLLM without running a model (e.g. vLLM 0.33's CUDA
build on a machine without a GPU): run it in that vLLM's environment, with this package installed there
(``scripts/check_vllm_033.sh`` builds one). Prints one line per check and exits non-zero if any failed.

Checked: the ``vllm.general_plugins`` entry point and ``register()`` (every patch point the version shim uses
exists), every e8 dtype accepted by vLLM's argument parser, ``CacheConfig`` and the storage-dtype table, the
backend class of each dtype (no abstract method left, registry name, page size from ``customize_spec`` against the
codec's slot size), backend selection for E8 and protected layers, and the
connectors' methods against ``KVConnectorBase_V1`` (same parameters, no abstract method left).
"""

from __future__ import annotations

import inspect
import sys
import traceback
from collections.abc import Callable

CHECKS: list[Callable[[], str]] = []


def check(fn: Callable[[], str]) -> Callable[[], str]:
    CHECKS.append(fn)
    return fn


@check
def entry_point() -> str:
    from importlib.metadata import entry_points

    from vllm.plugins import load_general_plugins

    found = [e.value for e in entry_points(group="vllm.general_plugins") if e.name == "nexusquant"]
    assert found == ["nexusquant_vllm.vllm_glue.plugin:register"], found
    load_general_plugins()
    from nexusquant_vllm.vllm_glue import compat, plugin

    assert plugin._registered
    return f"registered through the entry point (official dtype API: {compat.has_official_dtype_api()})"


class Unavailable(Exception):
    """What this machine cannot check (e.g. a GPU build's code that needs a device): reported as SKIP."""


@check
def dtypes_accepted() -> str:
    import torch
    from vllm.config import CacheConfig
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE

    from nexusquant_vllm.dtypes import E8_DTYPES

    for name in E8_DTYPES:
        assert CacheConfig(cache_dtype=name).cache_dtype == name
        assert STR_DTYPE_TO_TORCH_DTYPE.get(name, torch.uint8) == torch.uint8, STR_DTYPE_TO_TORCH_DTYPE.get(name)
    return f"{', '.join(E8_DTYPES)}: CacheConfig, storage uint8"


@check
def command_line() -> str:
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from nexusquant_vllm.dtypes import E8_DTYPES

    try:
        parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    except RuntimeError as e:  # vLLM 0.33's CUDA build infers the device while building its parser
        raise Unavailable(f"vLLM's argument parser needs a device here ({e})") from None
    for name in E8_DTYPES:
        assert parser.parse_args(["--kv-cache-dtype", name]).kv_cache_dtype == name
    return "--kv-cache-dtype accepts every e8 dtype"


@check
def backends() -> str:
    import torch
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    from nexusquant_vllm.codec.format import get_format
    from nexusquant_vllm.dtypes import E8_DTYPES
    from nexusquant_vllm.vllm_glue.backend import backend_for

    assert AttentionBackendEnum["NEXUSQUANT"].get_class() is backend_for("e8-k3v2")
    for name in E8_DTYPES:
        backend = backend_for(name)
        assert not inspect.isabstract(backend), backend.__abstractmethods__
        assert backend.supports_sliding_window()
        for head_size in (64, 96, 128, 256):
            slot = get_format(name, head_size).slot_bytes
            common = dict(block_size=32, num_kv_heads=4, head_size=head_size, dtype=torch.uint8)
            for spec in (FullAttentionSpec(**common), SlidingWindowSpec(**common, sliding_window=64)):
                assert backend.customize_spec(spec).page_size_bytes == 32 * 4 * slot, (name, head_size, spec)
    return ("one class per dtype, no abstract method, sliding windows supported; page size = codec slot at head_dim "
            "64/96/128/256, full and sliding-window layers")


@check
def selection() -> str:
    from nexusquant_vllm.vllm_glue.plugin import _choose_backend, backend_path

    class Selector:
        kv_cache_dtype = "e8-k4v4"

    assert _choose_backend(Selector()) == backend_path("e8-k4v4")
    Selector.kv_cache_dtype = "auto"
    assert _choose_backend(Selector()) is None  # outside an e8 run: vLLM's own choice
    return "E8 layers routed to the dtype's backend; auto layers of other runs left to vLLM"


@check
def connectors() -> str:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

    from nexusquant_vllm.vllm_glue.eviction.connector import NQEvictionConnector
    from nexusquant_vllm.vllm_glue.offload.connector import NQOffloadConnector

    problems = []
    for cls in (NQEvictionConnector, NQOffloadConnector):
        if inspect.isabstract(cls):
            problems.append(f"{cls.__name__} leaves abstract: {sorted(cls.__abstractmethods__)}")
        for name, ours in vars(cls).items():
            base = getattr(KVConnectorBase_V1, name, None)
            if not callable(ours) or base is None or name.startswith("__"):
                continue
            theirs = [p for p in inspect.signature(base).parameters]
            mine = [p for p in inspect.signature(ours).parameters]
            if mine[: len(theirs)] != theirs and "kwargs" not in mine:
                problems.append(f"{cls.__name__}.{name}{tuple(mine)} vs base {tuple(theirs)}")
    assert not problems, "; ".join(problems)
    return "both connectors: every overridden method has the base's parameters, nothing abstract"


def main() -> int:
    import vllm

    print(f"vllm {vllm.__version__} from {vllm.__file__}")
    failed = 0
    for fn in CHECKS:
        try:
            print(f"PASS {fn.__name__}: {fn()}")
        except Unavailable as e:
            print(f"SKIP {fn.__name__}: {e}")
        except Exception as e:  # noqa: BLE001 - every failure is reported, then the next check runs
            failed += 1
            print(f"FAIL {fn.__name__}: {type(e).__name__}: {e}")
            traceback.print_exc(limit=3)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
