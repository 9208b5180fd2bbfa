"""Compaction: move spooled segments into the DuckDB file, exactly once.

Each batch of segments is inserted and its names recorded in ``joule_segments`` in one transaction,
so a compactor killed after the commit but before deleting the files never inserts them twice;
a receipt already in the ledger is not inserted again (an anti-join, see :func:`_insert_new_rows`),
so the same receipt seen twice is one row. Unreadable segments are quarantined, never fatal.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from joule_otel.ledger import _schema as schema
from joule_otel.ledger._retention import apply_retention, retention, try_rewrite
from joule_otel.ledger._spool import Spool

_log = logging.getLogger("joule_otel")

BATCH_SEGMENTS = 256
DEDUPE_WINDOW = datetime.timedelta(days=1)
"""How far apart two rows of one receipt may start and still be recognised as one."""


class LedgerUnavailable(Exception):
    """The DuckDB file cannot be opened for writing (held by a foreign process, corrupt, or not DuckDB)."""


@dataclass
class CompactResult:
    """What one compaction did."""

    segments: int = 0
    rows_inserted: int = 0
    already_compacted: int = 0
    quarantined: list[Path] = field(default_factory=list)
    rollup_rows: int | None = None
    rows_pruned: int = 0
    """Rows older than ``JOULE_OTEL_RETENTION`` deleted (their totals kept in the rollup)."""


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (an OSError or a DuckDB error, or what caused it) says the disk has no space left."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(seen).lower()
        if "no space left" in text or "disk quota exceeded" in text or "disk is full" in text:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _remove_empty(db_path: Path) -> None:
    """Remove a 0-byte ledger file: a first compaction that died (a full disk, a kill) left it, and it holds nothing."""
    with contextlib.suppress(OSError):
        if db_path.stat().st_size == 0:
            db_path.unlink()
            db_path.with_name(db_path.name + ".wal").unlink(missing_ok=True)
            _log.warning("joule_otel: removed the empty ledger file %s left by an interrupted first write", db_path)


def open_writable(db_path: Path) -> object:
    """Open the DuckDB file read-write and migrate it; :class:`LedgerUnavailable` says why it cannot."""
    import duckdb

    _remove_empty(db_path)
    try:
        con = duckdb.connect(str(db_path))
    except duckdb.IOException as exc:
        message = str(exc)
        if "lock" in message.lower():
            raise LedgerUnavailable(f"{db_path} is held by another process: {message}") from exc
        raise LedgerUnavailable(f"{db_path} is not a DuckDB ledger that can be opened: {message}") from exc
    except duckdb.Error as exc:
        raise LedgerUnavailable(f"{db_path} cannot be opened: {exc}") from exc
    try:
        schema.migrate(con)
    except duckdb.Error as exc:
        con.close()
        raise LedgerUnavailable(f"{db_path} is not a joule-otel ledger: {exc}") from exc
    except schema.LedgerTooNew as exc:
        con.close()
        raise LedgerUnavailable(f"{db_path}: {exc}") from exc
    return con


def _readable(segment: Path) -> bool:
    import pyarrow.parquet as pq

    try:
        meta = pq.read_metadata(segment)
    except Exception:
        return False
    return bool(meta.num_columns)


def _insert_new_rows(con: Any, files: list[str]) -> int:
    """Insert the segments' rows whose receipt the ledger does not hold yet; returns how many.

    A row's identity is its receipt id, else (a call refused without one) its trace and span id: OTLP senders retry,
    so the same call event may arrive twice. Within the batch an identity keeps its first row. Against the ledger
    it is an anti-join on the identity,
    limited to the batch's time span widened by :data:`DEDUPE_WINDOW` (a receipt seen again carries the
    start time it had: a replayed segment holds the very same rows), so the check reads a few row groups
    by their zone maps instead of the whole table or a unique index that every insert would maintain.
    """
    columns = ", ".join(schema.COLUMN_NAMES)
    low, high = con.execute("SELECT min(started_at), max(started_at) FROM read_parquet(?)", [files]).fetchone()
    if low is None:
        return 0
    # the identity of a row: its receipt, else (a refused call) its span; a row with neither is never a duplicate
    identity = "coalesce(receipt_id, CASE WHEN span_id IS NOT NULL THEN 'span:' || trace_id || ':' || span_id END)"
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE fresh AS SELECT {columns} "
        f"FROM ({schema.parquet_select(con, files)}) AS incoming "
        f"WHERE {identity} IS NULL OR {identity} NOT IN ("
        f"  SELECT {identity} FROM {schema.TABLE} WHERE {identity} IS NOT NULL AND started_at BETWEEN ? AND ?) "
        f"QUALIFY {identity} IS NULL OR row_number() OVER (PARTITION BY {identity} ORDER BY started_at) = 1",
        [files, low - DEDUPE_WINDOW, high + DEDUPE_WINDOW],
    )
    inserted = int(con.execute(f"INSERT INTO {schema.TABLE} ({columns}) SELECT {columns} FROM fresh").fetchone()[0])
    if inserted:
        _merge_rollup(con)
        schema.merge_tag_values(con, "fresh")
        cut = schema.pruned_before(con)
        if cut is not None and low < cut:
            # a late row from before the retention boundary (a spool that waited): its totals join the rollup's
            # pruned hours, the row itself is not kept, as a prune would not have kept it
            con.execute(f"DELETE FROM {schema.TABLE} WHERE started_at < ? AND started_at >= ?", [cut, low])
            schema.forget_tag_values(con, f"(SELECT tags FROM fresh WHERE started_at < '{cut.isoformat()}')")
    con.execute("DROP TABLE fresh")
    return inserted


def _merge_rollup(con: Any) -> None:
    """Fold the fresh rows into the hourly rollup.

    The touched hours are re-summed from their rollup rows and the fresh rows' facts, so the rollup stays
    one row per hour and key (its measures are sums, mins and maxes).
    """
    rollup = schema.ROLLUP_TABLE
    con.execute(
        "CREATE OR REPLACE TEMP TABLE fresh_rollup AS "
        + schema.rollup_select_sql(f"(SELECT {schema.raw_facts_sql()} FROM fresh)")
    )
    keys = ", ".join(name for name, _ in schema.FACT_KEYS)
    measures = ", ".join(name for name, _, _ in schema.FACT_MEASURES)
    con.execute(
        "CREATE OR REPLACE TEMP TABLE merged_rollup AS "
        + schema.rollup_select_sql(
            f"(SELECT hour AS t, {keys}, {measures} FROM {rollup} "
            "WHERE hour IN (SELECT DISTINCT hour FROM fresh_rollup) "
            f"UNION ALL BY NAME SELECT hour AS t, {keys}, {measures} FROM fresh_rollup)"
        )
    )
    con.execute(f"DELETE FROM {rollup} WHERE hour IN (SELECT DISTINCT hour FROM fresh_rollup)")
    con.execute(f"INSERT INTO {rollup} BY NAME SELECT * FROM merged_rollup")
    con.execute("DROP TABLE fresh_rollup")
    con.execute("DROP TABLE merged_rollup")


def compact_locked(spool: Spool) -> CompactResult:
    """Compact every segment into the ledger. The caller holds the exclusive lock."""
    result = CompactResult()
    spool.sweep_torn()
    segments = spool.segments()
    if not segments and spool.db_path.exists():
        return result
    created = not spool.db_path.exists()
    try:
        return _compact_into(spool, segments, result)
    except BaseException:
        if created:  # a file this compaction created and could not finish holds nothing: never leave it behind
            for leftover in (spool.db_path, spool.db_path.with_name(spool.db_path.name + ".wal")):
                with contextlib.suppress(OSError):
                    leftover.unlink()
        raise


def _compact_into(spool: Spool, segments: list[Path], result: CompactResult) -> CompactResult:
    keep, rewrite_due = None, False
    con = open_writable(spool.db_path)
    try:
        names = [s.name for s in segments]
        done: set[str] = set()
        if names:
            done = {
                r[0]
                for r in con.execute(  # type: ignore[attr-defined]
                    "SELECT name FROM joule_segments WHERE name IN (SELECT unnest(?))", [names]
                ).fetchall()
            }
        pending: list[Path] = []
        for segment in segments:
            if segment.name in done:
                result.already_compacted += 1
            elif _readable(segment):
                pending.append(segment)
            else:
                result.quarantined.append(spool.quarantine(segment))
                _log.error(
                    "joule_otel: ledger segment %s is unreadable; moved to %s",
                    segment.name,
                    spool.quarantine_dir,
                )
        for start in range(0, len(pending), BATCH_SEGMENTS):
            batch = pending[start : start + BATCH_SEGMENTS]
            con.execute("BEGIN TRANSACTION")  # type: ignore[attr-defined]
            try:
                inserted = _insert_new_rows(con, [str(p) for p in batch])
                con.execute(  # type: ignore[attr-defined]
                    "INSERT OR IGNORE INTO joule_segments SELECT unnest(?), NULL, now()",
                    [[p.name for p in batch]],
                )
                con.execute("COMMIT")  # type: ignore[attr-defined]
            except Exception:
                # a failed COMMIT (a full disk) may have ended the transaction already: the first error is the one
                # worth reporting, never "cannot rollback - no transaction is active"
                with contextlib.suppress(Exception):
                    con.execute("ROLLBACK")  # type: ignore[attr-defined]
                raise
            result.rows_inserted += inserted
            result.segments += len(batch)
            done.update(p.name for p in batch)
        con.execute(  # type: ignore[attr-defined]
            "DELETE FROM joule_segments WHERE compacted_at < now() - INTERVAL 30 DAY"
        )
        keep = retention()
        if keep is not None:
            pruned, rewrite_due = apply_retention(con, keep)
            result.rows_pruned = pruned
    finally:
        con.close()  # type: ignore[attr-defined]
    if keep is not None and rewrite_due:
        try_rewrite(spool.db_path)
    for segment in segments:
        if segment.name in done:
            with contextlib.suppress(FileNotFoundError):
                segment.unlink()
    return result


def compact(db_path: Path, *, timeout_s: float = 0.0) -> CompactResult:
    """Take the exclusive lock (waiting up to ``timeout_s``) and compact.

    Raises:
        LockBusy: another process holds the lock.
        LedgerUnavailable: the DuckDB file cannot be opened for writing.
    """
    spool = Spool(db_path)
    with spool.locked(exclusive=True, timeout_s=timeout_s):
        return compact_locked(spool)
