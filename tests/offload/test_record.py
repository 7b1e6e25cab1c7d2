"""Records: exact round trips for every transform, and every damaged or foreign record refused."""

from __future__ import annotations

import itertools
import struct

import numpy as np
import pytest

from nexusquant_vllm.offload.record import (
    DEFAULT_TRANSFORMS,
    BlockLayout,
    LayerPages,
    RecordCodec,
    RecordError,
    namespace,
)

LAYOUT = BlockLayout((LayerPages(2, 16, 44, 40), LayerPages(2, 16, 256), LayerPages(2, 16, 44, 40)))
# protected layers in e8-k4v4 (64 code bytes) beside e8-k3v2 ones (40), and one in bf16
MIXED = BlockLayout((LayerPages(2, 16, 68, 64), LayerPages(2, 16, 44, 40), LayerPages(2, 16, 256),
                     LayerPages(2, 16, 68, 64)))
KEY = bytes(range(32))


def _pages(seed: int = 0, layout: BlockLayout = LAYOUT) -> list[np.ndarray]:
    """Random codes, smooth positive fp16 scales (like real ones), bf16-like dense rows."""
    rng = np.random.default_rng(seed)
    pages = []
    for layer in layout.layers:
        page = rng.integers(0, 256, (layer.heads, layer.block_size, layer.row_bytes), dtype=np.uint8)
        if layer.is_codec:
            scales = (1.0 + 0.05 * rng.standard_normal((layer.heads, layer.block_size, 2))).astype(np.float16)
            page[..., layer.code_bytes :] = scales.view(np.uint8).reshape(layer.heads, layer.block_size, 4)
        else:
            dense = rng.standard_normal((layer.heads, layer.block_size, layer.row_bytes // 2)).astype(np.float32)
            page[:] = (dense.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(page.shape)
        pages.append(page)
    return pages


def _codec(**kw) -> RecordCodec:
    return RecordCodec(namespace("model", "e8-k3v2"), LAYOUT, **kw)


@pytest.mark.parametrize(
    "codes,scales,dense",
    list(itertools.product(["raw", "planes", "xor_tokens"], ["raw", "planes", "delta_planes"], ["raw", "planes"])),
)
def test_every_transform_round_trips_exactly(codes, scales, dense):
    transforms = (("codes", codes), ("scales", scales), ("dense", dense))
    for layout in (LAYOUT, MIXED):
        codec = RecordCodec(namespace("model", "e8-k3v2"), layout, transforms=transforms)
        pages = _pages(1, layout)
        out = codec.decode(KEY, codec.encode(KEY, pages))
        assert all(np.array_equal(a, b) for a, b in zip(pages, out, strict=True))


def test_default_transforms_compress_scales_and_dense_rows():
    raw = sum(p.nbytes for p in _pages())
    assert len(_codec().encode(KEY, _pages())) < raw * 0.9


def test_codes_repeated_along_tokens_compress_with_xor():
    pages, rng = _pages(2), np.random.default_rng(5)
    for page, layer in zip(pages, LAYOUT.layers):
        if layer.is_codec:  # half of each token's code bytes repeat the previous token's, scattered
            for t in range(1, layer.block_size):
                same = rng.random((layer.heads, layer.code_bytes)) < 0.5
                page[:, t, : layer.code_bytes][same] = page[:, t - 1, : layer.code_bytes][same]
    xor = _codec(transforms=(("codes", "xor_tokens"),)).encode(KEY, pages)
    raw = _codec(transforms=(("codes", "raw"),)).encode(KEY, pages)
    assert len(xor) < len(raw) - 400


def test_a_layout_without_e8_layers_round_trips():
    layout = BlockLayout((LayerPages(2, 16, 256),))
    codec = RecordCodec(namespace("bf16"), layout)
    pages = [np.arange(2 * 16 * 256, dtype=np.uint32).astype(np.uint8).reshape(2, 16, 256)]
    assert np.array_equal(codec.decode(KEY, codec.encode(KEY, pages))[0], pages[0])


def test_incompressible_streams_are_stored_not_grown():
    layout = BlockLayout((LayerPages(2, 16, 44, 40),))
    codec = RecordCodec(namespace("x"), layout)
    pages = [np.random.default_rng(3).integers(0, 256, (2, 16, 44), dtype=np.uint8)]  # random scales too
    assert len(codec.encode(KEY, pages)) <= pages[0].nbytes + 128


def test_truncated_records_are_refused():
    record = _codec().encode(KEY, _pages())
    for cut in [0, 3, 10, 40, 60, 80, len(record) // 2, len(record) - 1]:
        with pytest.raises(RecordError):
            _codec().decode(KEY, record[:cut])
    with pytest.raises(RecordError):
        _codec().decode(KEY, record + b"\0")


def test_every_flipped_bit_position_sampled_is_refused():
    record = _codec().encode(KEY, _pages())
    rng = np.random.default_rng(0)
    for pos in [0, 4, 6, 30, 60, 70, 90, *rng.integers(100, len(record), 40)]:
        damaged = bytearray(record)
        damaged[pos] ^= 1 << int(rng.integers(8))
        with pytest.raises(RecordError):
            _codec().decode(KEY, bytes(damaged))


def test_foreign_and_stale_records_are_refused():
    record = _codec().encode(KEY, _pages())
    with pytest.raises(RecordError, match="another block"):
        _codec().decode(bytes(32), record)
    other = RecordCodec(namespace("model", "e8-k2v2"), LAYOUT)
    with pytest.raises(RecordError, match="namespace"):
        other.decode(KEY, record)
    stale = record[:4] + struct.pack("<H", 0) + record[6:]
    with pytest.raises(RecordError, match="format"):
        _codec().decode(KEY, stale)
    wider = BlockLayout((LayerPages(3, 16, 44, 40), *LAYOUT.layers[1:]))
    with pytest.raises(RecordError):
        RecordCodec(_codec().namespace, wider).decode(KEY, record)


def test_bad_transform_names_are_refused():
    with pytest.raises(ValueError, match="transform"):
        _codec(transforms=(("codes", "delta_planes"),))
    with pytest.raises(ValueError, match="transform"):
        _codec(transforms=(("scales", "xor_tokens"),))
    with pytest.raises(ValueError, match="transform"):
        _codec(transforms=(("scales", "gzip"),))
    assert set(DEFAULT_TRANSFORMS) == {"codes", "scales", "dense"}
