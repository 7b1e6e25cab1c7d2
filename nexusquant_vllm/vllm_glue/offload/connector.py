"""``NQOffloadConnector``: a vLLM KV connector that keeps full KV blocks as compressed records in host RAM and on
disk (:mod:`nexusquant_vllm.offload`) and loads them back as prefix hits, across requests, evictions from vLLM's
block pool and server restarts.

A block is keyed by vLLM's block hash (the chain over the block's and all earlier tokens, LoRA, multimodal inputs
and cache salt; ``sha256`` by default, stable across processes) inside the run's namespace (:func:`.params.
run_namespaces`: model, weights, dtypes, codec version, block size, protected layers, parallel layout).

* **Scheduler.** ``get_num_new_matched_tokens`` counts the request's consecutive full blocks past the local prefix
  hit that the tier holds (the RAM tier's keys, as the workers report them, or a file of every rank in the disk
  directory), never the block holding the last prompt token. ``build_connector_meta`` sends the workers this step's
  loads (block id, key) and saves: every block that this step completes and that vLLM's own prefix cache holds
  (so exactly what vLLM would serve as a prefix hit), unless the tier already has it.
* **Workers.** ``start_load_kv`` (before the forward) writes the loaded blocks into every layer's pages; a block no
  tier can supply intact is reported through ``get_block_ids_with_load_errors`` and vLLM recomputes it
  (``kv_load_failure_policy="recompute"``, required). ``wait_for_save`` (after the forward) copies the saved blocks
  out of the pages and hands them to the store's background thread: the forward waits for that copy only, never
  for compression or I/O.

Loads are synchronous (in the step's own forward): reading 44 bytes per token-head from RAM or a warm disk is far
cheaper than a step. With eviction, both connectors run in vLLM's ``MultiConnector`` (``params.kv_transfer_config(
eviction=...)``), the eviction connector first, and share no state: the eviction connector keeps vLLM's prefix cache
free of blocks computed over its holes (and of the blocks its compaction rewrites), deciding before this connector
plans its saves in the same step, so the tier never stores them either. A compacted block was saved in the step
that completed it, before the compaction (a later step) rewrote it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.logger import init_logger

from nexusquant_vllm.offload import BlockLayout, DiskTier, KVTierStore, LayerPages, RamTier, RecordCodec
from nexusquant_vllm.vllm_glue import compat
from nexusquant_vllm.vllm_glue.offload.metrics import OffloadPromMetrics, OffloadStats
from nexusquant_vllm.vllm_glue.offload.params import (
    PREFIX_CACHING_NEEDED,
    RECOMPUTE_NEEDED,
    OffloadSettings,
    check_dtype,
    run_namespaces,
)

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = init_logger("vllm.nexusquant.offload")


@dataclass
class OffloadMetadata(KVConnectorMetadata):
    """Scheduler -> workers, every step: blocks to load before the forward and to save after it."""

    loads: list[tuple[int, bytes]] = field(default_factory=list)
    saves: list[tuple[int, bytes]] = field(default_factory=list)


@dataclass
class OffloadWorkerMetadata(KVConnectorWorkerMetadata):
    """Workers -> scheduler: ``(key, now in RAM)`` for every change of the RAM tiers, in order, from every rank."""

    ram_events: list[tuple[bytes, bool]] = field(default_factory=list)

    def aggregate(self, other: "OffloadWorkerMetadata") -> "OffloadWorkerMetadata":
        return OffloadWorkerMetadata(self.ram_events + other.ram_events)


@dataclass
class _Tracked:
    request: "Request"
    next_block: int  # logical blocks before it are loaded, saved or skipped


class NQOffloadConnector(KVConnectorBase_V1):
    """See the module docstring and :mod:`.params` for ``kv_connector_extra_config``."""

    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config, role, kv_cache_config)
        check_dtype(vllm_config.cache_config.cache_dtype)
        groups = len(kv_cache_config.kv_cache_groups) if kv_cache_config is not None else 1
        if groups != 1:
            raise ValueError(f"the nexusquant offload tier supports models with one KV-cache group; this one has "
                             f"{groups}")
        transfer = self._kv_transfer_config
        if transfer.kv_load_failure_policy != "recompute":
            raise ValueError(RECOMPUTE_NEEDED)
        if not vllm_config.cache_config.enable_prefix_caching:
            raise ValueError(PREFIX_CACHING_NEEDED)
        self.settings = OffloadSettings.from_extra(transfer.kv_connector_extra_config)
        self.block_size = vllm_config.cache_config.block_size
        self.namespaces = run_namespaces(vllm_config)
        if role == KVConnectorRole.WORKER:
            self.store: KVTierStore | None = None
            self._caches: list[torch.Tensor] = []
            self._load_errors: set[int] = set()
        else:
            self.disks = [self._disk(ns) for ns in self.namespaces] if self.settings.disk_dir else []
            self._in_ram: Counter[bytes] = Counter()  # ranks whose RAM tier holds the key
            self._hits: dict[str, tuple[int, list[bytes]]] = {}
            self._loads: list[tuple[int, bytes]] = []
            self._tracked: dict[str, _Tracked] = {}
            self._stats = OffloadStats()
        logger.info("nexusquant offload tier (%s): RAM %.2f GiB, disk %s", role.name,
                    self.settings.ram_bytes / (1 << 30), self.settings.disk_dir or "off")

    def _disk(self, ns: bytes) -> DiskTier:
        return DiskTier(self.settings.disk_dir, ns.hex(), self.settings.disk_bytes)

    @property
    def requires_kv_delivery(self) -> bool:
        return False

    # ---- stats --------------------------------------------------------------------------------------------------

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> OffloadStats:
        return OffloadStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues) -> OffloadPromMetrics:
        return OffloadPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def get_kv_connector_stats(self) -> OffloadStats | None:
        if self._role == KVConnectorRole.WORKER:
            counts = self.store.take_stats() if self.store is not None else {}
            return OffloadStats(data=counts) if counts else None
        if self._stats.is_empty():
            return None
        stats, self._stats = self._stats, OffloadStats()
        return stats

    # ---- worker side --------------------------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Build the store once the pages exist: the record layout is every layer's page of one block, in layer
        name order."""
        layers = compat.attention_layers(self._vllm_config)
        names = sorted(kv_caches)
        self._caches = [kv_caches[name] for name in names]
        layout = BlockLayout(tuple(_layer_pages(kv_caches[n], layers[n].impl.path.pages.fmt) for n in names))
        rank, _ = compat.parallel_rank(self._vllm_config)
        ns = self.namespaces[rank]
        ram = RamTier(self.settings.ram_bytes) if self.settings.ram_bytes else None
        disk = self._disk(ns) if self.settings.disk_dir else None
        codec = RecordCodec(ns, layout, tuple(self.settings.transforms.items()))
        self.store = KVTierStore(codec, ram, disk)
        logger.info("nexusquant offload tier: %d layers, %d B of pages per block, namespace %s", len(names),
                    layout.nbytes, ns.hex())

    def start_load_kv(self, forward_context, **kwargs) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, OffloadMetadata) or not meta.loads:
            return
        ids, blocks = [], []
        for block_id, key in meta.loads:
            pages = self.store.load(key)
            if pages is None:
                self._load_errors.add(block_id)
            else:
                ids.append(block_id)
                blocks.append(pages)
        if not ids:
            return
        index = torch.tensor(ids, dtype=torch.long)
        for layer, cache in enumerate(self._caches):
            data = torch.from_numpy(np.stack([pages[layer] for pages in blocks]))
            _bytes(cache).index_copy_(0, index.to(cache.device), data.to(cache.device))

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs) -> None:
        return

    def wait_for_save(self) -> None:
        """Copy this step's completed blocks out of the pages (all the forward waits for) and queue them."""
        meta = self._get_connector_metadata()
        if not isinstance(meta, OffloadMetadata) or not meta.saves:
            return
        index = torch.tensor([block_id for block_id, _ in meta.saves], dtype=torch.long)
        copies = [_bytes(cache).index_select(0, index.to(cache.device)).cpu().numpy() for cache in self._caches]
        for i, (_, key) in enumerate(meta.saves):
            self.store.submit(key, [copy[i] for copy in copies])

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def build_connector_worker_meta(self) -> OffloadWorkerMetadata | None:
        events = self.store.take_ram_events() if self.store is not None else []
        return OffloadWorkerMetadata(events) if events else None

    def shutdown(self) -> None:
        if self._role == KVConnectorRole.WORKER and self.store is not None:
            self.store.close()  # every queued block reaches its tiers

    # ---- scheduler side -----------------------------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int, bool]:
        start = num_computed_tokens // self.block_size
        end = min((request.num_tokens - 1) // self.block_size, len(request.block_hashes))
        keys = []
        for i in range(start, end):
            key = bytes(request.block_hashes[i])
            if not self._has(key):
                break
            keys.append(key)
        self._stats.add({"lookup_tokens": max(request.num_tokens - num_computed_tokens, 0),
                         "hit_tokens": len(keys) * self.block_size})
        if keys:
            self._hits[request.request_id] = (start, keys)
        else:
            self._hits.pop(request.request_id, None)
        return len(keys) * self.block_size, False

    def _has(self, key: bytes) -> bool:
        if self._in_ram[key] >= len(self.namespaces):
            return True
        return bool(self.disks) and all(key in disk for disk in self.disks)

    def update_state_after_alloc(self, request: "Request", blocks, num_external_tokens: int) -> None:
        start, keys = self._hits.pop(request.request_id, (0, []))
        loaded = num_external_tokens // self.block_size
        block_ids = blocks.get_block_ids()[0]
        self._loads.extend((block_ids[start + i], keys[i]) for i in range(min(loaded, len(keys))))
        self._tracked[request.request_id] = _Tracked(request, start + loaded)

    def update_connector_output(self, connector_output: "KVConnectorOutput") -> None:
        meta = connector_output.kv_connector_worker_meta
        if not isinstance(meta, OffloadWorkerMetadata):
            return
        for key, present in meta.ram_events:
            self._in_ram[key] += 1 if present else -1
            if self._in_ram[key] <= 0:
                del self._in_ram[key]

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> OffloadMetadata:
        meta, self._loads = OffloadMetadata(loads=self._loads), []
        for req_id in scheduler_output.preempted_req_ids or ():
            self._tracked.pop(req_id, None)  # its blocks are gone; tracked again when it is scheduled again
        for req_id, n in scheduler_output.num_scheduled_tokens.items():
            tracked = self._tracked.get(req_id)
            if tracked is not None:
                meta.saves.extend(self._completed_blocks(tracked, n))
        return meta

    def _completed_blocks(self, tracked: _Tracked, num_scheduled: int) -> list[tuple[int, bytes]]:
        """Blocks of the request that this step's tokens complete, that vLLM's prefix cache holds (vLLM caches a
        block when it schedules the tokens completing it) and that the tier lacks; advances the request's
        cursor."""
        request = tracked.request
        end = min((request.num_computed_tokens + num_scheduled) // self.block_size, len(request.block_hashes))
        if end <= tracked.next_block:
            return []
        blocks = self._kv_cache_manager.get_blocks(request.request_id).blocks[0]
        saves = []
        for i in range(tracked.next_block, end):
            key = bytes(request.block_hashes[i])
            if blocks[i].block_hash is not None and not self._has(key):
                saves.append((blocks[i].block_id, key))
        tracked.next_block = end
        return saves

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._tracked.pop(request.request_id, None)
        self._hits.pop(request.request_id, None)
        return False, None


def _bytes(cache: torch.Tensor) -> torch.Tensor:
    """A layer's pages as uint8 ``[num_blocks, H_kv, block_size, row_bytes]``."""
    return cache if cache.dtype == torch.uint8 else cache.view(torch.uint8)


def _layer_pages(cache: torch.Tensor, fmt) -> LayerPages:
    _, heads, block_size, row_bytes = _bytes(cache).shape
    return LayerPages(heads, block_size, row_bytes, fmt.k_scale_offset if fmt is not None else 0)
