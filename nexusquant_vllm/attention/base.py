"""What every attention path is: a step's batch in, a store and an attend over one layer's pages out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

from nexusquant_vllm.attention.pages import Pages


@dataclass
class StepBatch:
    """One step's batch as vLLM describes it, trimmed to the real requests (vLLM's own tensors, not copies)."""

    query_start_loc: torch.Tensor  # int32 [R + 1], on the device
    query_start_loc_cpu: torch.Tensor  # [R + 1], on the host
    seq_lens: torch.Tensor  # int32 [R]: cached + scheduled tokens, on the device
    seq_lens_cpu: torch.Tensor | None  # [R] on the host when vLLM has them without a sync, else None
    block_table: torch.Tensor  # int32 [R, max_blocks]
    max_query_len: int
    max_seq_len: int
    block_size: int


class AttentionPath(Protocol):
    """One implementation of the store and the attention over one layer's pages (see ``attention/__init__.py``).

    ``plan`` runs once per step and KV-cache group (its result is shared by every layer of the group, E8 and
    protected alike); ``store`` and ``attend`` run per layer. ``key``/``value``/``query``/``out`` are in the model's
    domain: a path over rotated pages rotates inside.
    """

    name: ClassVar[str]
    pages: Pages
    scale: float
    window: int | None  # a sliding-window layer's window: query position p sees key positions k with p - k < window
    softcap: float | None  # logit soft-capping: each scaled score s becomes softcap * tanh(s / softcap)

    @staticmethod
    def plan(batch: StepBatch) -> object: ...

    def store(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
              ) -> None:
        """Write ``[T, Hk, D]`` K/V into ``kv_cache`` at ``slot_mapping`` (slot -1: padding, skipped)."""

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
               plan: object, out: torch.Tensor) -> None:
        """``query`` ``[T, Hq, D]`` over the cached pages plus this step's raw ``key``/``value``; writes ``out``."""
