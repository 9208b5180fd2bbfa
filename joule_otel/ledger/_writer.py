"""The per-process ledger writer: rows → spooled segments → (now and then) the DuckDB file.

Runs on the background thread only. Rows reach disk as a segment every flush interval whether or
not the DuckDB file is free, so a busy file never costs a row and memory stays bounded. Only when
the disk refuses segments do rows wait in memory, up to ``max_pending_rows``; past that the oldest
are dropped, counted and reported.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from joule_otel.ledger import _schema as schema
from joule_otel.ledger._compact import LedgerUnavailable, compact_locked, is_disk_full
from joule_otel.ledger._row import LedgerRow, problem
from joule_otel.ledger._spool import LockBusy, Spool

_log = logging.getLogger("joule_otel")

DEFAULT_MAX_PENDING_ROWS = 200_000
COMPACT_INTERVAL_S = 30.0
"""How long segments wait before a writer compacts them into the DuckDB file. Readers see spooled rows at once,
so this only sets how many small segments wait, against what a compaction costs (tens of milliseconds of CPU,
mostly opening and closing DuckDB). A writer compacts only when the oldest segment (of any process) is this
old, so N processes sharing a ledger compact about once an interval between them, not N times."""
SEGMENT_MAX_ROWS = 100_000
"""Rows held before a segment is written whatever the schedule: a burst reaches disk in pieces of this size."""


@dataclass
class WriterStats:
    """Counters a user can read with ``joule_otel.stats()``."""

    rows_spooled: int = 0
    segments_written: int = 0
    rows_compacted: int = 0
    rows_dropped: int = 0
    rows_invalid: int = 0
    """Rows that could not be written at all (a value no column can hold) and were dropped, counted, logged."""
    spool_errors: int = 0
    compact_errors: int = 0
    pending_rows: int = 0


def rows_to_arrow(rows: list[LedgerRow]) -> Any:
    """Row tuples (in :data:`schema.COLUMNS` order, ``started_at`` in µs since the epoch) → Arrow table.

    Arrow converts the tuples as one struct array in C++, twice as fast as transposing them in Python first.
    """
    import pyarrow as pa

    arrow_schema, row_type = _arrow_types()
    structs = pa.array(rows, type=row_type)
    return pa.Table.from_batches([pa.RecordBatch.from_struct_array(structs)], schema=arrow_schema)


@functools.cache
def _arrow_types() -> tuple[Any, Any]:
    """The segments' Arrow schema and the struct type of one row: built once, not once a segment."""
    import pyarrow as pa

    arrow_schema = schema.arrow_schema()
    return arrow_schema, pa.struct(list(arrow_schema))


def load_arrow() -> None:
    """Import what writing a segment needs: pyarrow, its Parquet writer, and the pandas its first conversion imports.

    Up to a few seconds on a small VM, better spent before the first rows than among them.

    Raises:
        Exception: whatever the import raises (pyarrow missing or broken).
    """
    import pyarrow.parquet  # noqa: F401

    rows_to_arrow([])


class LedgerWriter:
    """Buffers rows, writes segments, compacts. Not thread-safe: one background thread owns it."""

    def __init__(
        self,
        db_path: Path,
        *,
        max_pending_rows: int = DEFAULT_MAX_PENDING_ROWS,
        compact_interval_s: float = COMPACT_INTERVAL_S,
    ) -> None:
        self.spool = Spool(db_path)
        self.max_pending_rows = max_pending_rows
        self.compact_interval_s = compact_interval_s
        self.stats = WriterStats()
        self._rows: list[LedgerRow] = []
        # the first compaction waits one interval: a short-lived process (a cron job, a CLI) pays for DuckDB once,
        # at exit, and a starting worker does not compete with its siblings for the file
        self._last_compact = time.monotonic()
        self._reported: set[str] = set()

    @property
    def db_path(self) -> Path:
        """The ledger file."""
        return self.spool.db_path

    def _report(self, key: str, message: str, *args: object) -> None:
        """Log an error once per kind until it clears, so a full disk is one line, not thousands."""
        if key not in self._reported:
            self._reported.add(key)
            _log.error(message, *args)

    def rows_lost(self) -> int:
        """Rows this writer dropped so far, for any reason."""
        return self.stats.rows_dropped + self.stats.rows_invalid

    def forget_pending(self) -> None:
        """In a forked child: the rows not yet spooled are the parent's to write."""
        self._rows = []
        self.stats.pending_rows = 0

    def append(self, rows: list[LedgerRow]) -> None:
        """Queue rows for the next segment."""
        self._rows.extend(rows)
        overflow = len(self._rows) - self.max_pending_rows
        if overflow > 0:
            del self._rows[:overflow]
            self.stats.rows_dropped += overflow
            self._persist_dropped()
            self._report(
                "dropped",
                "joule_otel: ledger rows could not be written and the memory bound of %d rows "
                "was reached; %d rows dropped so far (see joule_otel.stats())",
                self.max_pending_rows,
                self.stats.rows_dropped,
            )
        self.stats.pending_rows = len(self._rows)

    def _persist_dropped(self) -> None:
        """Best effort: leave the drop count where ``joule-otel ledger stats`` finds it."""
        try:
            report = self.spool.dir / f"dropped-{os.getpid()}.json"
            report.write_text(json.dumps({"pid": os.getpid(), "rows_dropped": self.stats.rows_dropped}))
        except OSError:
            pass

    def write_segment(self) -> bool:
        """Write buffered rows as one segment; False (rows kept) if the disk refused."""
        if not self._rows:
            return True
        try:
            table = rows_to_arrow(self._rows)
        except Exception:  # a value no column can hold: set that row aside, never the rows around it
            table = self._arrow_of_writable_rows()
            if table is None:
                return True
        try:
            self.spool.write_segment(table)
        except OSError as exc:
            self.stats.spool_errors += 1
            self._report(
                "spool",
                "joule_otel: cannot write ledger segments to %s (%s); %d rows wait in memory and the app keeps running",
                self.spool.dir,
                exc,
                len(self._rows),
            )
            return False
        self._reported.discard("spool")
        self.stats.rows_spooled += len(self._rows)
        self.stats.segments_written += 1
        self._rows = []
        self.stats.pending_rows = 0
        return True

    def _arrow_of_writable_rows(self) -> Any | None:
        """Drop (count, log once) the rows Arrow cannot take, convert the rest; None if none is left."""
        kept: list[LedgerRow] = []
        for row in self._rows:
            reason = problem(row)
            if reason is None:
                try:
                    rows_to_arrow([row])
                except Exception as exc:
                    reason = f"{type(exc).__name__}: {exc}"
            if reason is None:
                kept.append(row)
                continue
            self.stats.rows_invalid += 1
            self._report(
                f"invalid:{reason.split(' ', 1)[0]}",
                "joule_otel: a ledger row could not be written and was dropped (%s); the other rows are kept. "
                "Please report this: capture should have cleaned the value",
                reason,
            )
        self._rows = kept
        self.stats.pending_rows = len(kept)
        return rows_to_arrow(kept) if kept else None

    def commit(
        self, rows: list[LedgerRow], *, durable: bool, final: bool = False, compact: bool = True, timeout_s: float = 0.0
    ) -> bool:
        """Take ``rows`` and keep the ledger's schedule, the same for every writer; True if what was due reached disk.

        A segment is written when the caller needs its rows durable (a flush, the flush interval, a receiver about to
        answer its sender), at the end, and past :data:`SEGMENT_MAX_ROWS`; compaction runs when the oldest segment is
        due, and at the end (``final``) is forced, waiting up to ``timeout_s`` for the file.
        """
        if rows:
            self.append(rows)
        ok = True
        if durable or final or self.stats.pending_rows >= SEGMENT_MAX_ROWS:
            ok = self.write_segment()
        if compact:
            self.compact(force=final, timeout_s=timeout_s if final else 0.0)
        return ok

    def compact(self, *, force: bool = False, timeout_s: float = 0.0) -> None:
        """Compact the spool into the DuckDB file when due (or ``force``); never raises."""
        now = time.monotonic()
        if not force:
            if now - self._last_compact < self.compact_interval_s:
                return
            age = self.spool.oldest_segment_age_s()
            if age is None:
                return  # nothing waits (a scan of the spool folder each cycle until something does)
            if age < self.compact_interval_s:
                self._last_compact = now - age  # due when the oldest segment is an interval old
                return  # another process compacted a moment ago
        self._last_compact = now
        try:
            with self.spool.locked(exclusive=True, timeout_s=timeout_s):
                result = compact_locked(self.spool)
        except LockBusy:
            return  # another process is compacting or a reader is reading: our segments wait
        except Exception as exc:
            self._compact_failed(exc)
            return
        self._reported.discard("compact")
        self._reported.discard("disk-full")
        self.stats.rows_compacted += result.rows_inserted

    def _compact_failed(self, exc: Exception) -> None:
        self.stats.compact_errors += 1
        if is_disk_full(exc):
            self._report(
                "disk-full",
                "joule_otel: disk full: no space left for the ledger %s; rows wait in %s and are compacted by "
                "themselves once space returns",
                self.db_path,
                self.spool.dir,
            )
            return
        if isinstance(exc, OSError):  # the ledger's folder itself is unusable: the spool error says so already
            self._report(
                "spool",
                "joule_otel: cannot use the ledger folder %s (%s); the app keeps running",
                self.db_path.parent,
                exc,
            )
        elif isinstance(exc, LedgerUnavailable):
            if "held by another process" in str(exc):
                return  # a foreign DuckDB client has the file open; segments wait on disk
            self._report(
                "compact",
                "joule_otel: %s. Rows wait in %s; move the file away or set JOULE_OTEL_DB",
                exc,
                self.spool.dir,
            )
        else:
            self._report("compact-other", "joule_otel: compacting the ledger %s failed: %s", self.db_path, exc)
