"""The compressed, persistent KV tier inside vLLM: prefix hits from E8 records in host RAM and on disk.

How to turn it on (an e8 ``--kv-cache-dtype`` is required):

* ``vllm serve MODEL --kv-cache-dtype e8-k3v2 --kv-transfer-config '{"kv_connector":"NQOffloadConnector",
  "kv_role":"kv_both","kv_load_failure_policy":"recompute",
  "kv_connector_extra_config":{"ram_gb":4,"disk_dir":"/var/cache/nexusquant","disk_gb":64}}'``;
* in Python ``LLM(..., kv_transfer_config=kv_transfer_config(ram_gb=4, disk_dir="/var/cache/nexusquant"))``, and
  with eviction ``kv_transfer_config(..., eviction="balanced")`` (both connectors in vLLM's ``MultiConnector``).

Modules: ``params`` (settings, the helper, the run's namespaces), ``connector`` (lookups, loads, saves),
``metrics`` (log line and Prometheus counters). The tier itself is vLLM-free: ``nexusquant_vllm.offload``.
"""

from nexusquant_vllm.vllm_glue.offload.params import CONNECTOR_NAME, kv_transfer_config

__all__ = ["CONNECTOR_NAME", "kv_transfer_config"]
