"""The ``vllm.general_plugins`` entry point: ``nexusquant = nexusquant_vllm.vllm_glue.plugin:register``.

vLLM calls ``register()`` in every process it starts (CLI/API server, engine core, workers; on CPU the children are
spawned, so only an installed entry point reaches them). It is idempotent.
"""

from __future__ import annotations

from nexusquant_vllm.dtypes import DEFAULT_DTYPE, dtype_names, is_served

BACKEND_NAME = "NEXUSQUANT"
BACKEND_MODULE = "nexusquant_vllm.vllm_glue.backend"

_registered = False


def backend_class_name(dtype: str) -> str:
    """``e8-k3v2`` -> ``E8_K3V2_Backend`` (one backend class per dtype: ``customize_spec`` does not see the dtype)."""
    return dtype.replace("-", "_").upper() + "_Backend"


def backend_path(dtype: str) -> str:
    return f"{BACKEND_MODULE}.{backend_class_name(dtype)}"


def _choose_backend(attn_selector_config) -> str | None:
    """Our backend for every attention layer of an e8 run (E8 layers and protected boundary layers alike)."""
    from vllm.config import get_current_vllm_config_or_none

    from nexusquant_vllm.vllm_glue.startup import check_dtype_name

    kv = attn_selector_config.kv_cache_dtype
    check_dtype_name(kv)
    if is_served(kv):
        return backend_path(kv)
    vllm_config = get_current_vllm_config_or_none()
    run_dtype = vllm_config.cache_config.cache_dtype if vllm_config is not None else None
    if is_served(run_dtype):
        return backend_path(run_dtype)  # a protected layer (kv_cache_dtype "auto") of an e8 run
    return None


def register() -> None:
    global _registered
    if _registered:
        return
    from nexusquant_vllm.vllm_glue import compat, startup
    from nexusquant_vllm.vllm_glue.eviction import params as eviction
    from nexusquant_vllm.vllm_glue.offload import params as offload

    compat.register_kv_cache_dtypes(dtype_names())
    compat.register_backend_name(BACKEND_NAME, backend_path(DEFAULT_DTYPE))
    compat.wrap_backend_selection(_choose_backend)
    compat.wrap_create_engine_config(startup.before_engine_config, startup.after_engine_config)
    compat.wrap_attention_init(startup.protected_layer_dtype)
    compat.wrap_get_kv_cache_spec(startup.check_worker_layers)
    compat.wrap_extra_args_validation(eviction.validate_extra_arg)  # nq_eviction & co.: a clear error / HTTP 400
    compat.register_connector(eviction.CONNECTOR_NAME, eviction.CONNECTOR_MODULE)
    compat.register_connector(offload.CONNECTOR_NAME, offload.CONNECTOR_MODULE)
    _registered = True
