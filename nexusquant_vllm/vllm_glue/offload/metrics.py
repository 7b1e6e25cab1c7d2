"""Offload-tier stats through vLLM's KV-connector stats channel: the engine's log line and Prometheus counters.

Both halves of the connector report counters: the scheduler its prefix lookups (``lookup_tokens`` asked,
``hit_tokens`` found in the tier), the workers what their store did (hits, misses and bytes read per tier, records
rejected, blocks saved with their raw and stored bytes, saves dropped because saving fell behind). vLLM adds them up
(:meth:`OffloadStats.aggregate`), prints ``KV Transfer metrics: ram_hits=.., disk_hits=.., ...`` every log interval
and, on ``/metrics`` of ``vllm serve``, the counters ``vllm:nq_offload_<name>_total``.
"""

from __future__ import annotations

from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats
from vllm.v1.metrics.utils import create_metric_per_engine

COUNTERS = {
    "lookup_tokens": "Prompt tokens looked up in the tier (beyond the local prefix cache).",
    "hit_tokens": "Prompt tokens found in the tier and loaded instead of computed.",
    "ram_hits": "Blocks loaded from the RAM tier.",
    "disk_hits": "Blocks loaded from the disk tier.",
    "misses": "Blocks the scheduler expected that no tier could supply (recomputed).",
    "bad_records": "Records rejected by their checks (truncated, corrupted, foreign, stale) and deleted.",
    "ram_bytes_read": "Record bytes read from the RAM tier.",
    "disk_bytes_read": "Record bytes read from the disk tier.",
    "blocks_saved": "Blocks encoded and saved.",
    "raw_bytes": "Page bytes of the saved blocks.",
    "record_bytes": "Record bytes of the saved blocks (after transforms and zstd).",
    "disk_bytes_written": "Record bytes written to the disk tier.",
    "saves_dropped": "Blocks not saved because saving fell behind.",
    "saves_failed": "Blocks not saved because of an error.",
}


class OffloadStats(KVConnectorStats):
    """``data``: counter name -> count over the interval (absent: 0)."""

    def reset(self) -> None:
        self.data = {}

    def add(self, counts: dict[str, int]) -> None:
        for name, count in counts.items():
            if count:
                self.data[name] = self.data.get(name, 0) + int(count)

    def aggregate(self, other: KVConnectorStats) -> "OffloadStats":
        self.add(other.data)
        return self

    def reduce(self) -> dict[str, int | float]:
        return {name: self.data.get(name, 0) for name in COUNTERS}

    def is_empty(self) -> bool:
        return not self.data


class OffloadPromMetrics(KVConnectorPromMetrics):
    """One Prometheus counter per entry of :data:`COUNTERS`."""

    def __init__(self, vllm_config, metric_types, labelnames: list[str], per_engine_labelvalues: dict[int, list]):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters = {
            name: create_metric_per_engine(
                self._counter_cls(name=f"vllm:nq_offload_{name}", documentation=doc, labelnames=self._labelnames),
                self.per_engine_labelvalues,
            )
            for name, doc in COUNTERS.items()
        }

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for name, count in transfer_stats_data.items():
            if name in self._counters and count:
                self._counters[name][engine_idx].inc(count)
