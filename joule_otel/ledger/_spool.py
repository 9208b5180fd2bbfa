"""The spool: Parquet segments beside the ledger that wait to be compacted into the DuckDB file.

DuckDB lets one process hold a file; the spool lets any number of processes write at once. Each
process writes its rows as a segment (write to a hidden temporary name, then an atomic rename), so
a reader never sees half a segment and a kill -9 leaves at most a torn temporary file, which is
swept later. One process at a time, holding an exclusive ``flock`` on the lock file, compacts the
segments into the DuckDB file; readers take a shared lock for the moment they read both.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SEGMENT_SUFFIX = ".parquet"
STALE_TMP_S = 300.0
"""A temporary segment untouched this long belongs to a process that died mid-write."""
CLOCK_PROBE = ".clock"
"""A file in the spool touched to read the filesystem's clock (see :meth:`Spool.sweep_torn`)."""

_sequence = itertools.count()
_held_lock_fds: set[int] = set()
"""Descriptors of the lock file this process holds a lock through right now."""


def forget_inherited_locks() -> None:
    """In a forked child: close the lock descriptors inherited from the parent.

    ``flock`` belongs to the open file, which a fork shares: a child that kept the descriptor of a lock the parent
    held mid-compaction would keep every reader and compactor out until the child exits. Closing the child's copy
    leaves the parent's lock as it was (an explicit unlock here would release the parent's too).
    """
    for fd in list(_held_lock_fds):
        with contextlib.suppress(OSError):
            os.close(fd)
    _held_lock_fds.clear()


class LockBusy(Exception):
    """The ledger's lock is held by another process for longer than we were willing to wait."""


class Spool:
    """The spool folder and lock file that belong to one ledger path."""

    def __init__(self, db_path: Path) -> None:
        self.db_path = Path(db_path)
        self.dir = self.db_path.with_name(self.db_path.name + ".spool")
        self.lock_path = self.db_path.with_name(self.db_path.name + ".lock")
        self.quarantine_dir = self.dir / "quarantine"

    def ensure(self) -> None:
        """Create the spool folder (and the ledger's folder)."""
        self.dir.mkdir(parents=True, exist_ok=True)

    def write_segment(self, table: Any) -> Path:
        """Write an Arrow table as a new segment, atomically. Raises ``OSError`` if the disk refuses."""
        import pyarrow.parquet as pq

        self.ensure()
        name = f"{time.time_ns():020d}-{os.getpid()}-{next(_sequence):06d}-{secrets.token_hex(3)}{SEGMENT_SUFFIX}"
        final = self.dir / name
        tmp = self.dir / f".{name}.tmp"
        try:
            # a segment lives until the next compaction: written fast rather than small (no dictionaries, no
            # statistics, snappy: half the CPU of zstd with both, for a file a few KB larger)
            pq.write_table(
                table, tmp, compression="snappy", use_dictionary=False, write_statistics=False, row_group_size=256_000
            )
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return final

    def segments(self) -> list[Path]:
        """Complete segments, oldest first."""
        try:
            names = sorted(
                e.name for e in os.scandir(self.dir) if e.name.endswith(SEGMENT_SUFFIX) and not e.name.startswith(".")
            )
        except OSError:  # not created yet, or not a folder we can read
            return []
        return [self.dir / name for name in names]

    def oldest_segment_age_s(self) -> float | None:
        """Seconds since the oldest complete segment was written (its name starts with the time), or None if none."""
        oldest: str | None = None
        try:
            for entry in os.scandir(self.dir):
                name = entry.name
                if name.endswith(SEGMENT_SUFFIX) and not name.startswith(".") and (oldest is None or name < oldest):
                    oldest = name
        except OSError:
            return None
        if oldest is None:
            return None
        try:
            written_ns = int(oldest[:20])
        except ValueError:  # not a name this module gave: old enough to be looked at
            return float("inf")
        return max(time.time_ns() - written_ns, 0) / 1e9

    def sweep_torn(self, older_than_s: float = STALE_TMP_S) -> int:
        """Delete temporary segments left by processes that died mid-write; returns how many.

        Their age is measured by the clock that stamps this folder's files, never this process's: a process whose
        clock differs (faketime, a container, a host with skew on a shared volume) would take every writer's
        segment in progress for a torn one and delete it under it.
        """
        removed = 0
        try:
            cutoff = self._filesystem_now() - older_than_s
        except OSError:  # the folder is gone or read-only: nothing here can be swept
            return 0
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.dir):
                if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                    with contextlib.suppress(OSError):
                        if entry.stat().st_mtime < cutoff:
                            os.unlink(entry.path)
                            removed += 1
        return removed

    def _filesystem_now(self) -> float:
        """Now, by the filesystem's clock: the time it stamps on a file touched this moment."""
        probe = self.dir / CLOCK_PROBE
        probe.touch()
        return probe.stat().st_mtime

    def quarantine(self, segment: Path) -> Path:
        """Move an unreadable segment aside, so it never blocks compaction again."""
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        target = self.quarantine_dir / segment.name
        os.replace(segment, target)
        return target

    def quarantined(self) -> list[Path]:
        """Segments set aside as unreadable."""
        try:
            return sorted(self.quarantine_dir.glob(f"*{SEGMENT_SUFFIX}"))
        except OSError:
            return []

    @contextlib.contextmanager
    def locked(self, *, exclusive: bool, timeout_s: float) -> Iterator[None]:
        """Hold the ledger's lock. ``timeout_s=0`` tries once; raises :class:`LockBusy` if not granted.

        A reader (``exclusive=False``) never writes anything: where no lock file exists, no writer has ever compacted
        into this path, and there is nothing to hold (opening a path for reading must not create folders or files).
        """
        if exclusive:
            self.db_path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        else:
            try:
                fd = os.open(self.lock_path, os.O_RDONLY | os.O_CLOEXEC)
            except (FileNotFoundError, NotADirectoryError):
                yield
                return
        _held_lock_fds.add(fd)
        try:
            mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
            deadline = time.monotonic() + timeout_s
            delay = 0.005
            while True:
                try:
                    fcntl.flock(fd, mode)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                        raise
                    if time.monotonic() >= deadline:
                        raise LockBusy(str(self.lock_path)) from None
                    time.sleep(delay)
                    delay = min(delay * 2, 0.05)
            yield
        finally:
            _held_lock_fds.discard(fd)
            os.close(fd)  # closing the descriptor releases the flock
