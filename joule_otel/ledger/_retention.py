"""Retention: raw rows older than a date are deleted; the hourly rollup keeps their totals; the file shrinks.

``joule_meta.pruned_before`` records the boundary (a whole UTC hour): rows before it are gone, and the rollup's
hours before it are totals only. Compaction keeps it so: a late row from before the boundary (a spool that waited)
is added to the rollup and not kept as a row. So the rollup always equals the rows it summarises plus what was
pruned, and readers know which figures come from totals only.

DuckDB reuses the blocks a DELETE frees but never gives them back to the disk (the file even grows a little, and
a row group partly deleted frees nothing): when a prune deletes more than :data:`REWRITE_SHARE` of the rows, or
leaves that share of the file's blocks free, the file is rewritten (``COPY FROM DATABASE`` into a new file, then
renamed over the old one), under the exclusive lock that keeps writers and readers away. A process killed midway
leaves the old file whole and a ``.rewrite`` file that the next prune removes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from joule_otel._config import JOULE_OTEL_RETENTION
from joule_otel.ledger import _schema as schema
from joule_otel.ledger._spool import Spool

_log = logging.getLogger("joule_otel")

REWRITE_SHARE = 0.25
"""Past this share of the rows deleted (or of the file's blocks free) after a prune, the file is rewritten."""


@dataclass
class PruneResult:
    """What a prune did."""

    rows_deleted: int
    pruned_before: datetime
    bytes_before: int
    bytes_after: int
    rewritten: bool


def boundary(moment: datetime | date) -> datetime:
    """The whole UTC hour at or before ``moment`` (a date is its midnight, UTC)."""
    if not isinstance(moment, datetime):
        moment = datetime.combine(moment, datetime.min.time(), timezone.utc)
    elif moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).replace(minute=0, second=0, microsecond=0)


def parse_retention(text: str) -> timedelta:
    """``90d``, ``12w``, ``6m`` (30-day months) or ``1y`` (365 days).

    Raises:
        ValueError: anything else, or less than a day.
    """
    found = re.fullmatch(r"\s*(\d+)\s*([dwmy])\s*", text.lower())
    if not found:
        raise ValueError(f"retention {text!r}: use days, weeks, months or years, e.g. 90d, 12w, 6m, 1y")
    days = int(found[1]) * {"d": 1, "w": 7, "m": 30, "y": 365}[found[2]]
    if days < 1:
        raise ValueError(f"retention {text!r}: at least a day")
    return timedelta(days=days)


def prune_rows(con: Any, before: datetime) -> int:
    """Delete the rows before ``before`` and record it as the boundary (never moved back); the rows deleted."""
    previous = schema.pruned_before(con)
    if previous is not None and previous > before:
        before = previous
    # the tag filters list what the rows hold: the pruned rows' tags go with them (their totals keep no tags)
    schema.forget_tag_values(con, f"(SELECT tags FROM {schema.TABLE} WHERE started_at < '{before.isoformat()}')")
    deleted = int(con.execute(f"DELETE FROM {schema.TABLE} WHERE started_at < ?", [before]).fetchone()[0])
    con.execute("INSERT OR REPLACE INTO joule_meta VALUES (?, ?)", [schema.PRUNED_BEFORE, before.isoformat()])
    return deleted


def prune(
    db_path: Path, before: datetime | date, *, timeout_s: float = 60.0, rewrite: bool | None = None
) -> PruneResult:
    """Delete the ledger's rows before ``before`` (its whole UTC hour), keep their totals, give the space back.

    Spooled rows are compacted first, so no row before the boundary outlives it. ``rewrite``: True always rewrites
    the file, False never, None when worth it (:data:`REWRITE_SHARE`).

    Raises:
        LockBusy: writers or readers held the ledger longer than ``timeout_s``.
        LedgerUnavailable: the file cannot be opened for writing.
    """
    import duckdb

    from joule_otel.ledger._compact import compact_locked, open_writable

    cut = boundary(before)
    worth = False
    spool = Spool(db_path)
    with spool.locked(exclusive=True, timeout_s=timeout_s):
        compact_locked(spool)
        size = db_path.stat().st_size if db_path.exists() else 0
        con: Any = open_writable(db_path)
        try:
            held = int(con.execute(f"SELECT count(*) FROM {schema.TABLE}").fetchone()[0])
            con.execute("BEGIN TRANSACTION")
            deleted = prune_rows(con, cut)
            con.execute("COMMIT")
            cut = schema.pruned_before(con) or cut
            try:
                con.execute("CHECKPOINT")
                worth = _worth_rewriting(con, deleted, held)
            except duckdb.Error as exc:  # the prune is committed to the write-ahead log, which the next open replays
                _log.warning(
                    "joule_otel: %s: pruned, but the file could not be checkpointed (%s); its write-ahead log keeps "
                    "the prune and the next compaction writes it",
                    db_path,
                    " ".join(str(exc).split()),
                )
                rewrite = False
        finally:
            con.close()
        rewritten = (bool(rewrite) or (rewrite is None and worth)) and try_rewrite(db_path)
    return PruneResult(deleted, cut, size, db_path.stat().st_size, rewritten)


def retention() -> timedelta | None:
    """``JOULE_OTEL_RETENTION`` (``90d``), else None; a value that cannot be read is logged once and ignored."""
    raw = os.environ.get(JOULE_OTEL_RETENTION, "").strip()
    if not raw:
        return None
    try:
        return parse_retention(raw)
    except ValueError as exc:
        if raw not in _warned:
            _warned.add(raw)
            _log.warning("joule_otel: %s: %s; nothing is pruned", JOULE_OTEL_RETENTION, exc)
        return None


_warned: set[str] = set()


def apply_retention(con: Any, keep: timedelta, now: datetime | None = None) -> tuple[int, bool]:
    """Prune what ``keep`` no longer keeps (to a whole UTC day, at most once a day); (rows deleted, rewrite due).

    ``con`` is a compactor's connection, its exclusive lock held.
    """
    cut = boundary((now or datetime.now(timezone.utc)) - keep).replace(hour=0)
    previous = schema.pruned_before(con)
    if previous is not None and cut <= previous:
        return 0, False
    held = int(con.execute(f"SELECT count(*) FROM {schema.TABLE}").fetchone()[0])
    con.execute("BEGIN TRANSACTION")
    try:
        deleted = prune_rows(con, cut)
        con.execute("COMMIT")
    except Exception:
        with contextlib.suppress(Exception):
            con.execute("ROLLBACK")
        raise
    if not deleted:
        return 0, False
    con.execute("CHECKPOINT")
    return deleted, _worth_rewriting(con, deleted, held)


def _worth_rewriting(con: Any, deleted: int, held: int) -> bool:
    """Whether a prune that deleted ``deleted`` of ``held`` rows should give the space back by a rewrite."""
    if not deleted:
        return False
    if deleted > REWRITE_SHARE * held:
        return True
    row = con.execute("PRAGMA database_size").fetchone()
    info = dict(zip([d[0] for d in con.description], row, strict=True))
    total = int(info.get("total_blocks") or 0)
    return bool(total) and int(info.get("free_blocks") or 0) / total > REWRITE_SHARE


def try_rewrite(db_path: Path) -> bool:
    """:func:`rewrite_file`, or a warning when it cannot be done (a full disk): the prune stands, the space waits."""
    try:
        rewrite_file(db_path)
    except Exception as exc:  # the rows are deleted and committed already: only the shrinking failed
        _log.warning(
            "joule_otel: %s: pruned, but the file could not be rewritten to give the space back (%s); "
            "the next prune tries again",
            db_path,
            exc,
        )
        return False
    return True


def rewrite_file(db_path: Path) -> None:
    """Copy the ledger into a new file and rename it over the old one. The caller holds the exclusive lock."""
    import duckdb

    fresh = db_path.with_name(db_path.name + ".rewrite")
    leftovers = (fresh, fresh.with_name(fresh.name + ".wal"))
    for leftover in leftovers:
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
    con = duckdb.connect(":memory:")
    try:
        con.execute(f"ATTACH '{_quoted(db_path)}' AS old (READ_ONLY)")
        con.execute(f"ATTACH '{_quoted(fresh)}' AS fresh")
        con.execute("COPY FROM DATABASE old TO fresh")
        con.execute("DETACH fresh")
        con.execute("DETACH old")
    except BaseException:
        con.close()
        for leftover in leftovers:  # a copy the disk refused leaves its write-ahead log too
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
        raise
    con.close()
    with open(fresh, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(fresh, db_path)
    directory = os.open(db_path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _quoted(path: Path) -> str:
    return str(path).replace("'", "''")


@dataclass
class EraseResult:
    """What an erase removed (or would remove)."""

    rows: int
    energy_j: float
    rollup_rows: int
    """Hourly totals removed (a workload's or service's, pruned hours included) or re-summed (a tag's)."""
    pruned_hours_kept: bool
    """A tag was erased while hours before the retention boundary remain: their totals may hold its calls."""


def erase(
    db_path: Path,
    *,
    workload: str | None = None,
    service: str | None = None,
    tag: tuple[str, str] | None = None,
    before: datetime | date | None = None,
    apply: bool = False,
    timeout_s: float = 60.0,
) -> EraseResult:
    """Delete one workload's, service's or tag's calls (before ``before``, if given) and their share of the totals.

    A workload and a service are keys of the hourly rollup: their totals go too, pruned hours included. A tag is not:
    the hours whose rows are erased are re-summed from the rows left, and the totals of pruned hours, which keep no
    tags, are left as they are (``pruned_hours_kept`` says when there are some). ``apply=False`` only counts.

    Raises:
        ValueError: not exactly one of ``workload``, ``service`` and ``tag``.
        LockBusy: writers or readers held the ledger longer than ``timeout_s``.
    """
    from joule_otel.ledger._compact import compact_locked, open_writable

    chosen = [c for c in (workload, service, tag) if c is not None]
    if len(chosen) != 1:
        raise ValueError("erase one thing: a workload, a service or a tag (key=value)")
    params: list[Any] = []
    if tag is not None:
        key, value = tag
        condition = "tags[?] = ?"
        params += [key, value]
    else:
        column = "workload" if workload is not None else "service"
        condition = f"{column} = ?"
        params.append(workload if workload is not None else service)
    cut = boundary(before) if before is not None else None
    rows_condition = condition + (" AND started_at < ?" if cut is not None else "")
    rows_params = params + ([cut] if cut is not None else [])
    spool = Spool(db_path)
    with spool.locked(exclusive=True, timeout_s=timeout_s):
        compact_locked(spool)
        con: Any = open_writable(db_path)
        try:
            found = con.execute(
                f"SELECT count(*), coalesce(sum(energy_j), 0) FROM {schema.TABLE} WHERE {rows_condition}", rows_params
            ).fetchone()
            rows, energy = int(found[0]), float(found[1])
            pruned = schema.pruned_before(con)
            rollup_rows = 0
            if apply:
                con.execute("BEGIN TRANSACTION")
                try:
                    rollup_rows = _erase_locked(
                        con, tag is not None, rows_condition, rows_params, condition, params, cut
                    )
                    con.execute("COMMIT")
                except Exception:
                    with contextlib.suppress(Exception):
                        con.execute("ROLLBACK")
                    raise
                con.execute("CHECKPOINT")
        finally:
            con.close()
    return EraseResult(rows, energy, rollup_rows, tag is not None and pruned is not None)


def _erase_locked(
    con: Any,
    by_tag: bool,
    rows_condition: str,
    rows_params: list[Any],
    condition: str,
    params: list[Any],
    cut: datetime | None,
) -> int:
    """Delete the rows and their share of the rollup and of the tag counts; the rollup rows removed or re-summed."""
    rollup = schema.ROLLUP_TABLE
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE erased AS SELECT * FROM {schema.TABLE} WHERE {rows_condition}", rows_params
    )
    schema.forget_tag_values(con, "erased")
    con.execute(f"DELETE FROM {schema.TABLE} WHERE {rows_condition}", rows_params)
    if not by_tag:  # a rollup key: its totals go, pruned hours too
        since = " AND hour < ?" if cut is not None else ""
        removed = con.execute(f"DELETE FROM {rollup} WHERE {condition}{since}", params + ([cut] if cut else []))
        count = int(removed.fetchone()[0])
    else:  # the touched hours, re-summed from the rows left (pruned hours keep no tags: they stay as they are)
        con.execute(
            "CREATE OR REPLACE TEMP TABLE touched AS SELECT DISTINCT to_timestamp(epoch_us(started_at) // 3600000000 "
            "* 3600) AS hour FROM erased"
        )
        count = int(con.execute(f"DELETE FROM {rollup} WHERE hour IN (SELECT hour FROM touched)").fetchone()[0])
        con.execute(
            f"INSERT INTO {rollup} "
            + schema.rollup_select_sql(
                f"(SELECT {schema.raw_facts_sql()} FROM {schema.TABLE} "
                "WHERE to_timestamp(epoch_us(started_at) // 3600000000 * 3600) IN (SELECT hour FROM touched))"
            )
        )
        con.execute("DROP TABLE touched")
    con.execute("DROP TABLE erased")
    return count
