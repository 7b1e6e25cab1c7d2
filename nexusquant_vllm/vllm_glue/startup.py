"""Startup: resolve the plugin's configuration once, refuse unsupported models with one clear error, pick the
protected boundary layers, self-check the worker's layers and log one line with the KV-cache budget.

The configuration (``nexusquant_vllm.config``) is resolved from ``additional_config["nexusquant"]`` and the
environment when the engine config is built, and written back into ``additional_config["nexusquant"]``; every other
process reads it from there (:func:`run_config`).

Protected boundary layers (still served by the nexusquant backend): ``protect_layers`` of the configuration
(``NEXUSQUANT_PROTECT_LAYERS``; default the first 2 and the last 2 layers) store ``protect_format``: an e8 dtype with
more bits (default e8-k4v4; given to those layers by ``compat.wrap_attention_init``) or the model dtype (``auto``,
through vLLM's ``kv_cache_dtype_skip_layers``). Layers in vLLM's own ``--kv-cache-dtype-skip-layers`` always keep
the model dtype.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from nexusquant_vllm.config import ADDITIONAL_CONFIG_KEY, NexusQuantConfig, parse_protect_layers
from nexusquant_vllm.dtypes import DEFAULT_DTYPE, E8_DTYPES, SCALAR_PREFIX, get_format, is_served

SUPPORTED_MODEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SINK_MODEL_TYPES = ("gpt_oss",)  # learned per-head attention sinks (vLLM hands them to the backend as ``sinks``)


def _logger():
    from vllm.logger import init_logger

    # Under vLLM's logger namespace so that vLLM's handler and format apply.
    return init_logger("vllm.nexusquant")


def check_dtype_name(dtype: str | None) -> None:
    """Anything under ``e8-`` (or ``scalar-``) that is not a served dtype: a clear error listing the valid names."""
    if isinstance(dtype, str) and dtype.startswith(("e8-", SCALAR_PREFIX)) and not is_served(dtype):
        raise ValueError(
            f"unknown nexusquant KV-cache dtype {dtype!r}; valid e8 dtypes: {', '.join(E8_DTYPES)} "
            f"(default {DEFAULT_DTYPE})"
        )


def resolve_config(additional_config: Mapping | None) -> NexusQuantConfig:
    """The environment's configuration with ``additional_config["nexusquant"]`` on top (validated)."""
    own = (additional_config or {}).get(ADDITIONAL_CONFIG_KEY) if isinstance(additional_config, Mapping) else None
    return NexusQuantConfig.from_env().merged(own)


def run_config(vllm_config=None) -> NexusQuantConfig:
    """The configuration of the run ``vllm_config`` belongs to, as the engine config resolved it; from the
    environment when there is no engine config (a layer built outside an engine, in tests)."""
    return resolve_config(getattr(vllm_config, "additional_config", None))


def run_dtype(vllm_config) -> str:
    """The run's e8 KV-cache dtype (what the protected layers of the run are served beside); the default e8 dtype
    when there is no engine config."""
    return vllm_config.cache_config.cache_dtype if vllm_config is not None else DEFAULT_DTYPE


def _windowed_layers(model_config) -> set[bool]:
    """Whether the model's layers attend over a sliding window: {True}, {False} or both."""
    layer_types = getattr(model_config.hf_text_config, "layer_types", None)
    if layer_types:
        return {"sliding" in str(t) for t in layer_types}
    return {model_config.get_sliding_window() is not None}


def has_sliding_window(model_config) -> bool:
    """Whether any attention layer of the model attends over a sliding window."""
    return True in _windowed_layers(model_config)


def mixes_windows(model_config) -> bool:
    """Whether the model has sliding-window layers beside global ones (Gemma 2/3, GPT-OSS): vLLM then puts its
    layers in several KV-cache groups of one page size."""
    return _windowed_layers(model_config) == {True, False}


def only_sliding_windows(model_config) -> bool:
    """Whether every layer of the model attends over a sliding window (Mistral 7B v0.1): vLLM then frees each block
    as it leaves the window, even with a KV connector installed."""
    return _windowed_layers(model_config) == {True}


def protected_layers(config: NexusQuantConfig, model_config) -> list[int]:
    """The protected layers of an e8 run (``protect_layers`` of its configuration, resolved for this model)."""
    return parse_protect_layers(config.protect_layers, model_config.hf_text_config.num_hidden_layers,
                                mixes_windows(model_config))


def check_model(model_config) -> None:
    """One clear error for every model the e8 cache cannot serve (raised before the engine starts)."""
    problems = []
    if getattr(model_config, "use_mla", False):
        problems.append("MLA attention (compressed latent KV) is not supported; use a model with standard attention")
    head_size = model_config.get_head_size()
    if head_size % 8 != 0:
        problems.append(f"head_dim {head_size} is not a multiple of 8 (E8 codes 8-element groups)")
    if model_config.dtype not in SUPPORTED_MODEL_DTYPES:
        problems.append(f"model dtype {model_config.dtype} is not supported (use float16, bfloat16 or float32)")
    if getattr(model_config, "is_hybrid", False):
        problems.append("hybrid models (attention + Mamba/linear attention) are not supported")
    if getattr(model_config.hf_text_config, "model_type", None) in SINK_MODEL_TYPES:
        problems.append("attention sinks (GPT-OSS) are not supported")
    if problems:
        raise ValueError("nexusquant e8 KV cache cannot serve this model: " + "; ".join(problems)
                         + ". Serve it with --kv-cache-dtype auto or fp8")


def before_engine_config(engine_args) -> None:
    """Resolve the configuration (in the process that builds the engine config) and hand it to every process."""
    check_dtype_name(engine_args.kv_cache_dtype)
    config = resolve_config(engine_args.additional_config)
    if config.eviction:
        from nexusquant_vllm.vllm_glue.eviction.params import configure_engine_args

        configure_engine_args(engine_args, config.eviction)  # install the eviction connector
    if is_served(engine_args.kv_cache_dtype):
        engine_args.additional_config = {**(engine_args.additional_config or {}),
                                         ADDITIONAL_CONFIG_KEY: config.to_dict()}


def after_engine_config(engine_args, vllm_config) -> None:
    from nexusquant_vllm.vllm_glue.eviction import params as eviction
    from nexusquant_vllm.vllm_glue.offload import params as offload

    eviction.check_engine_config(vllm_config)
    offload.check_engine_config(vllm_config)
    cache_config = vllm_config.cache_config
    if not is_served(cache_config.cache_dtype):
        return
    check_model(vllm_config.model_config)
    config = run_config(vllm_config)
    if config.protect_format != "auto":
        return  # protected_layer_dtype gives those layers their e8 format
    cache_config.kv_cache_dtype_skip_layers = sorted(
        set(cache_config.kv_cache_dtype_skip_layers) | {str(i) for i in protected_layers(config, vllm_config.model_config)}
    )


def protected_layer_dtype(prefix: str, cache_config) -> str | None:
    """The e8 ``protect_format`` for a protected layer of an e8 run (``compat.wrap_attention_init``); None for every
    other layer (and for one whose name holds no single layer index), for ``protect_format`` ``auto`` (vLLM's skip
    list does it) and for runs without an e8 dtype."""
    from vllm.config import get_current_vllm_config_or_none

    from nexusquant_vllm.vllm_glue.compat import layer_index

    vllm_config = get_current_vllm_config_or_none()
    if vllm_config is None or not is_served(cache_config.cache_dtype):
        return None
    dtypes, index = layer_dtypes(vllm_config), layer_index(prefix)
    dtype = dtypes[index] if index is not None and index < len(dtypes) else None
    return dtype if dtype not in (None, "auto", cache_config.cache_dtype) else None


def layer_dtypes(vllm_config) -> list[str]:
    """Each layer's KV-cache dtype in an e8 run: ``auto`` (model dtype), ``protect_format`` or the run's dtype."""
    cache_config = vllm_config.cache_config
    config = run_config(vllm_config)
    num_layers = vllm_config.model_config.hf_text_config.num_hidden_layers
    skipped = {int(s) for s in cache_config.kv_cache_dtype_skip_layers if s.isdigit()}
    protected = set(protected_layers(config, vllm_config.model_config)) if config.protect_format != "auto" else set()
    return ["auto" if i in skipped else config.protect_format if i in protected else cache_config.cache_dtype
            for i in range(num_layers)]


def check_worker_layers(runner, specs: dict) -> None:
    """Worker-side self-check and the startup log line (wraps ``GPUModelRunner.get_kv_cache_spec``)."""
    from nexusquant_vllm.vllm_glue.backend import NexusQuantBackend
    from nexusquant_vllm.vllm_glue.compat import attention_layers

    vllm_config = runner.vllm_config
    dtype = vllm_config.cache_config.cache_dtype
    if not is_served(dtype):
        return
    layers = attention_layers(vllm_config)
    wrong = [
        f"{name} ({layer.get_attn_backend().get_name()}, kv_cache_dtype={layer.kv_cache_dtype})"
        for name, layer in layers.items()
        if not issubclass(layer.get_attn_backend(), NexusQuantBackend)
    ]
    if wrong:
        raise RuntimeError(
            f"nexusquant self-check failed: with kv_cache_dtype={dtype} every attention layer must be served by the "
            f"nexusquant backend, but these are not (their pages would be read as garbage): {', '.join(wrong)}"
        )
    _log_budget(vllm_config, layers, specs, dtype)


def kv_budget(specs: dict, model_dtype: torch.dtype) -> dict:
    """Bytes per token over all layers with these specs, and vs a cache where every layer is in the model dtype.

    A model that mixes attention types (sliding-window and global layers) gets one page size from vLLM, the largest:
    a layer whose page divides it keeps its bytes per token (vLLM enlarges its block size), any other is padded
    (``unify_kv_cache_spec_page_size``); the padding is counted."""
    attn = [s for s in specs.values() if hasattr(s, "page_size_bytes") and hasattr(s, "head_size")]
    pages = [s.page_size_bytes for s in attn]
    if len({type(s) for s in attn}) > 1:
        pages = [p if max(pages) % p == 0 else max(pages) for p in pages]
    bytes_per_token = sum(p / s.block_size for p, s in zip(pages, attn))
    elem = torch.tensor([], dtype=model_dtype).element_size()
    dense = sum(s.num_kv_heads * (s.head_size + s.head_size_v) * elem for s in attn)
    padding = sum(
        (p - s.num_heads * s.block_size * s.state_content_bytes) / s.block_size
        for p, s in zip(pages, attn)
        if s.state_content_bytes is not None
    )
    return {
        "bytes_per_token": bytes_per_token,
        "dense_bytes_per_token": dense,
        "capacity_ratio": dense / bytes_per_token if bytes_per_token else float("nan"),
        "padding_bytes_per_token": padding,
    }


def all_ranks_budget(vllm_config) -> dict:
    """Bytes per token of the whole model's cache over every tensor x pipeline rank (KV heads that tensor
    parallelism replicates counted once per copy), and of the same cache in the model dtype."""
    model_config, parallel = vllm_config.model_config, vllm_config.parallel_config
    tp = parallel.tensor_parallel_size
    heads = model_config.get_num_kv_heads(parallel) * tp  # per layer, over the TP ranks
    head_size = model_config.get_head_size()
    dense_slot = 2 * head_size * torch.tensor([], dtype=model_config.dtype).element_size()
    dtypes = layer_dtypes(vllm_config)
    per_layer = [dense_slot if d == "auto" else get_format(d, head_size).slot_bytes for d in dtypes]
    return {"bytes_per_token": heads * sum(per_layer), "dense_bytes_per_token": heads * len(dtypes) * dense_slot,
            "ranks": tp * parallel.pipeline_parallel_size,
            "protected": sum(d != vllm_config.cache_config.cache_dtype for d in dtypes)}


def _log_budget(vllm_config, layers: dict, specs: dict, dtype: str) -> None:
    model_dtype = vllm_config.model_config.dtype
    dtype_name = str(model_dtype).replace("torch.", "")
    fmt = get_format(dtype, vllm_config.model_config.get_head_size())
    protected = sorted(name for name, layer in layers.items() if layer.kv_cache_dtype != dtype)
    protected_as = "/".join(sorted({dtype_name if not is_served(layers[n].kv_cache_dtype) else layers[n].kv_cache_dtype
                                     for n in protected})) or dtype_name
    b = kv_budget(specs, model_dtype)
    _logger().info(
        "nexusquant: kv_cache_dtype=%s (K %d bits, V %d bits, %d B/token-head = %.3f bits/elem incl. fp16 scales, "
        "%d B padding); %d/%d layers E8, %d protected in %s; %.0f B/token over all layers vs %.0f in %s: "
        "KV capacity ratio %.2fx; attention paths: %s%s",
        dtype, fmt.k_bits, fmt.v_bits, fmt.slot_bytes, fmt.bits_per_element, b["padding_bytes_per_token"],
        len(layers) - len(protected), len(layers), len(protected), protected_as,
        b["bytes_per_token"], b["dense_bytes_per_token"], dtype_name, b["capacity_ratio"], _path_names(layers, dtype),
        _ranks_note(vllm_config, len(layers)),
    )


def _ranks_note(vllm_config, num_layers: int) -> str:
    """Under tensor or pipeline parallelism: what this rank holds and the whole cache over every rank."""
    parallel = vllm_config.parallel_config
    total = all_ranks_budget(vllm_config)
    if total["ranks"] == 1:
        return ""
    from nexusquant_vllm.vllm_glue.compat import parallel_rank

    rank, _ = parallel_rank(vllm_config)
    heads = vllm_config.model_config.get_num_kv_heads(parallel)
    return (
        f"; this is rank {rank} of {total['ranks']} (tensor {rank % parallel.tensor_parallel_size}/"
        f"{parallel.tensor_parallel_size}, pipeline {rank // parallel.tensor_parallel_size}/"
        f"{parallel.pipeline_parallel_size}): {num_layers} layers x {heads} KV head(s) here; all ranks: "
        f"{total['bytes_per_token']:.0f} B/token vs {total['dense_bytes_per_token']:.0f} in the model dtype, "
        f"{total['protected']} protected layers"
    )


def _path_names(layers: dict, dtype: str) -> str:
    """Which attention path serves the E8 and the protected layers, e.g. ``E8 native-cpu, protected native-cpu``."""
    names: dict[str, set[str]] = {}
    for layer in layers.values():
        kind = "E8" if layer.kv_cache_dtype == dtype else "protected"
        names.setdefault(kind, set()).add(layer.impl.path.name)
    return ", ".join(f"{kind} {'/'.join(sorted(paths))}" for kind, paths in sorted(names.items()))
