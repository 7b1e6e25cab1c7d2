"""Triton kernels over the E8-packed paged KV cache: decode and continuation-prefill attention, the cache store.

Each kernel module sits next to its torch reference (``reference.py``); ``benchmarks/kernels_gpu.py`` times them.
Without a GPU the kernels run only under ``TRITON_INTERPRET=1``, which must be set before this package is imported
(Triton reads it when the kernels are defined).
"""

from nexusquant_vllm.kernels.decode_attention import decode_attention, default_num_splits
from nexusquant_vllm.kernels.prefill_attention import prefill_attention
from nexusquant_vllm.kernels.reference import paged_decode_attention_ref, prefill_attention_ref, store_kv_ref
from nexusquant_vllm.kernels.store import scatter_rows, store_kv

__all__ = [
    "decode_attention",
    "default_num_splits",
    "paged_decode_attention_ref",
    "prefill_attention",
    "prefill_attention_ref",
    "scatter_rows",
    "store_kv",
    "store_kv_ref",
]
