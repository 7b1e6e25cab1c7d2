"""The offload connector's settings (``kv_connector_extra_config``), the ``kv_transfer_config`` helper and the
namespace of a run.

``kv_connector_extra_config`` keys, all optional:

============  ========  =================================================================================
key           default   meaning
============  ========  =================================================================================
``ram_gb``    4         byte budget of the host-RAM tier, GiB (0: no RAM tier)
``disk_dir``  none      directory of the disk tier (shared by servers; survives restarts); none: no disk tier
``disk_gb``   64        byte budget of the whole disk directory, GiB
``transforms`` see      per stream (``codes``, ``scales``, ``dense``) the transform before zstd; default
              record    ``nexusquant_vllm.offload.record.DEFAULT_TRANSFORMS`` (chosen by ``benchmarks/offload.py``)
============  ========  =================================================================================
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nexusquant_vllm.codec.format import CODEC_VERSION, E8_DTYPES
from nexusquant_vllm.offload.record import DEFAULT_TRANSFORMS, check_transforms, namespace
from nexusquant_vllm.vllm_glue import compat
from nexusquant_vllm.vllm_glue.eviction import params as eviction_params
from nexusquant_vllm.vllm_glue.startup import layer_dtypes, only_sliding_windows

CONNECTOR_NAME = "NQOffloadConnector"
CONNECTOR_MODULE = "nexusquant_vllm.vllm_glue.offload.connector"
GIB = 1 << 30
RECOMPUTE_NEEDED = (
    'the nexusquant offload tier needs "kv_load_failure_policy": "recompute" in --kv-transfer-config, at the top '
    "level and, inside a MultiConnector, in its own entry (a block that fails its checks is recomputed, never "
    "loaded); nexusquant_vllm.vllm_glue.offload.kv_transfer_config() sets it"
)
PREFIX_CACHING_NEEDED = (
    "the nexusquant offload tier serves prefix hits keyed by vLLM's prefix-cache block hashes: it needs prefix "
    "caching on (drop --no-enable-prefix-caching)"
)
SLIDING_WINDOWS_ONLY = (
    "the nexusquant offload tier cannot serve a model whose every layer has a sliding window: vLLM frees each block "
    "as it leaves the window, before the tier can store it, so the tier would serve no hit; serve this model without "
    "the tier"
)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


@dataclass(frozen=True)
class OffloadSettings:
    ram_bytes: int = 4 * GIB
    disk_dir: str | None = None
    disk_bytes: int = 64 * GIB
    transforms: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_TRANSFORMS))

    @classmethod
    def from_extra(cls, extra: dict[str, Any]) -> OffloadSettings:
        """From ``kv_connector_extra_config``; a ``ValueError`` names the bad key."""
        known = {"ram_gb", "disk_dir", "disk_gb", "transforms"}
        unknown = set(extra) - known
        if unknown:
            raise ValueError(f"unknown offload setting(s) {sorted(unknown)} in kv_connector_extra_config; known: "
                             f"{sorted(known)}")
        ram_gb, disk_gb = _gib(extra, "ram_gb", 4.0), _gib(extra, "disk_gb", 64.0)
        disk_dir = extra.get("disk_dir") or None
        if disk_dir is not None and not isinstance(disk_dir, str):
            raise ValueError(f"kv_connector_extra_config.disk_dir must be a path, got {disk_dir!r}")
        if not ram_gb and disk_dir is None:
            raise ValueError("the offload connector needs ram_gb > 0, a disk_dir, or both")
        transforms = {**DEFAULT_TRANSFORMS, **(extra.get("transforms") or {})}
        check_transforms(transforms)
        return cls(int(ram_gb * GIB), disk_dir, max(int(disk_gb * GIB), 1), transforms)


def _gib(extra: dict[str, Any], key: str, default: float) -> float:
    value = extra.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"kv_connector_extra_config.{key} must be a number of GiB >= 0, got {value!r}")
    return float(value)


def kv_transfer_config(ram_gb: float = 4.0, disk_dir: str | os.PathLike | None = None, disk_gb: float = 64.0,
                       eviction: object = None, **eviction_extra: Any) -> dict:
    """The ``kv_transfer_config`` that installs the compressed KV tier, e.g. ``LLM(..., kv_transfer_config=
    kv_transfer_config(disk_dir="/var/cache/nq"))``; on the command line the same dict as JSON to
    ``--kv-transfer-config``. With ``eviction`` (a preset or rate, as for the eviction connector) both connectors
    run inside vLLM's ``MultiConnector``, the eviction connector first (it decides which blocks leave the prefix
    cache before the tier plans its saves in the same step; see the connector's docstring). A block that fails to
    load is recomputed (``kv_load_failure_policy="recompute"``, which vLLM reads at the top level and the tier
    checks in its own entry)."""
    extra: dict[str, Any] = {"ram_gb": ram_gb, "disk_gb": disk_gb}
    if disk_dir is not None:
        extra["disk_dir"] = str(disk_dir)
    OffloadSettings.from_extra(extra)
    offload = {"kv_connector": CONNECTOR_NAME, "kv_connector_module_path": CONNECTOR_MODULE,
               "kv_role": "kv_both", "kv_load_failure_policy": "recompute", "kv_connector_extra_config": extra}
    if eviction is None:
        return offload
    return {
        "kv_connector": "MultiConnector", "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {
            "connectors": [eviction_params.kv_transfer_config(eviction, **eviction_extra), offload]
        },
    }


def check_dtype(dtype: str) -> None:
    if dtype not in E8_DTYPES:
        raise ValueError(f"the nexusquant offload tier stores E8 pages: it needs an e8 --kv-cache-dtype "
                         f"({', '.join(E8_DTYPES)}), got {dtype!r}")


def check_engine_config(vllm_config) -> None:
    """One clear error, in the process that builds the engine config, for a run that installs the tier but cannot
    serve it (the connector checks again where it is built, in the engine core and the workers)."""
    transfer = vllm_config.kv_transfer_config
    if transfer is None:
        return
    for entry in compat.connector_entries(transfer):
        if entry.get("kv_connector") != CONNECTOR_NAME:
            continue
        check_dtype(vllm_config.cache_config.cache_dtype)
        if only_sliding_windows(vllm_config.model_config):
            raise ValueError(SLIDING_WINDOWS_ONLY)
        if "recompute" != transfer.kv_load_failure_policy or "recompute" != entry.get("kv_load_failure_policy"):
            raise ValueError(RECOMPUTE_NEEDED)
        if not vllm_config.cache_config.enable_prefix_caching:
            raise ValueError(PREFIX_CACHING_NEEDED)
        OffloadSettings.from_extra(entry.get("kv_connector_extra_config") or {})


def run_namespaces(vllm_config) -> list[bytes]:
    """One namespace per tensor x pipeline parallel rank (each stores its own heads or layers): a record of
    another model, weights, model dtype, e8 dtype, codec version, block size, protected layers (which, and in what
    format), hash algorithm or parallel layout is never a hit."""
    cache, parallel = vllm_config.cache_config, vllm_config.parallel_config
    world = parallel.tensor_parallel_size * parallel.pipeline_parallel_size
    parts = (
        model_fingerprint(vllm_config.model_config), cache.cache_dtype, CODEC_VERSION, cache.block_size,
        ",".join(layer_dtypes(vllm_config)), cache.prefix_caching_hash_algo,
        parallel.tensor_parallel_size, parallel.pipeline_parallel_size,
    )
    return [namespace(*parts, rank) for rank in range(world)]


def model_fingerprint(model_config) -> str:
    """The model's identity: name or path, revision, dtype, quantization, its config, and for a local directory
    each weight file's name, size and a hash of its first and last MiB (changed weights, even of the same shapes,
    give a new namespace; copies of the same weights on other nodes give the same one)."""
    config = model_config.hf_config.to_json_string(use_diff=False) if model_config.hf_config else ""
    parts = [str(model_config.model), str(model_config.revision), str(model_config.dtype),
             str(model_config.quantization), config]
    folder = Path(str(model_config.model))
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            if path.suffix in WEIGHT_SUFFIXES:
                parts.append(f"{path.name}:{path.stat().st_size}:{_ends_digest(path)}")
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def _ends_digest(path: Path, span: int = 1 << 20) -> str:
    with open(path, "rb") as f:
        head = f.read(span)
        f.seek(max(path.stat().st_size - span, 0))
        tail = f.read(span)
    return hashlib.blake2b(head + tail, digest_size=16).hexdigest()
