"""Where a request's eviction rate comes from: a server default and a per-request override.

* **Server default**: ``kv_connector_extra_config["eviction"]`` of the eviction connector (see
  :func:`kv_transfer_config`), or, when the connector is installed through the plugin configuration's ``eviction``
  (``NEXUSQUANT_EVICTION``; see ``nexusquant_vllm.config``), that value.
* **Per request**: ``SamplingParams(extra_args={"nq_eviction": ...})``, or over the OpenAI API
  ``"vllm_xargs": {"nq_eviction": ...}``. A preset (``lossless``, ``conservative``, ``balanced``, ``aggressive``) or
  a number in [0, 1). Optional ``nq_eviction_protect``: a list of ``[start, end)`` token ranges always kept.
  Optional ``nq_eviction_at``: a token count N >= 1; the eviction then fires once the first N prompt tokens are
  computed and is decided over those N tokens alone (the rest of the prompt is computed over the evicted cache).
  This is how a continuation is teacher-forced over an evicted context (``prompt_logprobs`` on the rest of the
  prompt); for exact results N must fall on a prefill chunk boundary, e.g. a multiple of
  ``max_num_batched_tokens`` with one request scheduled at a time (the request's stats report
  ``computed_before_eviction``, which then equals N). A request whose prefix-cache hit already covers the first N
  tokens is not evicted (nothing of them is computed, so nothing is scored).

Invalid per-request values are refused where the request is built (``SamplingParams`` construction, so an HTTP
request gets a 400 naming ``nq_eviction``) by :func:`validate_extra_arg` (installed by the plugin); the engine core, which must never
crash on one request, treats a value that still slips through as "no eviction" and logs it.
"""

from __future__ import annotations

from typing import Any

from nexusquant_vllm.eviction import EvictionPolicy, parse_rate
from nexusquant_vllm.eviction.compaction import GUARD_SHARE

EXTRA_ARG = "nq_eviction"
PROTECT_ARG = "nq_eviction_protect"
AT_ARG = "nq_eviction_at"
ARG_PREFIX = "nq_"  # every per-request argument of nexusquant starts with it
MAX_PROTECTED_RANGES = 1024  # per request: the scheduler's work per eviction stays O(blocks + ranges)
CONNECTOR_NAME = "NQEvictionConnector"
CONNECTOR_MODULE = "nexusquant_vllm.vllm_glue.eviction.connector"
# kv_connector_extra_config keys (all optional)
DEFAULT_KEY, MIN_PROMPT_KEY, RECENT_KEY, WINDOW_KEY = "eviction", "min_prompt_tokens", "recent_tokens", "window"
COMPACTION_KEY, FACT_GUARD_KEY = "compaction", "fact_guard"


def kv_transfer_config(default: object = "lossless", **extra: Any) -> dict:
    """The ``kv_transfer_config`` that installs eviction, e.g. ``LLM(..., kv_transfer_config=kv_transfer_config(
    "balanced"))``; on the command line the same dict as JSON to ``--kv-transfer-config``."""
    parse_rate(default, f"kv_connector_extra_config.{DEFAULT_KEY}")
    return {
        "kv_connector": CONNECTOR_NAME,
        "kv_connector_module_path": CONNECTOR_MODULE,
        "kv_role": "kv_both",
        "kv_connector_extra_config": {DEFAULT_KEY: default, **extra},
    }


def configure_engine_args(engine_args, default: str) -> None:
    """Install the connector with the server default ``default`` (the configuration's ``eviction``), before the
    engine config is built. Beside a configured offload tier alone, both run in vLLM's ``MultiConnector`` (eviction
    first); a configured eviction connector, alone or in a ``MultiConnector``, wins; beside any other connector the
    configuration is refused, since eviction would silently not run."""
    from vllm.config import KVTransferConfig

    from nexusquant_vllm.vllm_glue import compat
    from nexusquant_vllm.vllm_glue.offload.params import CONNECTOR_NAME as OFFLOAD  # it imports this module

    current = engine_args.kv_transfer_config
    if current is None:
        engine_args.kv_transfer_config = KVTransferConfig(**kv_transfer_config(default))
        return
    entries = compat.connector_entries(current)
    names = [entry.get("kv_connector") for entry in entries]
    if CONNECTOR_NAME in names:
        return
    if names != [OFFLOAD]:
        raise ValueError(
            f"the nexusquant eviction default ({default!r}, from NEXUSQUANT_EVICTION or additional_config) installs "
            f"the {CONNECTOR_NAME}, but --kv-transfer-config already installs {', '.join(map(str, names))}: add "
            f"the eviction connector to that configuration (vLLM's MultiConnector) or drop the eviction default"
        )
    engine_args.kv_transfer_config = KVTransferConfig(
        kv_connector="MultiConnector", kv_role="kv_both", kv_load_failure_policy=current.kv_load_failure_policy,
        kv_connector_extra_config={"connectors": [kv_transfer_config(default), *entries]},
    )


def check_engine_config(vllm_config) -> None:
    """One clear error, where the engine config is built, for eviction on a model with sliding-window layers: a
    window is read by position in the block table, and compaction moves kept tokens to other positions."""
    from nexusquant_vllm.vllm_glue import compat
    from nexusquant_vllm.vllm_glue.startup import has_sliding_window

    transfer = vllm_config.kv_transfer_config
    if transfer is None or CONNECTOR_NAME not in [e.get("kv_connector") for e in compat.connector_entries(transfer)]:
        return
    if has_sliding_window(vllm_config.model_config):
        raise ValueError(
            "nexusquant eviction cannot serve a model with sliding-window attention layers (compaction moves kept "
            "tokens to other positions, and a window is read by position); drop the eviction connector "
            "(NEXUSQUANT_EVICTION / --kv-transfer-config) for this model"
        )


def validate_extra_arg(key: object, value: object) -> None:
    """Raise ``ValueError`` naming the field for an invalid ``nq_eviction`` / ``nq_eviction_protect`` /
    ``nq_eviction_at`` entry of ``extra_args``, or an unknown ``nq_*`` key: the prefix is ours, so a misspelt key
    (``nq_evction``) is an error rather than silently ignored. Other keys belong to someone else and pass."""
    if key == EXTRA_ARG:
        parse_rate(value, EXTRA_ARG)
    elif key == PROTECT_ARG:
        _parse_protected(value)
    elif key == AT_ARG:
        _parse_at(value)
    elif isinstance(key, str) and key.startswith(ARG_PREFIX):
        raise ValueError(f"unknown nexusquant request argument {key!r}; known: {EXTRA_ARG}, {PROTECT_ARG}, {AT_ARG}")


def eviction_point(extra_args: dict | None, num_prompt_tokens: int) -> int:
    """The number of leading prompt tokens after whose prefill the eviction fires (the whole prompt by default)."""
    if not extra_args or AT_ARG not in extra_args:
        return num_prompt_tokens
    return min(_parse_at(extra_args[AT_ARG]), num_prompt_tokens)


def _parse_at(value: object) -> int:
    if type(value) is not int or value < 1:
        raise ValueError(f"{AT_ARG} must be a token count >= 1, got {value!r}")
    return value


def _parse_protected(value: object) -> tuple[tuple[int, int], ...]:
    """``[[s0, e0], [s1, e1], ...]`` or the flat ``[s0, e0, s1, e1, ...]``: vLLM's OpenAI ``vllm_xargs`` schema admits
    only flat lists, so that is the form an HTTP request can send."""
    error = ValueError(
        f"{PROTECT_ARG} must be a list of [start, end) token ranges with 0 <= start <= end (nested, or flat "
        f"[s0, e0, s1, e1, ...]), got {value!r}"
    )
    if not isinstance(value, (list, tuple)):
        raise error
    flat = len(value) > 0 and all(type(x) is int for x in value)
    pairs = list(zip(value[::2], value[1::2])) if flat else value
    if flat and len(value) % 2:
        raise error
    if len(pairs) > MAX_PROTECTED_RANGES:
        raise ValueError(f"{PROTECT_ARG} may hold at most {MAX_PROTECTED_RANGES} ranges, got {len(pairs)}")
    ranges = []
    for item in pairs:
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and all(type(x) is int for x in item)):
            raise error
        if not 0 <= item[0] <= item[1]:
            raise error
        ranges.append((item[0], item[1]))
    return tuple(ranges)


def server_policy(extra_config: dict) -> EvictionPolicy:
    """The server default policy from ``kv_connector_extra_config`` (clear ValueError naming the key)."""
    base = EvictionPolicy()
    return EvictionPolicy(
        rate=parse_rate(extra_config.get(DEFAULT_KEY, 0.0), f"kv_connector_extra_config.{DEFAULT_KEY}"),
        min_prompt_tokens=int(extra_config.get(MIN_PROMPT_KEY, base.min_prompt_tokens)),
        recent_tokens=int(extra_config.get(RECENT_KEY, base.recent_tokens)),
        sink_blocks=base.sink_blocks,
    )


def compaction(extra_config: dict) -> bool:
    """``kv_connector_extra_config["compaction"]`` (default on): refill the kept blocks of every layer with that
    layer's and KV head's best tokens (``nexusquant_vllm.eviction.compaction``); off: whole-block eviction only."""
    value = extra_config.get(COMPACTION_KEY, True)
    if not isinstance(value, bool):
        raise ValueError(f"kv_connector_extra_config.{COMPACTION_KEY} must be true or false, got {value!r}")
    return value


def fact_guard(extra_config: dict) -> float:
    """``kv_connector_extra_config["fact_guard"]``: the share of a compacted prompt's kept tokens that every layer
    and KV head keeps for the runs the prompt's end points at (``nexusquant_vllm.eviction.compaction.fact_guard``),
    in [0, 1); 0 turns the guard off."""
    value = extra_config.get(FACT_GUARD_KEY, GUARD_SHARE)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"kv_connector_extra_config.{FACT_GUARD_KEY} must be a number in [0, 1), got {value!r}")
    return float(value)


def request_rate(default: EvictionPolicy, extra_args: dict | None) -> float:
    """The request's eviction rate alone (what the worker needs every step; the protected ranges are parsed once,
    by the scheduler)."""
    if not extra_args or EXTRA_ARG not in extra_args:
        return default.rate
    return parse_rate(extra_args[EXTRA_ARG], EXTRA_ARG)


def request_eviction(default: EvictionPolicy, sampling_params, num_prompt_tokens: int) -> tuple[int, float] | None:
    """``(evict_at, rate)`` of a request that evicts (its prompt tokens scored before the eviction fires, and its
    rate); None if it evicts nothing: a pooling request, rate 0, fewer than ``min_prompt_tokens`` tokens to score,
    or an invalid value (refused at request construction already; the engine core must not crash on it)."""
    if sampling_params is None:
        return None
    extra_args = sampling_params.extra_args
    try:
        rate = request_rate(default, extra_args)
        evict_at = eviction_point(extra_args, num_prompt_tokens)
    except ValueError:
        return None
    return (evict_at, rate) if rate > 0 and evict_at >= default.min_prompt_tokens else None


def request_policy(default: EvictionPolicy, extra_args: dict | None) -> EvictionPolicy:
    """The policy of one request: the server default with the request's ``nq_eviction`` / protected ranges."""
    if not extra_args or (EXTRA_ARG not in extra_args and PROTECT_ARG not in extra_args):
        return default
    rate = request_rate(default, extra_args)
    protected = _parse_protected(extra_args[PROTECT_ARG]) if PROTECT_ARG in extra_args else default.protected
    return EvictionPolicy(
        rate=rate, min_prompt_tokens=default.min_prompt_tokens, recent_tokens=default.recent_tokens,
        sink_blocks=default.sink_blocks, protected=protected,
    )
