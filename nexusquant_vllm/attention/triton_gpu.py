"""The Triton path (CUDA): store and attention through the fused kernels, straight from vLLM's per-step tensors.

The plan is vLLM's own device tensors (``query_start_loc``, ``seq_lens``, the block table) and two host ints it
already has (``max_query_len``, ``max_seq_len``): no per-step planning on the host, no device-to-host copy. A step
whose requests all decode one token runs the split-KV decode kernel with the current token's raw K/V merged in; any
other step runs the continuation-prefill kernel, which also serves the decode rows of a mixed batch. Both kernels
mask vLLM's null block (eviction holes) and read E8 codes or the bf16 ``[K | V]`` rows of protected layers in place.

The kernels are imported on first use: on the CPU they run only under ``TRITON_INTERPRET=1``, which Triton reads
when they are defined (``attention="triton"`` with the interpreter is how the tests drive this path without CUDA).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from nexusquant_vllm.attention.base import StepBatch
from nexusquant_vllm.attention.pages import Pages


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


@dataclass
class TritonPath:
    pages: Pages
    scale: float
    window: int | None = None  # a sliding-window layer's window (see ``AttentionPath``)
    softcap: float | None = None  # logit soft-capping (see ``AttentionPath``)

    name: ClassVar[str] = "triton"

    @staticmethod
    def plan(batch: StepBatch) -> KernelMetadata:
        return KernelMetadata(batch.query_start_loc, batch.seq_lens, batch.block_table, batch.max_query_len,
                              batch.max_seq_len)

    def store(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
              ) -> None:
        """E8-coded or bf16 rows; slot -1 is skipped on the device."""
        from nexusquant_vllm.kernels import store_kv

        store_kv(key, value, kv_cache, slot_mapping, self.pages.fmt)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
               plan: KernelMetadata, out: torch.Tensor) -> None:
        """The kernels rotate for E8 pages and un-rotate their output."""
        from nexusquant_vllm.kernels import decode_attention, prefill_attention

        fmt = self.pages.fmt
        if plan.max_query_len == 1:  # decode only: one row per request
            n = plan.num_reqs
            decode_attention(query[:n], kv_cache, plan.block_table, plan.seq_lens - 1, self.scale, fmt,
                             k_new=key[:n], v_new=value[:n], out=out[:n], max_seq_len=plan.max_seq_len,
                             window=self.window, softcap=self.softcap)
            return
        prefill_attention(query, key, value, kv_cache, plan.block_table, plan.query_start_loc, plan.seq_lens,
                          self.scale, fmt, out=out, max_query_len=plan.max_query_len, window=self.window,
                          softcap=self.softcap)
