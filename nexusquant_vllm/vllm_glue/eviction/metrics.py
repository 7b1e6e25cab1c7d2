"""Eviction stats through vLLM's KV-connector stats channel: the engine's periodic log line and Prometheus metrics.

The scheduler half of the connector records one entry per eviction decision (:meth:`EvictionStats.record`) and hands
the interval's entries to vLLM from ``get_kv_connector_stats`` (vllm/v1/core/sched/scheduler.py:2342 in 0.32). vLLM
ships them (a plain dict of lists, so it survives the engine-core -> front-end IPC) in ``SchedulerStats`` to its stat
loggers when stats are on (the server default; ``LLM(..., disable_log_stats=False)`` offline):

* the logging stat logger prints ``KV Transfer metrics: requests=.., tokens_evicted=.., blocks_freed=..`` every
  log interval (:meth:`EvictionStats.reduce`);
* the Prometheus stat logger registers :class:`EvictionPromMetrics`, so ``/metrics`` of ``vllm serve`` shows, per
  request, the histograms ``vllm:nq_eviction_tokens_evicted``, ``vllm:nq_eviction_blocks_freed`` and
  ``vllm:nq_eviction_evicted_fraction`` (their ``_sum`` and ``_count`` are the totals and the number of requests),
  and the gauges ``vllm:nq_eviction_tracked_requests`` and ``vllm:nq_eviction_pending_compactions``: the entries
  the connector holds per request (scheduler states; compaction scores kept by the workers until the scheduler's
  decision). Both return to 0 once no request runs; the soak checks that they do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats
from vllm.v1.metrics.utils import create_metric_per_engine

FIELDS = ("prompt_tokens", "tokens_evicted", "blocks_freed")
GAUGES = ("tracked_requests", "pending_compactions")
TOKEN_BUCKETS = [0, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072]
BLOCK_BUCKETS = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
FRACTION_BUCKETS = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


@dataclass
class EvictionStats(KVConnectorStats):
    """``data``: one list per field of :data:`FIELDS`, one entry per eviction decision of the interval, and per
    gauge of :data:`GAUGES` its latest value (absent: unchanged)."""

    def __post_init__(self) -> None:
        if not self.data:
            self.reset()

    def reset(self) -> None:
        self.data = {name: [] for name in FIELDS}

    def record(self, stats: dict[str, Any]) -> None:
        for name in FIELDS:
            self.data[name].append(int(stats[name]))

    def set_gauges(self, **values: int) -> None:
        self.data.update(values)

    def aggregate(self, other: KVConnectorStats) -> "EvictionStats":
        for name in FIELDS:
            self.data[name].extend(other.data.get(name, ()))
        self.data.update({name: other.data[name] for name in GAUGES if name in other.data})  # the later value
        return self

    def reduce(self) -> dict[str, int | float]:
        gauges = {name: self.data[name] for name in GAUGES if name in self.data}
        return {"requests": len(self.data["prompt_tokens"]), **{name: sum(self.data[name]) for name in FIELDS},
                **gauges}

    def is_empty(self) -> bool:
        return not self.data["prompt_tokens"] and not any(name in self.data for name in GAUGES)


class EvictionPromMetrics(KVConnectorPromMetrics):
    """Per-request histograms of tokens evicted, blocks freed and the fraction of the prompt evicted; the gauges
    of the connector's per-request entries."""

    def __init__(self, vllm_config, metric_types, labelnames: list[str], per_engine_labelvalues: dict[int, list]):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._histograms = {
            "tokens_evicted": self._histogram("tokens_evicted", "Prompt tokens evicted per request.", TOKEN_BUCKETS),
            "blocks_freed": self._histogram(
                "blocks_freed", "KV blocks returned to the block pool per request by eviction.", BLOCK_BUCKETS
            ),
            "evicted_fraction": self._histogram(
                "evicted_fraction", "Fraction of the prompt's tokens evicted per request.", FRACTION_BUCKETS
            ),
        }
        self._gauges = {
            "tracked_requests": self._gauge(
                "tracked_requests", "Requests the eviction connector's scheduler half keeps a state for."
            ),
            "pending_compactions": self._gauge(
                "pending_compactions", "Requests whose compaction scores the workers keep until the decision."
            ),
        }

    def _gauge(self, name: str, documentation: str) -> dict[int, Any]:
        metric = self._gauge_cls(
            name=f"vllm:nq_eviction_{name}", documentation=documentation, labelnames=self._labelnames,
            multiprocess_mode="mostrecent",
        )
        return create_metric_per_engine(metric, self.per_engine_labelvalues)

    def _histogram(self, name: str, documentation: str, buckets: list[float]) -> dict[int, Any]:
        metric = self._histogram_cls(
            name=f"vllm:nq_eviction_{name}", documentation=documentation, labelnames=self._labelnames, buckets=buckets
        )
        return create_metric_per_engine(metric, self.per_engine_labelvalues)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for prompt, evicted, freed in zip(*(transfer_stats_data.get(name, ()) for name in FIELDS)):
            self._histograms["tokens_evicted"][engine_idx].observe(evicted)
            self._histograms["blocks_freed"][engine_idx].observe(freed)
            self._histograms["evicted_fraction"][engine_idx].observe(evicted / prompt if prompt else 0.0)
        for name, gauge in self._gauges.items():
            if name in transfer_stats_data:
                gauge[engine_idx].set(transfer_stats_data[name])
