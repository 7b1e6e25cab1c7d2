"""The torch path: the codec's torch encoder for the store and ``paged.attend`` for every row.

The reference of every other path and the fallback wherever no kernel applies (the ``scalar-*`` baselines, head
shapes the kernels do not take, ``attention="torch"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from nexusquant_vllm.attention.base import StepBatch
from nexusquant_vllm.attention.pages import Pages
from nexusquant_vllm.attention.paged import RequestGroup, attend, plan_groups


@dataclass
class TorchPath:
    pages: Pages
    scale: float
    window: int | None = None  # a sliding-window layer's window (query position p sees keys k with p - k < window)
    softcap: float | None = None  # logit soft-capping (Gemma 2): each scaled score s -> softcap * tanh(s / softcap)

    name: ClassVar[str] = "torch"

    @staticmethod
    def plan(batch: StepBatch) -> list[RequestGroup]:
        """At most two padded request groups (decode rows, prefill rows), built on the host."""
        seq_lens = batch.seq_lens_cpu if batch.seq_lens_cpu is not None else batch.seq_lens.cpu()
        return plan_groups(batch.query_start_loc_cpu, seq_lens, batch.block_table, batch.block_size,
                           batch.block_table.device)

    def store(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
              ) -> None:
        valid = slot_mapping >= 0  # padding tokens carry slot -1
        if not bool(valid.all()):
            key, value, slot_mapping = key[valid], value[valid], slot_mapping[valid]
        block_size = kv_cache.shape[2]
        blk = torch.div(slot_mapping, block_size, rounding_mode="floor")
        kv_cache[blk, :, slot_mapping % block_size] = self.pages.encode(key, value, kv_cache)

    def attend(self, query: torch.Tensor, key: torch.Tensor | None, value: torch.Tensor | None,
               kv_cache: torch.Tensor, plan: list[RequestGroup], out: torch.Tensor) -> None:
        """Over rotated pages, scores and P @ V run in the rotated domain (the rotation is orthogonal): this step's
        q and raw K/V are rotated once and the output un-rotated once; the cached pages are never un-rotated. A step
        in which no request reads a page (first prefill chunks only) needs no rotation at all.
        ``key`` None: no raw tokens (see ``paged.attend``)."""
        if not self.pages.rotated or all(grp.num_ctx_blocks == 0 for grp in plan):
            self._attend(query, key, value, kv_cache, plan, out)
            return
        work = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
        q, k, v = (None if t is None else self.pages.to_pages(t) for t in (query, key, value))
        self._attend(q, k, v, kv_cache, plan, work)
        out.copy_(self.pages.to_model(work))

    def _attend(self, query: torch.Tensor, key: torch.Tensor | None, value: torch.Tensor | None,
                kv_cache: torch.Tensor, groups: list[RequestGroup], out: torch.Tensor) -> None:
        """Attention in the pages' domain."""
        attend(query, key, value, groups, self.pages.reader(kv_cache), self.scale, out, window=self.window,
               softcap=self.softcap)
