"""Prefill-time eviction inside vLLM: free the least-attended prompt blocks back to vLLM's pool, once per request.

How to turn it on (an e8 ``--kv-cache-dtype`` is required):

* ``NEXUSQUANT_EVICTION=balanced vllm serve MODEL --kv-cache-dtype e8-k3v2 --block-size 32`` (server default; the
  variable must be set in the process that builds the engine config), or explicitly
  ``--kv-transfer-config '{"kv_connector":"NQEvictionConnector",
  "kv_connector_module_path":"nexusquant_vllm.vllm_glue.eviction.connector","kv_role":"kv_both",
  "kv_connector_extra_config":{"eviction":"balanced"}}'``; in Python
  ``LLM(..., kv_transfer_config=kv_transfer_config("balanced"))``.
* Per request: ``SamplingParams(extra_args={"nq_eviction": 0.35})`` or ``"vllm_xargs": {"nq_eviction":
  "conservative"}`` over the OpenAI API (needs the connector installed; its default may be ``lossless``).

Modules: ``params`` (rates, defaults, request validation), ``connector`` (the KV connector: decision, block freeing, worker block-table mirror, stats),
``metrics`` (the stats as vLLM KV-connector stats: engine log line and Prometheus histograms), ``rope`` (the loaded
model's RoPE tables). The scoring itself is vLLM-free: ``nexusquant_vllm.eviction.collector``.
"""

from nexusquant_vllm.vllm_glue.eviction.params import EXTRA_ARG, kv_transfer_config

__all__ = ["EXTRA_ARG", "kv_transfer_config"]
