"""The native CPU path: the C++ kernels of ``csrc/`` where they apply, the torch path for the rest.

* **Store** of E8 pages: one native call per layer (rotate, code, pack, write the slots in place). Dense pages
  (protected layers) are written by torch.
* **Decode rows** (one query token per request), E8 and dense pages: native paged decode attention, which reads
  the codes in place. In a decode-only step over E8 pages the kernel also applies the codec's rotation to q and
  the new K/V and its inverse to the output, sparing three small torch matmuls per layer (each wakes torch's
  thread pool, which costs more than the attention itself on a small CPU).
* **Prefill rows** (first and continuation chunks): ``paged.attend``, as the torch path.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from nexusquant_vllm import native
from nexusquant_vllm.attention.paged import RequestGroup
from nexusquant_vllm.attention.torch_path import TorchPath


class NativeCpuPath(TorchPath):
    name: ClassVar[str] = "native-cpu"

    def store(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
              ) -> None:
        if self.pages.rotated:
            native.store_kv(key, value, kv_cache, slot_mapping, self.pages.fmt)
        else:
            super().store(key, value, kv_cache, slot_mapping)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
               plan: list[RequestGroup], out: torch.Tensor) -> None:
        if self.pages.rotated and all(_is_decode(g) for g in plan):
            self._decode_rows(query, key, value, kv_cache, plan, out, rotate=True)
            return
        super().attend(query, key, value, kv_cache, plan, out)

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                groups: list[RequestGroup], out: torch.Tensor) -> None:
        rest = self._decode_rows(query, key, value, kv_cache, groups, out, rotate=False)
        super()._attend(query, key, value, kv_cache, rest, out)

    def _decode_rows(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                     groups: list[RequestGroup], out: torch.Tensor, rotate: bool) -> list[RequestGroup]:
        """Decode rows through the native kernel; returns the groups left. Tensors are in the pages' domain, or in
        the model's with ``rotate``."""
        for grp in filter(_is_decode, groups):
            args = (kv_cache, grp.block_ids, grp.cached_len, self.scale, self.pages.fmt, rotate)
            if grp.token_idx.shape[0] == query.shape[0]:  # the whole batch decodes: its rows are 0..n-1, in order
                out.copy_(native.decode_attention(query, key, value, *args))
            else:
                rows = grp.token_idx[:, 0]
                out[rows] = native.decode_attention(query[rows], key[rows], value[rows], *args).to(out.dtype)
        return [g for g in groups if not _is_decode(g)]


def _is_decode(group: RequestGroup) -> bool:
    return group.token_idx.shape[1] == 1
