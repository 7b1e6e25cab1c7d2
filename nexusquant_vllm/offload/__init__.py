"""A compressed, persistent KV tier, vLLM-free: E8 pages of whole blocks as zstd records in host RAM and on disk.

Modules: ``record`` (one block as a self-checking record: streams, transforms, zstd, header, checksum), ``tiers``
(the RAM tier and the disk directory, each with a byte budget and LRU), ``store`` (background saving, loading,
stats). The vLLM side (the KV connector that finds prefix hits and moves blocks) is
``nexusquant_vllm.vllm_glue.offload``.
"""

from nexusquant_vllm.offload.record import BlockLayout, LayerPages, RecordCodec, RecordError, namespace
from nexusquant_vllm.offload.store import KVTierStore
from nexusquant_vllm.offload.tiers import DiskTier, RamTier

__all__ = ["BlockLayout", "DiskTier", "KVTierStore", "LayerPages", "RamTier", "RecordCodec", "RecordError",
           "namespace"]
