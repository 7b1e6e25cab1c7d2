"""What one layer's pages hold: codec slots (E8 or a scalar baseline) or dense ``[K | V]`` rows of a protected layer.

A ``Pages`` object knows the layer's page format and the domain the pages live in: codec pages are coded after the
codec's orthogonal rotation, so attention over them runs in that rotated domain (``to_pages`` / ``to_model`` move
vectors between it and the model's); dense pages live in the model's domain. Every attention path reads and writes
pages through this object, whatever kernel it runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch

from nexusquant_vllm.attention.paged import PageReader
from nexusquant_vllm.codec.format import KVFormat


@dataclass(frozen=True)
class CodecPages:
    """uint8 pages ``[num_blocks, Hk, block_size, fmt.slot_bytes]``, one codec slot per token-head."""

    codec: ModuleType  # encode_kv / decode_kv_rotated / rotate / unrotate (nexusquant_vllm.codec or a baseline)
    fmt: KVFormat

    rotated = True

    def to_pages(self, x: torch.Tensor) -> torch.Tensor:
        return self.codec.rotate(x.float())

    def to_model(self, x: torch.Tensor) -> torch.Tensor:
        return self.codec.unrotate(x)

    def encode(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor) -> torch.Tensor:
        """Slots ``[T, Hk, slot_bytes]``. No NaN/inf check on the hot path (it is a full pass): a non-finite vector
        gets a NaN scale and decodes to NaN, never to plausible garbage."""
        return self.codec.encode_kv(key, value, self.fmt, validate=False)

    def reader(self, kv_cache: torch.Tensor) -> PageReader:
        """Blocks -> head-major ``[Hk, n, block_size, D]`` K and V, float32, in the rotated domain."""
        return lambda ids: self.codec.decode_kv_rotated(kv_cache.transpose(0, 1)[:, ids], self.fmt)


@dataclass(frozen=True)
class DensePages:
    """Pages in the model dtype ``[num_blocks, Hk, block_size, 2 * head_dim]``, one token-head's ``[K | V]`` per row
    (the protected layers)."""

    head_dim: int

    fmt = None
    rotated = False

    def to_pages(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def to_model(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def encode(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor) -> torch.Tensor:
        return torch.cat([key, value], dim=-1).to(kv_cache.dtype)

    def reader(self, kv_cache: torch.Tensor) -> PageReader:
        """Blocks -> head-major ``[Hk, n, block_size, D]`` K and V, in the cache's dtype."""
        d = self.head_dim

        def read(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            pages = kv_cache.transpose(0, 1)[:, ids]  # head-major gather: [H, n, bs, 2D]
            return pages[..., :d], pages[..., d:]

        return read


Pages = CodecPages | DensePages


def model_reader(pages: Pages, kv_cache: torch.Tensor) -> PageReader:
    """Like ``pages.reader`` but in the model's domain (for observers such as the eviction scorer)."""
    read = pages.reader(kv_cache)
    if not pages.rotated:
        return read
    return lambda ids: tuple(pages.to_model(x) for x in read(ids))
