"""One KV block as a self-checking byte record: every layer's pages of one block, split into streams, each
transformed and zstd-compressed.

A block's pages (one ``[H_kv, block_size, row_bytes]`` uint8 array per layer, in layer order) are split into three
streams that compress differently:

* ``codes``: the packed E8 indices of every E8 layer (the first ``code_bytes`` of each slot: each layer's
  ``[heads, block_size, code_bytes]`` in turn; layers of different E8 dtypes have different ``code_bytes``);
* ``scales``: their fp16 scales (the slot's last 4 bytes: K scale, V scale);
* ``dense``: the protected layers' pages, raw model-dtype ``[K | V]`` rows (2-byte elements).

Each stream gets one transform (:data:`TRANSFORMS`; ``benchmarks/offload.py`` measures them on real KV) and is then
zstd-compressed, or stored as is when zstd does not make it smaller, so a record is never much larger than the raw
pages. The header records the transform and the compression of each stream, so a reader needs no configuration.

Record layout (little-endian)::

    magic "NQKV" | format u16 | namespace 16 B | key length u16 | key | stream count u8
    per stream: kind u8 | transform u8 | compressed u8 | raw length u32 | stored length u32
    crc32 u32 (of everything before it and all payloads) | payloads

:func:`decode_record` raises :class:`RecordError` on anything but a complete, intact record of the expected
namespace, key and layout: a truncated, corrupted, foreign (another key or namespace) or stale (older format)
record is a miss, never a wrong page.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import zstandard

MAGIC = b"NQKV"
FORMAT_VERSION = 1
NAMESPACE_BYTES = 16
SCALE_SLOT_BYTES = 4  # K scale and V scale, fp16 each
STREAMS = ("codes", "scales", "dense")
TRANSFORMS = ("raw", "planes", "delta_planes", "xor_tokens")
ONLY_FOR = {"delta_planes": "scales", "xor_tokens": "codes"}
DEFAULT_TRANSFORMS = {"codes": "xor_tokens", "scales": "delta_planes", "dense": "planes"}
ZSTD_LEVEL = 3

_HEAD = struct.Struct("<4sH16sH")
_STREAM = struct.Struct("<BBBII")
_CRC = struct.Struct("<I")


class RecordError(ValueError):
    """A record that must not be loaded: truncated, corrupted, foreign, stale or of another layout."""


@dataclass(frozen=True)
class LayerPages:
    """One layer's page of one block: ``[heads, block_size, row_bytes]`` uint8; ``code_bytes`` > 0 for an E8 layer
    (its slot is ``code_bytes`` of codes then 4 bytes of scales), 0 for a dense (protected) layer."""

    heads: int
    block_size: int
    row_bytes: int
    code_bytes: int = 0

    def __post_init__(self) -> None:
        if self.code_bytes and self.row_bytes != self.code_bytes + SCALE_SLOT_BYTES:
            raise ValueError(f"an E8 slot is codes + {SCALE_SLOT_BYTES} scale bytes, got {self}")

    @property
    def nbytes(self) -> int:
        return self.heads * self.block_size * self.row_bytes

    @property
    def is_codec(self) -> bool:
        return self.code_bytes > 0


@dataclass(frozen=True)
class BlockLayout:
    """Every layer's page shape of one block, in layer order."""

    layers: tuple[LayerPages, ...]

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    def digest(self) -> bytes:
        return hashlib.blake2b(repr(self.layers).encode(), digest_size=8).digest()


def namespace(*parts: object) -> bytes:
    """The 16-byte namespace of a configuration: records of another model, dtype, codec, block size or layout
    never match."""
    return hashlib.blake2b("\x1f".join(map(str, (FORMAT_VERSION, *parts))).encode(), digest_size=NAMESPACE_BYTES).digest()


# ---- streams ------------------------------------------------------------------------------------------------------


def split_streams(pages: list[np.ndarray], layout: BlockLayout) -> dict[str, np.ndarray]:
    """Per-layer uint8 pages -> the three streams: ``codes`` 1-D uint8 (each E8 layer's ``[heads, block_size,
    code_bytes]`` in turn), ``scales`` ``[n, block_size, 2]`` uint16 over the n E8 layer-heads (tokens on axis 1, so
    deltas run along tokens), ``dense`` 1-D uint8."""
    codes, scales, dense = [], [], []
    for page, layer in zip(pages, layout.layers, strict=True):
        if layer.is_codec:
            codes.append(page[..., : layer.code_bytes].reshape(-1))
            scales.append(np.ascontiguousarray(page[..., layer.code_bytes :]).view(np.uint16).reshape(-1, layer.block_size, 2))
        else:
            dense.append(page.reshape(-1))
    return {
        "codes": np.concatenate(codes) if codes else np.zeros(0, np.uint8),
        "scales": np.concatenate(scales) if scales else np.zeros((0, 1, 2), np.uint16),
        "dense": np.concatenate(dense) if dense else np.zeros(0, np.uint8),
    }


def join_streams(streams: dict[str, np.ndarray], layout: BlockLayout) -> list[np.ndarray]:
    """The inverse of :func:`split_streams`."""
    pages, code_at, dense_at, scale_at = [], 0, 0, 0
    for layer in layout.layers:
        if layer.is_codec:
            page = np.empty((layer.heads, layer.block_size, layer.row_bytes), np.uint8)
            size = layer.heads * layer.block_size * layer.code_bytes
            page[..., : layer.code_bytes] = streams["codes"][code_at : code_at + size].reshape(page[..., : layer.code_bytes].shape)
            page[..., layer.code_bytes :] = (
                streams["scales"][scale_at : scale_at + layer.heads].view(np.uint8).reshape(layer.heads, layer.block_size, -1)
            )
            code_at, scale_at = code_at + size, scale_at + layer.heads
        else:
            page = streams["dense"][dense_at : dense_at + layer.nbytes].reshape(layer.heads, layer.block_size, layer.row_bytes)
            dense_at += layer.nbytes
        pages.append(page)
    return pages


# ---- transforms (exactly invertible) --------------------------------------------------------------------------------


def _code_views(codes: np.ndarray, layout: BlockLayout) -> list[np.ndarray]:
    """Each E8 layer's part of the 1-D ``codes`` stream as a ``[heads, block_size, code_bytes]`` view."""
    views, at = [], 0
    for layer in (layer for layer in layout.layers if layer.is_codec):
        size = layer.heads * layer.block_size * layer.code_bytes
        views.append(codes[at : at + size].reshape(layer.heads, layer.block_size, layer.code_bytes))
        at += size
    return views


def forward_transform(name: str, stream: str, data: np.ndarray, layout: BlockLayout) -> bytes:
    """``planes``: 2-byte elements split into a low-byte and a high-byte plane (a bf16/fp16 high byte is sign and
    exponent: it repeats). ``delta_planes`` (scales): each fp16 scale's bit pattern minus the previous token's, mod
    2**16, then planes. ``xor_tokens`` (codes): each token's code bytes XOR the previous token's of the same
    layer-head (neighbouring tokens share code bytes far more often than chance)."""
    check_transforms({stream: name})
    if name in ("delta_planes", "xor_tokens"):
        data = data.copy()
        if name == "delta_planes":
            data[:, 1:] -= data[:, :-1].copy()
            name = "planes"
        else:
            for codes in _code_views(data, layout):
                codes[:, 1:] ^= codes[:, :-1].copy()
            name = "raw"
    flat = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    if name == "planes":
        return flat.reshape(-1, 2).T.tobytes()
    if name == "raw":
        return flat.tobytes()
    raise ValueError(f"transform {name!r} does not apply to the {stream} stream")


def inverse_transform(name: str, stream: str, raw: bytes, layout: BlockLayout) -> np.ndarray:
    flat = np.frombuffer(raw, np.uint8)
    if name in ("planes", "delta_planes"):
        if flat.size % 2:
            raise RecordError(f"{stream}: odd length {flat.size} for a byte-plane transform")
        flat = flat.reshape(2, -1).T.reshape(-1)
    if stream == "dense" or not flat.size:
        return flat
    codec = next((layer for layer in layout.layers if layer.is_codec), None)
    if codec is None:
        raise RecordError(f"{stream}: the layout has no E8 layer")
    try:
        if stream == "codes":
            codes = flat.copy()
            if name == "xor_tokens":
                for view in _code_views(codes, layout):
                    np.bitwise_xor.accumulate(view, axis=1, out=view)
            return codes
        scales = flat.view(np.uint16).reshape(-1, codec.block_size, 2).copy()
    except ValueError as e:
        raise RecordError(f"{stream}: {e}") from None
    if name == "delta_planes":
        np.cumsum(scales, axis=1, dtype=np.uint16, out=scales)
    return scales


def applies(name: str, stream: str) -> bool:
    return name in TRANSFORMS and ONLY_FOR.get(name, stream) == stream


def check_transforms(transforms: dict[str, str]) -> None:
    for stream, name in transforms.items():
        if stream not in STREAMS or not applies(name, stream):
            raise ValueError(f"offload transform {stream}={name!r}: expected a stream of {STREAMS} and one of "
                             f"{TRANSFORMS} (delta_planes: scales only; xor_tokens: codes only)")


# ---- records --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordCodec:
    """Encodes and decodes the records of one namespace and block layout."""

    namespace: bytes
    layout: BlockLayout
    transforms: tuple[tuple[str, str], ...] = tuple(DEFAULT_TRANSFORMS.items())
    level: int = ZSTD_LEVEL

    def __post_init__(self) -> None:
        if len(self.namespace) != NAMESPACE_BYTES:
            raise ValueError(f"namespace must be {NAMESPACE_BYTES} bytes")
        transforms = {**DEFAULT_TRANSFORMS, **dict(self.transforms)}  # streams not named keep the default
        check_transforms(transforms)
        object.__setattr__(self, "transforms", tuple(transforms.items()))

    def encode(self, key: bytes, pages: list[np.ndarray]) -> bytes:
        streams = split_streams(pages, self.layout)
        compressor = zstandard.ZstdCompressor(level=self.level)
        table, payloads = [], []
        transforms = dict(self.transforms)
        for kind, (stream, name) in enumerate((s, transforms[s]) for s in STREAMS):
            raw = forward_transform(name, stream, streams[stream], self.layout)
            packed = compressor.compress(raw) if raw else b""
            compressed = len(packed) < len(raw)
            payload = packed if compressed else raw
            table.append(_STREAM.pack(kind, TRANSFORMS.index(name), compressed, len(raw), len(payload)))
            payloads.append(payload)
        head = _HEAD.pack(MAGIC, FORMAT_VERSION, self.namespace, len(key)) + key + bytes([len(table)]) + b"".join(table)
        body = b"".join(payloads)
        return head + _CRC.pack(zlib.crc32(body, zlib.crc32(head))) + body

    def decode(self, key: bytes, record: bytes) -> list[np.ndarray]:
        """The block's per-layer pages; :class:`RecordError` unless the record is intact and is ``key``'s."""
        view = memoryview(record)
        if len(view) < _HEAD.size:
            raise RecordError("truncated header")
        magic, version, ns, key_len = _HEAD.unpack_from(view)
        if magic != MAGIC:
            raise RecordError("not a nexusquant KV record")
        if version != FORMAT_VERSION:
            raise RecordError(f"record format {version}, expected {FORMAT_VERSION}")
        if ns != self.namespace:
            raise RecordError("record of another namespace (model, dtype, codec, block size or layout)")
        at = _HEAD.size
        if bytes(view[at : at + key_len]) != key:
            raise RecordError("record of another block")
        at += key_len
        if at >= len(view) or view[at] != len(STREAMS):
            raise RecordError("truncated or malformed stream table")
        if at + 1 + len(STREAMS) * _STREAM.size + _CRC.size > len(view):
            raise RecordError("truncated header")
        table = [_STREAM.unpack_from(view, at + 1 + i * _STREAM.size) for i in range(len(STREAMS))]
        at += 1 + len(STREAMS) * _STREAM.size
        (crc,) = _CRC.unpack_from(view, at)
        body = view[at + _CRC.size :]
        if len(body) != sum(entry[4] for entry in table):
            raise RecordError("truncated or padded record")
        if zlib.crc32(body, zlib.crc32(view[:at])) != crc:
            raise RecordError("checksum mismatch")
        return join_streams(self._streams(table, body), self.layout)

    def _streams(self, table: list[tuple], body: memoryview) -> dict[str, np.ndarray]:
        decompressor, streams, at = zstandard.ZstdDecompressor(), {}, 0
        expected = _stream_sizes(self.layout)
        for kind, transform, compressed, raw_len, stored_len in table:
            if kind >= len(STREAMS) or transform >= len(TRANSFORMS) or not applies(TRANSFORMS[transform], STREAMS[kind]):
                raise RecordError("unknown stream or transform")
            stream = STREAMS[kind]
            if raw_len != expected[stream]:
                raise RecordError(f"{stream}: {raw_len} bytes, the layout has {expected[stream]}")
            payload = bytes(body[at : at + stored_len])
            at += stored_len
            try:
                raw = decompressor.decompress(payload, max_output_size=raw_len) if compressed else payload
            except zstandard.ZstdError as e:
                raise RecordError(f"{stream}: {e}") from None
            if len(raw) != raw_len:
                raise RecordError(f"{stream}: {len(raw)} bytes after decompression, expected {raw_len}")
            streams[stream] = inverse_transform(TRANSFORMS[transform], stream, raw, self.layout)
        return streams


def _stream_sizes(layout: BlockLayout) -> dict[str, int]:
    codec = [layer for layer in layout.layers if layer.is_codec]
    return {
        "codes": sum(layer.heads * layer.block_size * layer.code_bytes for layer in codec),
        "scales": sum(layer.heads * layer.block_size * SCALE_SLOT_BYTES for layer in codec),
        "dense": sum(layer.nbytes for layer in layout.layers if not layer.is_codec),
    }
