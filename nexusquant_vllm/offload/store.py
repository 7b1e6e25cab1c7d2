"""The tier store: saves blocks in the background, loads them from RAM or disk, keeps the stats.

``submit`` takes a block's pages already copied out of the paged cache and returns at once: a background thread
encodes the record (:mod:`.record`) and writes it to RAM and disk. When saving falls behind (the queue is full), the
block is not saved, counted in ``saves_dropped``; a forward step never waits for compression or I/O. ``load`` reads
RAM first, then disk (a disk hit is copied into RAM); a record that fails its checks is deleted and counted in
``bad_records``, and the block is a miss.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import Counter

import numpy as np

from nexusquant_vllm.offload.record import RecordCodec, RecordError
from nexusquant_vllm.offload.tiers import DiskTier, RamTier

logger = logging.getLogger("vllm.nexusquant.offload")

QUEUE_BLOCKS = 1024


class KVTierStore:
    """Blocks of one namespace and layout in a RAM tier and/or a disk tier."""

    def __init__(self, codec: RecordCodec, ram: RamTier | None, disk: DiskTier | None,
                 queue_blocks: int = QUEUE_BLOCKS):
        if ram is None and disk is None:
            raise ValueError("the offload store needs a RAM tier, a disk tier or both")
        self.codec, self.ram, self.disk = codec, ram, disk
        self.stats: Counter[str] = Counter()
        self._ram_events: list[tuple[bytes, bool]] = []
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[bytes, list[np.ndarray]] | None] = queue.Queue(queue_blocks)
        self._thread = threading.Thread(target=self._save_loop, name="nq-offload-save", daemon=True)
        self._thread.start()

    # ---- saving -------------------------------------------------------------------------------------------------

    def submit(self, key: bytes, pages: list[np.ndarray]) -> bool:
        """Queue a block for saving (``pages`` must not change afterwards); False if the queue is full."""
        try:
            self._queue.put_nowait((key, pages))
            return True
        except queue.Full:
            self._count(saves_dropped=1)
            return False

    def flush(self) -> None:
        """Wait until every queued block is written."""
        self._queue.join()

    def close(self) -> None:
        self.flush()
        self._queue.put(None)
        self._thread.join()

    def _save_loop(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                self._save(*item)
            except Exception:  # a bug must not kill the saver: the block is just not saved
                logger.exception("nexusquant offload: saving a block failed")
                self._count(saves_failed=1)
            finally:
                self._queue.task_done()
        self._queue.task_done()

    def _save(self, key: bytes, pages: list[np.ndarray]) -> None:
        record = self.codec.encode(key, pages)
        self._count(blocks_saved=1, raw_bytes=sum(p.nbytes for p in pages), record_bytes=len(record))
        if self.ram is not None:
            self._put_ram(key, record)
        if self.disk is not None and key not in self.disk and self.disk.put(key, record):
            self._count(disk_bytes_written=len(record))

    def _put_ram(self, key: bytes, record: bytes) -> None:
        dropped = self.ram.put(key, record)
        with self._lock:
            self._ram_events.append((key, True))
            self._ram_events.extend((k, False) for k in dropped)

    # ---- loading ------------------------------------------------------------------------------------------------

    def load(self, key: bytes) -> list[np.ndarray] | None:
        """The block's per-layer pages, or None (a miss in every tier, or only bad records)."""
        for tier in (self.ram, self.disk):
            if tier is None:
                continue
            record = tier.get(key)
            if record is None:
                continue
            try:
                pages = self.codec.decode(key, record)
            except RecordError as e:
                logger.warning("nexusquant offload: %s record %s rejected (%s); recomputing", tier.name,
                               key.hex()[:16], e)
                tier.discard(key)
                self._count(bad_records=1)
                continue
            self._count(**{f"{tier.name}_hits": 1, f"{tier.name}_bytes_read": len(record)})
            if tier is self.disk and self.ram is not None:
                self._put_ram(key, record)
            return pages
        self._count(misses=1)
        return None

    # ---- what the scheduler needs to know ------------------------------------------------------------------------

    def take_ram_events(self) -> list[tuple[bytes, bool]]:
        """``(key, now in RAM)`` for every key that entered or left the RAM tier since the last call, in order."""
        with self._lock:
            events, self._ram_events = self._ram_events, []
        return events

    def take_stats(self) -> dict[str, int]:
        with self._lock:
            stats, self.stats = dict(self.stats), Counter()
        return stats

    def _count(self, **counts: int) -> None:
        with self._lock:
            self.stats.update(counts)
