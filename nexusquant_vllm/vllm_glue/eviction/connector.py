"""``NQEvictionConnector``: a vLLM KV connector that frees the least-attended prompt blocks right after prefill.

No KV is transferred; the connector API is used only because it is vLLM's sanctioned way to reach the scheduler's
block pool (``bind_kv_cache_manager``) and to exchange per-step messages between scheduler and workers
(see docs/vllm-integration-notes.md, section 5.2). Once per request:

1. **Worker, prefill step.** In the step that computes a request's last prompt tokens (or, with the per-request
   ``nq_eviction_at`` = N, its first N prompt tokens; see :mod:`.params`), the attention backend hands
   every layer's queries, keys and values to the connector's :class:`~nexusquant_vllm.eviction.collector.ScoreCollector`
   (the layers' observer, attached in ``register_kv_caches``), which sums SnapKV-style window scores over layers and
   keeps, per layer, expected-attention scores per KV head. ``build_connector_worker_meta``
   ships ``{req_id: token scores}`` to the scheduler.
2. **Scheduler, next step.** ``update_connector_output`` stores the scores; ``build_connector_meta`` picks the whole
   logical blocks to free (:func:`nexusquant_vllm.eviction.blocks_to_free`; the first block, the recent window, the
   user's protected ranges and blocks shared with other requests are kept), replaces them with vLLM's null block in
   ``req_to_blocks``, returns them to the pool (the free-block count rises by exactly that many) and sends
   ``{req_id: [logical block indices]}`` to the workers, with the other eligible blocks, which the compaction
   rewrites (they leave the prefix cache).
3. **Worker, same step**, before the forward pass. Compaction
   (:mod:`nexusquant_vllm.eviction.compaction`, on unless ``kv_connector_extra_config["compaction"]`` is false or
   the model's RoPE is not a plain table): in every layer, each KV head's best tokens of the eligible span are
   written into the kept eligible blocks, so each layer and head keeps its own tokens while the freed blocks are the
   same everywhere. Then, since vLLM's worker block table is append-only for running requests, the null-outs are
   mirrored into the persistent batch and into ``requests[req_id].block_ids`` (after
   ``GPUModelRunner._update_states``: ``compat.wrap_update_states``, installed only when this connector runs). The backend masks block 0 with -inf
   in every layer, so the holes are never attended.

Engine life: a preempted request's eviction is reset and redone after its re-prefill; aborts free every block
(the null entries are skipped by the pool); after an eviction no further block of the request enters the prefix
cache (its later KV was computed over holes) and the compacted blocks leave it, while the blocks freed with their
hash stay valid prefix-cache entries (their KV was computed over the full context and the compaction only reads
them). So a next chat turn that resends the conversation hits the prefix cache up to the first compacted block;
with ``compaction`` off it hits every full prompt block. Per-request stats go to the log, to
``RequestOutput.kv_transfer_params["nq_eviction"]`` (also in the OpenAI completion response's ``kv_transfer_params``)
and to vLLM's stat loggers and Prometheus ``/metrics`` (:mod:`.metrics`).

Tensor and pipeline parallelism: in every layer, the tensor-parallel group reduces its ranks' per-token scores
(the mean or the max over all query heads: ``compat.tensor_parallel_reduce``, one all-reduce per layer in the
scoring step), and the group's first rank sends them; vLLM's executor gathers every worker's metadata each step and
:meth:`EvictionWorkerMetadata.aggregate` sums the pipeline stages' layers. So the scheduler decides once from the
scores one rank would compute over all heads and layers, and every rank applies the same null-outs (each records
them in ``applied``); compaction stays local (a rank's own layers and heads). Under PP the engine keeps one batch
per stage in flight, so prompt chunks scheduled before the scores arrive are computed over the whole cache
(``computed_before_eviction``).

Requires an e8 ``--kv-cache-dtype`` (only the nexusquant backend masks holes) and a single KV-cache group.
"""

from __future__ import annotations

import sys
from collections import deque
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.logger import init_logger

from nexusquant_vllm.attention.paged import NULL_BLOCK_ID
from nexusquant_vllm.dtypes import is_served
from nexusquant_vllm.eviction import EvictionPolicy, WindowAttentionScorer, blocks_to_free, heads_for_rate
from nexusquant_vllm.eviction.collector import ExpectedAttentionHeads, ScoreCollector, ScoredRequest
from nexusquant_vllm.eviction.policy import eligible_blocks
from nexusquant_vllm.vllm_glue import compat
from nexusquant_vllm.vllm_glue.eviction import params
from nexusquant_vllm.vllm_glue.eviction.metrics import EvictionPromMetrics, EvictionStats
from nexusquant_vllm.vllm_glue.eviction.rope import rope_of

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = init_logger("vllm.nexusquant.eviction")

STATS_KEY = "nq_eviction"
EVENTS_KEPT = 1024  # bounded: a server evicts for as long as it runs


@dataclass
class EvictionMetadata(KVConnectorMetadata):
    """Scheduler -> workers, every step: per request decided this step, the logical blocks nulled (possibly none)
    and the kept blocks its compaction may rewrite (none: no compaction)."""

    evicted: dict[str, list[int]] = field(default_factory=dict)
    compact: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class EvictionWorkerMetadata(KVConnectorWorkerMetadata):
    """Workers -> scheduler: summed token scores of requests whose prompt prefill finished this step, and how many
    requests' compaction scores the worker keeps (sent when either changed)."""

    scores: dict[str, list[float]] = field(default_factory=dict)
    pending_compactions: int = 0

    def aggregate(self, other: "EvictionWorkerMetadata") -> "EvictionWorkerMetadata":
        """Pipeline stages each score their own layers (one rank per stage sends them; its tensor-parallel group
        reduced the heads): add them up."""
        merged = dict(self.scores)
        for req_id, s in other.scores.items():
            merged[req_id] = [a + b for a, b in zip(merged[req_id], s)] if req_id in merged else s
        return EvictionWorkerMetadata(merged, max(self.pending_compactions, other.pending_compactions))


@dataclass
class _RequestState:
    request: "Request"
    policy: EvictionPolicy
    evict_at: int  # prompt tokens computed before the eviction fires (the whole prompt unless nq_eviction_at)
    scores: torch.Tensor | None = None
    stats: dict[str, Any] | None = None  # set once evicted (possibly with 0 blocks)


class NQEvictionConnector(KVConnectorBase_V1):
    """See the module docstring. ``kv_connector_extra_config``: ``eviction`` (server default rate or preset,
    default ``lossless``), ``min_prompt_tokens`` (512), ``recent_tokens`` (32), ``window`` (32), ``compaction``
    (true), ``fact_guard`` (0.125)."""

    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config, role, kv_cache_config)
        dtype = vllm_config.cache_config.cache_dtype
        if not is_served(dtype):
            raise ValueError(
                f"nexusquant eviction needs an e8 --kv-cache-dtype (e.g. e8-k3v2), got {dtype!r}: only the "
                "nexusquant attention backend masks the freed blocks"
            )
        groups = len(kv_cache_config.kv_cache_groups) if kv_cache_config is not None else 1
        if groups != 1:
            raise ValueError(
                f"nexusquant eviction supports models with one KV-cache group; this one has {groups} (e.g. layers "
                "with different attention types or window sizes): run it without the eviction connector"
            )
        extra = self._kv_transfer_config.kv_connector_extra_config
        self.default_policy = params.server_policy(extra)
        self.block_size = vllm_config.cache_config.block_size
        self.compaction = params.compaction(extra)
        if role == KVConnectorRole.WORKER:
            window = int(extra.get(params.WINDOW_KEY, 32))
            self.collector = ScoreCollector(WindowAttentionScorer(window=window),
                                            across_ranks=compat.tensor_parallel_reduce,
                                            guard_share=params.fact_guard(extra))
            self._sends_scores: bool | None = None  # the first rank of its tensor-parallel group (set on first use)
            self._rope_looked_up = False
            self._pending_sent = 0
            # the evictions this worker applied (its rank's heads or layers), for tests: every rank gets the same
            self.applied: deque[dict[str, Any]] = deque(maxlen=EVENTS_KEPT)
            compat.wrap_update_states(_on_update_states)
        else:
            self._requests: dict[str, _RequestState] = {}
            self._interval_stats = EvictionStats()
            self._worker_pending = 0
            self._gauges_sent: dict[str, int] = {}
            self.events: deque[dict[str, Any]] = deque(maxlen=EVENTS_KEPT)  # the latest evictions, for tests
        logger.info("nexusquant eviction connector (%s): server default %s", role.name, self.default_policy)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # nothing is handed off: a preempted request is simply recomputed

    # ---- stats (vLLM's stat loggers and Prometheus; see metrics.py) -----------------------------------------------

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> EvictionStats:
        return EvictionStats(data=data or {})

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues) -> EvictionPromMetrics:
        return EvictionPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def get_kv_connector_stats(self) -> EvictionStats | None:
        """Scheduler: the eviction decisions since the last call (vLLM calls it every step) and the per-request
        entry counts if they changed; workers have none."""
        if self._role != KVConnectorRole.SCHEDULER:
            return None
        gauges = {"tracked_requests": len(self._requests), "pending_compactions": self._worker_pending}
        if gauges != self._gauges_sent:
            self._interval_stats.set_gauges(**gauges)
            self._gauges_sent = gauges
        if self._interval_stats.is_empty():
            return None
        stats, self._interval_stats = self._interval_stats, EvictionStats()
        return stats

    # ---- worker side ------------------------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Once the worker's caches exist: make the collector the observer of every nexusquant attention layer."""
        for layer in compat.attention_layers(self._vllm_config).values():
            if hasattr(layer.impl, "observer"):
                layer.impl.observer = self.collector

    def start_load_kv(self, forward_context, **kwargs) -> None:
        return

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs) -> None:
        return

    def wait_for_save(self) -> None:
        return

    def build_connector_worker_meta(self) -> EvictionWorkerMetadata | None:
        """This step's scores (the tensor-parallel group reduced its heads already, so only its first rank sends
        them) and the number of compactions waiting for a decision."""
        if self._sends_scores is None:
            rank, _ = compat.parallel_rank(self._vllm_config)
            self._sends_scores = rank % self._vllm_config.parallel_config.tensor_parallel_size == 0
        taken, pending = self.collector.take(), len(self.collector.compactions)
        if not self._sends_scores:
            taken = {}
        if not taken and pending == self._pending_sent:
            return None
        self._pending_sent = pending
        return EvictionWorkerMetadata({rid: s.tolist() for rid, s in taken.items()}, pending)

    def on_update_states(self, runner, scheduler_output: "SchedulerOutput") -> None:
        """After vLLM's ``_update_states``: compact and mirror this step's evictions, then plan this step's scoring."""
        if self.compaction and not self._rope_looked_up:
            self._use_model_rope(runner)
        meta = scheduler_output.kv_connector_metadata
        if isinstance(meta, EvictionMetadata):
            for req_id, idx in meta.evicted.items():
                targets = meta.compact.get(req_id)
                state = runner.requests.get(req_id)
                if targets and state is not None:  # before the null-out: the freed blocks are read
                    self.collector.compact(req_id, list(state.block_ids[0]), sorted(idx + targets), targets)
                _null_out_worker_blocks(runner, req_id, idx)
                self.applied.append({"req_id": req_id, "blocks": list(idx), "compacted": list(targets or ())})
            self.collector.drop(meta.evicted)
        self.collector.drop(scheduler_output.finished_req_ids)
        self.collector.drop(scheduler_output.preempted_req_ids or ())
        self.collector.plan_step(self._plan(runner, scheduler_output))

    def _use_model_rope(self, runner) -> None:
        """Compact with the model's RoPE tables (looked up once); without them (no plain RoPE found) nothing is
        compacted."""
        self._rope_looked_up = True
        rope = rope_of(runner.model)
        if rope is None:
            logger.warning("nexusquant eviction: no plain RoPE table found in %s; evicting whole blocks without "
                           "per-head compaction", type(runner.model).__name__)
            self.compaction = False
            return
        self.collector.head_scorer = ExpectedAttentionHeads(rope)

    def _plan(self, runner, scheduler_output: "SchedulerOutput") -> list[ScoredRequest]:
        batch = runner.input_batch
        plan, start = [], 0
        for row, req_id in enumerate(batch.req_ids):
            n_sched = scheduler_output.num_scheduled_tokens.get(req_id, 0)
            state = runner.requests[req_id]
            cached, point = int(batch.num_computed_tokens_cpu[row]), self._eviction_point(state)
            if point is not None and cached < point[0] <= cached + n_sched:
                evict_at, rate = point
                plan.append(ScoredRequest(req_id, start, cached, evict_at, list(state.block_ids[0]),
                                                 self.block_size, heads_for_rate(rate)))
            start += n_sched
        return plan

    def _eviction_point(self, state) -> tuple[int, float] | None:
        """The prompt tokens to score and evict among and the request's rate, or None if it evicts nothing."""
        return params.request_eviction(self.default_policy, state.sampling_params, state.num_prompt_tokens)

    # ---- scheduler side ---------------------------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int, bool]:
        return 0, False

    def update_state_after_alloc(self, request: "Request", blocks, num_external_tokens: int) -> None:
        if request.request_id in self._requests:
            return
        extra_args = request.sampling_params.extra_args if request.sampling_params is not None else None
        evict_at = request.num_prompt_tokens
        try:
            policy = params.request_policy(self.default_policy, extra_args)
            evict_at = params.eviction_point(extra_args, evict_at)
        except ValueError as e:  # refused at request construction already; never crash the engine core
            logger.error("request %s: %s; not evicting", request.request_id, e)
            policy = replace(self.default_policy, rate=0.0)
        self._requests[request.request_id] = _RequestState(request, policy, evict_at)

    def update_connector_output(self, connector_output: "KVConnectorOutput") -> None:
        meta = connector_output.kv_connector_worker_meta
        if not isinstance(meta, EvictionWorkerMetadata):
            return
        self._worker_pending = meta.pending_compactions
        for req_id, s in meta.scores.items():
            state = self._requests.get(req_id)
            if state is not None and state.stats is None:
                state.scores = torch.tensor(s, dtype=torch.float32)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> EvictionMetadata:
        for req_id in scheduler_output.preempted_req_ids or ():
            state = self._requests.get(req_id)
            if state is not None:  # its blocks are all gone; evict again after the re-prefill
                state.scores, state.stats = None, None
        meta = EvictionMetadata()
        for req_id, state in self._requests.items():
            if state.scores is None or state.stats is not None or req_id in (scheduler_output.preempted_req_ids or ()):
                continue
            if state.request.num_computed_tokens < state.evict_at:
                continue  # stale scores of a preempted run; new ones come with the re-prefill
            meta.evicted[req_id], targets = self._evict(state)
            if targets:
                meta.compact[req_id] = targets
        return meta

    def _evict(self, state: _RequestState) -> tuple[list[int], list[int]]:
        """Free the request's blocks; returns the freed logical blocks and the kept ones its compaction rewrites."""
        request, bs = state.request, self.block_size
        manager = self._kv_cache_manager
        stm, pool = manager.coordinator.single_type_managers[0], manager.block_pool  # one group: checked at start
        blocks = stm.req_to_blocks[request.request_id]
        num_scored = state.evict_at
        scores_ = state.scores[:num_scored]
        state.scores = None
        # Blocks shared with another request (prefix-cache hits) free nothing: keep them, like nulls.
        keep = tuple((i * bs, (i + 1) * bs) for i, b in enumerate(blocks[: num_scored // bs]) if b.is_null or b.ref_cnt > 1)
        policy = replace(state.policy, protected=state.policy.protected + keep)
        idx = blocks_to_free(scores_, bs, policy)
        targets = sorted(set(eligible_blocks(num_scored, bs, policy)) - set(idx)) if idx and self.compaction else []
        free_before = pool.get_num_free_blocks()
        freed = [blocks[i] for i in idx]
        for i in idx:
            blocks[i] = pool.null_block
        pool.free_blocks(freed)
        num_freed = pool.get_num_free_blocks() - free_before
        if idx and manager.enable_caching:
            # Later KV of this request is computed over holes: never serve it as a prefix hit. Stop caching new
            # blocks, and uncache those already cached past the prompt's full blocks (a block completed by the
            # first decode token in this very schedule) and the compacted ones (no longer what their hash says).
            stm.num_cached_block[request.request_id] = sys.maxsize
            rewritten = [blocks[i] for i in targets] + blocks[num_scored // bs :]
            pool.evict_blocks({b.block_id for b in rewritten if not b.is_null and b.block_hash})
        evicted_tokens, num_prompt = len(idx) * bs, request.num_prompt_tokens
        state.stats = {
            "prompt_tokens": num_prompt, "tokens_evicted": evicted_tokens, "tokens_kept": num_prompt - evicted_tokens,
            "blocks_freed": num_freed, "blocks_compacted": len(targets), "rate": state.policy.rate,
            "evicted_at": num_scored,
            # tokens computed over the full cache; > evicted_at if the eviction point fell inside a prefill chunk
            "computed_before_eviction": request.num_computed_tokens,
        }
        self._interval_stats.record(state.stats)
        self.events.append({"req_id": request.request_id, "blocks": list(idx), "compacted": targets, **state.stats})
        logger.info("nexusquant eviction: request %s: %d/%d prompt tokens evicted (rate %.2f, decided after %d), "
                    "%d blocks freed %s", request.request_id, evicted_tokens, num_prompt, state.policy.rate,
                    num_scored, num_freed, list(idx))
        return idx, targets

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        state = self._requests.pop(request.request_id, None)
        if state is None or state.stats is None:
            return False, None
        return False, {STATS_KEY: dict(state.stats)}


# ---- the worker-side step hook ----------------------------------------------------------------------------------


def _on_update_states(runner, scheduler_output: "SchedulerOutput") -> None:
    """After vLLM's ``_update_states`` (``compat.wrap_update_states``): hand the step to this process's eviction
    connector, if it is one (a no-op for runs without it)."""
    connector = compat.kv_connector(NQEvictionConnector)
    if connector is not None:
        connector.on_update_states(runner, scheduler_output)


def _null_out_worker_blocks(runner, req_id: str, idx: list[int]) -> None:
    """Mirror the scheduler's null-outs: the persistent batch row (what this step's attention reads) and the
    request's ``block_ids`` (what the row is rebuilt from when the request re-enters the batch)."""
    state = runner.requests.get(req_id)
    if state is None:
        return
    row = runner.input_batch.req_id_to_index.get(req_id)
    for group, ids in enumerate(state.block_ids):
        for i in idx:
            ids[i] = NULL_BLOCK_ID
        if row is not None:
            runner.input_batch.block_table.block_tables[group].block_table.np[row, idx] = NULL_BLOCK_ID
