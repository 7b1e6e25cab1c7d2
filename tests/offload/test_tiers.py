"""RAM and disk tiers and the store: budgets, LRU, atomic files, bad records, and a disk that refuses writes."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import numpy as np

from nexusquant_vllm.offload import BlockLayout, DiskTier, KVTierStore, LayerPages, RamTier, RecordCodec, namespace

LAYOUT = BlockLayout((LayerPages(2, 16, 44, 40), LayerPages(2, 16, 128)))


def _pages(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (l.heads, l.block_size, l.row_bytes), dtype=np.uint8) for l in LAYOUT.layers]


def _key(i: int) -> bytes:
    return i.to_bytes(4, "little") * 8


def test_ram_tier_keeps_the_most_recently_used_within_budget():
    ram = RamTier(300)
    assert ram.put(_key(0), b"a" * 100) == []
    ram.put(_key(1), b"b" * 100)
    ram.put(_key(2), b"c" * 100)
    assert ram.get(_key(0)) == b"a" * 100  # now the most recent
    assert ram.put(_key(3), b"d" * 100) == [_key(1)]
    assert _key(1) not in ram and _key(0) in ram and ram.used_bytes == 300
    assert ram.put(_key(4), b"e" * 400) == [_key(2), _key(0), _key(3), _key(4)]  # alone over the budget
    assert ram.used_bytes == 0


def test_disk_tier_writes_atomically_and_trims_least_recently_used(tmp_path):
    disk = DiskTier(tmp_path, "ns", budget_bytes=1000)
    for i in range(4):
        assert disk.put(_key(i), bytes([i]) * 200)
        os.utime(disk.path(_key(i)), (time.time() - 100 + i, time.time() - 100 + i))
    assert disk.get(_key(0)) == bytes([0]) * 200  # used: refreshed
    assert disk.put(_key(4), b"x" * 200) and disk.put(_key(5), b"y" * 200)  # 1200 > 1000: trim to <= 900
    kept = {i for i in range(6) if _key(i) in disk}
    assert kept == {0, 3, 4, 5}
    assert not [p for p in Path(tmp_path).rglob("*") if p.name.endswith(".tmp")]
    other = DiskTier(tmp_path, "ns", budget_bytes=1000)  # a second process on the same directory
    assert other.get(_key(3)) == bytes([3]) * 200 and other.usage() == 800


def test_unusable_disk_turns_the_tier_off_with_one_warning(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    disk = DiskTier(blocker / "cache", "ns", budget_bytes=1 << 20)  # a file where a directory should be
    assert not disk.enabled
    assert not disk.put(_key(0), b"r") and disk.get(_key(0)) is None and _key(0) not in disk
    assert sum("turned off" in r.message for r in caplog.records) == 1


def _store(tmp_path, ram_bytes: int | None = 1 << 20, **kw) -> KVTierStore:
    codec = RecordCodec(namespace("t"), LAYOUT)
    ram = RamTier(ram_bytes) if ram_bytes else None
    return KVTierStore(codec, ram, DiskTier(tmp_path, codec.namespace.hex(), 1 << 20), **kw)


def test_store_saves_in_the_background_and_loads_from_ram_then_disk(tmp_path):
    store = _store(tmp_path)
    pages = _pages(0)
    assert store.submit(_key(0), pages)
    store.flush()
    assert store.take_ram_events() == [(_key(0), True)]
    assert all(np.array_equal(a, b) for a, b in zip(store.load(_key(0)), pages))
    store.ram.discard(_key(0))
    assert all(np.array_equal(a, b) for a, b in zip(store.load(_key(0)), pages))  # from disk, back into RAM
    assert store.take_ram_events() == [(_key(0), True)]
    assert store.load(_key(9)) is None
    stats = store.take_stats()
    assert (stats["ram_hits"], stats["disk_hits"], stats["misses"], stats["blocks_saved"]) == (1, 1, 1, 1)
    store.close()


def test_store_deletes_bad_records_and_reports_a_miss(tmp_path):
    store = _store(tmp_path, ram_bytes=None)
    store.submit(_key(0), _pages(0))
    store.submit(_key(1), _pages(1))
    store.flush()
    path0, path1 = store.disk.path(_key(0)), store.disk.path(_key(1))
    path0.write_bytes(path1.read_bytes())  # another block's record under this key
    assert store.load(_key(0)) is None and not path0.exists()
    data = bytearray(path1.read_bytes())
    data[-5] ^= 0x10
    path1.write_bytes(bytes(data))
    assert store.load(_key(1)) is None and not path1.exists()
    assert store.take_stats()["bad_records"] == 2
    store.close()


def test_disk_full_mid_run_degrades_to_ram(tmp_path, monkeypatch, caplog):
    store = _store(tmp_path)
    store.submit(_key(0), _pages(0))
    store.flush()
    real_replace = os.replace

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    for i in range(1, 4):
        assert store.submit(_key(i), _pages(i))
    store.flush()
    monkeypatch.setattr(os, "replace", real_replace)
    assert not store.disk.enabled and sum("turned off" in r.message for r in caplog.records) == 1
    assert all(store.load(_key(i)) is not None for i in range(4))  # from RAM
    assert not [p for p in Path(tmp_path).rglob("*.tmp")]
    store.close()


def test_a_full_queue_drops_saves_instead_of_blocking(tmp_path, monkeypatch):
    store = _store(tmp_path, queue_blocks=1)
    gate = __import__("threading").Event()
    encode = store.codec.encode
    monkeypatch.setattr(type(store.codec), "encode", lambda self, k, p: (gate.wait(), encode(k, p))[1])
    results = [store.submit(_key(i), _pages(i)) for i in range(5)]
    gate.set()
    store.close()
    assert results[0] and not all(results) and store.take_stats()["saves_dropped"] == results.count(False)


def _hammer(root: str, seed: int, rounds: int) -> int:
    """Write and read the same keys as another process; returns how many reads were not whole, valid records."""
    codec = RecordCodec(namespace("t"), LAYOUT)
    disk = DiskTier(root, codec.namespace.hex(), budget_bytes=40_000)  # small: trims run while the other reads
    records = {i: codec.encode(_key(i), _pages(seed * 100 + i)) for i in range(8)}
    bad = 0
    for r in range(rounds):
        i = (r * 5 + seed) % 8
        disk.put(_key(i), records[i])
        got = disk.get(_key((i + 3) % 8))
        if got is not None:
            try:
                codec.decode(_key((i + 3) % 8), got)
            except Exception:
                bad += 1
    return bad


def test_two_processes_sharing_a_directory_never_read_a_partial_record(tmp_path):
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(2) as pool:
        bad = pool.starmap(_hammer, [(str(tmp_path), 1, 400), (str(tmp_path), 2, 400)])
    assert bad == [0, 0]
    # each process trims from its own estimate, so the directory may exceed the budget by the other's last writes
    assert sum(p.stat().st_size for p in Path(tmp_path).rglob("*.nqkv")) <= 40_000 + 2 * 6_000
