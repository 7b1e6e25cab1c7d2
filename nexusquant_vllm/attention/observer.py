"""The one hook through which something outside attention (eviction scoring) sees a layer's step.

The backend calls ``observer.observe(step)`` once per layer and step, before attention, whenever
``observer.active`` (eviction's collector is active in the steps that complete a prompt that asked for eviction).
Everything in a :class:`LayerStep` is in the model's domain (post-RoPE keys, as the model computed them), whatever
the layer's pages hold and whichever path attends over them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from nexusquant_vllm.attention.paged import PageReader


@dataclass
class LayerStep:
    """One attention layer's tensors of a step."""

    query: torch.Tensor  # [T, Hq, D] this step's tokens
    key: torch.Tensor  # [T, Hk, D]
    value: torch.Tensor  # [T, Hk, D]
    read_pages: PageReader  # block ids -> head-major [Hk, n, block_size, D] K and V of cached blocks
    scale: float
    kv_cache: torch.Tensor  # the layer's paged cache [num_blocks, Hk, block_size, width] (an observer may rewrite it)


class LayerObserver(Protocol):
    @property
    def active(self) -> bool:
        """Whether this step is observed at all (checked per layer: keep it cheap)."""

    def observe(self, step: LayerStep) -> None: ...
