"""The ``vllm.general_plugins`` entry point: ``nexusquant = nexusquant_vllm.vllm_glue.plugin:register``.

vLLM calls ``register()`` in every process it starts (CLI/API server, engine core, workers; on CPU the children are
spawned, so only an installed entry point reaches them). It is idempotent.
"""

from __future__ import annotations

from nexusquant_vllm.vllm_glue.dtypes import DEFAULT_DTYPE, backend_path, dtype_names, is_served

_registered = False


def _choose_backend(attn_selector_config) -> str | None:
    """Our backend for every attention layer of an e8 run (E8 layers and protected boundary layers alike)."""
    from nexusquant_vllm.vllm_glue.startup import check_dtype_name

    kv = attn_selector_config.kv_cache_dtype
    check_dtype_name(kv)
    if is_served(kv):
        return backend_path(kv)
    try:
        from vllm.config import get_current_vllm_config

        run_dtype = get_current_vllm_config().cache_config.cache_dtype
    except Exception:  # noqa: BLE001 - no config in scope: not an e8 run
        return None
    if is_served(run_dtype):
        return backend_path(run_dtype)  # a protected layer (kv_cache_dtype "auto") of an e8 run
    return None


def register() -> None:
    global _registered
    if _registered:
        return
    from nexusquant_vllm.vllm_glue import compat, startup

    compat.register_kv_cache_dtypes(dtype_names())
    compat.register_backend_name("NEXUSQUANT", backend_path(DEFAULT_DTYPE))
    compat.wrap_backend_selection(_choose_backend)
    compat.wrap_create_engine_config(startup.before_engine_config, startup.after_engine_config)
    compat.wrap_get_kv_cache_spec(startup.check_worker_layers)
    from nexusquant_vllm.vllm_glue.eviction.params import install_request_validation

    install_request_validation()  # nq_eviction in SamplingParams.extra_args: a clear error / HTTP 400
    _registered = True
