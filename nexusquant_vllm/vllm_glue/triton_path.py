"""The backend's GPU path: store and attention through the Triton kernels, straight from vLLM's per-step tensors.

On CUDA the metadata builder hands the kernels vLLM's own device tensors (``query_start_loc``, ``seq_lens``, the
block table) and two host ints it already has (``max_query_len``, ``max_seq_len``): no per-step planning on the
host, no device-to-host copy. A step whose requests all decode one token runs the split-KV decode kernel with the
current token's raw K/V merged in; any other step runs the continuation-prefill kernel, which also serves the
decode rows of a mixed batch. Both kernels mask vLLM's null block (eviction holes) and read E8 codes or the bf16
``[K | V]`` rows of protected layers in place.

No vLLM import (the kernels' tests drive this module on the CPU under ``TRITON_INTERPRET=1``). ``NEXUSQUANT_ATTENTION
=torch`` in the environment keeps a CUDA run on the torch path (``paged_attention.attend``), for comparison;
``NEXUSQUANT_ATTENTION=triton`` with ``TRITON_INTERPRET=1`` puts a CPU run on this path (slow; for tests).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from nexusquant_vllm.codec.format import KVFormat

ATTENTION_ENV = "NEXUSQUANT_ATTENTION"


@dataclass
class KernelMetadata:
    """One step's batch as the kernels read it (device tensors; vLLM's own, not copies)."""

    query_start_loc: torch.Tensor  # int32 [R + 1]
    seq_lens: torch.Tensor  # int32 [R]: cached + scheduled tokens
    block_table: torch.Tensor  # int32 [R, max_blocks]
    max_query_len: int
    max_seq_len: int

    @property
    def num_reqs(self) -> int:
        return self.seq_lens.shape[0]


def supports(head_dim: int) -> bool:
    """The kernels' shape limits (power-of-two head_dim in 16..256)."""
    return 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0


def enabled(device: torch.device, head_dim: int) -> bool:
    """Use this path: a head_dim the kernels support, on a CUDA device unless ``NEXUSQUANT_ATTENTION=torch``, or on
    the CPU under ``TRITON_INTERPRET=1`` when ``NEXUSQUANT_ATTENTION=triton`` asks for it (tests of the wiring)."""
    choice = os.environ.get(ATTENTION_ENV, "auto")
    if device.type == "cuda":
        return supports(head_dim) and choice != "torch"
    return choice == "triton" and os.environ.get("TRITON_INTERPRET") == "1" and supports(head_dim)


def store(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
          fmt: KVFormat | None) -> None:
    """Write ``[T, Hk, D]`` K/V at ``slot_mapping`` (slot -1 skipped on the device): E8-coded, or bf16 rows."""
    from nexusquant_vllm.kernels import store_kv

    store_kv(key, value, kv_cache, slot_mapping, fmt)


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
              meta: KernelMetadata, scale: float, fmt: KVFormat | None, out: torch.Tensor) -> torch.Tensor:
    """Attention of this step's ``query`` ``[T, Hq, D]`` over the cached pages plus this step's raw K/V.

    ``key``/``value`` ``[T, Hk, D]`` and ``out`` ``[T, Hq, D]`` are in the model's (original) domain; the kernels
    rotate for E8 pages and un-rotate their output. Writes ``out`` and returns it.
    """
    from nexusquant_vllm.kernels import decode_attention, prefill_attention

    if meta.max_query_len == 1:  # decode only: one row per request
        n = meta.num_reqs
        return decode_attention(
            query[:n], kv_cache, meta.block_table, meta.seq_lens - 1, scale, fmt,
            k_new=key[:n], v_new=value[:n], out=out[:n], max_seq_len=meta.max_seq_len,
        )
    return prefill_attention(
        query, key, value, kv_cache, meta.block_table, meta.query_start_loc, meta.seq_lens, scale, fmt,
        out=out, max_query_len=meta.max_query_len,
    )
