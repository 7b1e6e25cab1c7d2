"""Where records live: host RAM and a disk directory, each with a byte budget and least-recently-used replacement.

Both tiers hold opaque records (:mod:`.record`) under a block key. They never raise on a missing, unreadable or
unwritable record: a read that fails is a miss, and a disk that cannot be written (full, read-only, gone) turns the
disk tier off with one warning, so a request never fails because of the tier.

The disk directory may be shared by several server processes (and by servers started later: prefix hits survive a
restart). A record is written to a temporary file in its final folder and renamed over its name (``os.replace`` is
atomic on POSIX), so a reader sees the whole record or none. Use refreshes a file's modification time; each process
keeps the whole directory under its budget by deleting the least recently used files when its running estimate
exceeds it (a scan of the directory, so the other processes' files count as well).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path

logger = logging.getLogger("vllm.nexusquant.offload")

SUFFIX = ".nqkv"
TRIM_TO = 0.9  # a trim deletes down to this fraction of the budget, so it does not run on every write


class RamTier:
    """Records in this process's memory, at most ``budget_bytes`` in all (record bytes), least recently used out."""

    name = "ram"

    def __init__(self, budget_bytes: int):
        if budget_bytes <= 0:
            raise ValueError(f"offload RAM budget must be > 0 bytes, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self._records: OrderedDict[bytes, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def __contains__(self, key: bytes) -> bool:
        with self._lock:
            return key in self._records

    def __len__(self) -> int:
        return len(self._records)

    def get(self, key: bytes) -> bytes | None:
        with self._lock:
            record = self._records.get(key)
            if record is not None:
                self._records.move_to_end(key)
            return record

    def put(self, key: bytes, record: bytes) -> list[bytes]:
        """Store ``record``; returns the keys dropped to stay within the budget (possibly ``key`` itself, if the
        record alone exceeds it)."""
        with self._lock:
            old = self._records.pop(key, None)
            if old is not None:
                self.used_bytes -= len(old)
            self._records[key] = record
            self.used_bytes += len(record)
            dropped = []
            while self.used_bytes > self.budget_bytes:
                k, r = self._records.popitem(last=False)
                self.used_bytes -= len(r)
                dropped.append(k)
            return dropped

    def discard(self, key: bytes) -> None:
        with self._lock:
            record = self._records.pop(key, None)
            if record is not None:
                self.used_bytes -= len(record)


class DiskTier:
    """Records as files ``root/<namespace>/<key[:2]>/<key><suffix>``, the directory kept under ``budget_bytes``."""

    name = "disk"

    def __init__(self, root: str | os.PathLike, namespace: str, budget_bytes: int, suffix: str = SUFFIX):
        if budget_bytes <= 0:
            raise ValueError(f"offload disk budget must be > 0 bytes, got {budget_bytes}")
        self.root = Path(root)
        self.folder = self.root / namespace
        self.budget_bytes = budget_bytes
        self.suffix = suffix
        self.enabled = True
        self._used: int | None = None  # bytes in the whole directory: scanned when first needed (a put)
        self._lock = threading.Lock()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            self._disable(e)

    def path(self, key: bytes) -> Path:
        name = key.hex()
        return self.folder / name[:2] / (name + self.suffix)

    def __contains__(self, key: bytes) -> bool:
        return self.enabled and self.path(key).is_file()

    def get(self, key: bytes) -> bytes | None:
        if not self.enabled:
            return None
        path = self.path(key)
        try:
            record = path.read_bytes()
            os.utime(path)  # recently used: the last to be trimmed
        except OSError:
            return None
        return record

    def put(self, key: bytes, record: bytes) -> bool:
        """Write ``record`` atomically; False (and the tier off, after one warning) if the disk refuses it."""
        if not self.enabled:
            return False
        path = self.path(key)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            path.parent.mkdir(exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(record)
            os.replace(tmp, path)
        except OSError as e:
            _unlink(tmp)
            self._disable(e)
            return False
        if self.usage(added=len(record)) > self.budget_bytes:
            self.trim()
        return True

    def usage(self, added: int = 0) -> int:
        """This process's estimate of the directory's bytes (a scan the first time), after adding ``added``."""
        with self._lock:
            if self._used is None:
                self._used = sum(size for _, _, size in self._scan())
            else:
                self._used += added
            return self._used

    def discard(self, key: bytes) -> None:
        _unlink(self.path(key))

    def trim(self) -> None:
        """Delete the least recently used records of the whole directory (every namespace, every process) until
        it holds at most ``TRIM_TO`` of the budget."""
        with self._lock:
            files = sorted(self._scan())
            used = sum(size for _, _, size in files)
            for _, path, size in files:
                if used <= self.budget_bytes * TRIM_TO:
                    break
                if _unlink(path):
                    used -= size
            self._used = used

    def _scan(self) -> list[tuple[float, Path, int]]:
        found = []
        for path in self.root.glob(f"*/*/*{self.suffix}"):
            try:
                st = path.stat()
            except OSError:
                continue  # deleted by another process meanwhile
            found.append((st.st_mtime, path, st.st_size))
        return found

    def _disable(self, error: OSError) -> None:
        if self.enabled:
            logger.warning("nexusquant offload: disk tier %s turned off (%s); serving from RAM and recompute",
                           self.root, error)
        self.enabled = False


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
        return True
    except OSError:
        return False
