"""Reading the ledger while apps write it: the DuckDB file plus the segments not yet compacted.

Readers never hold the file across calls: :func:`connect` takes the shared lock, attaches the file
read-only, and releases both when the ``with`` block ends, so writers compact in between.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import date, datetime, time, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import duckdb

from joule_otel.ledger import _schema as schema
from joule_otel.ledger._spool import Spool

_log = logging.getLogger("joule_otel")


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _empty_select() -> str:
    return "SELECT " + ", ".join(f"CAST(NULL AS {kind}) AS {name}" for name, kind in schema.COLUMNS) + " WHERE false"


@contextmanager
def connect(db_path: str | os.PathLike[str], *, timeout_s: float = 10.0) -> Iterator[duckdb.DuckDBPyConnection]:
    """A DuckDB connection whose ``inference_calls`` view holds every row written so far.

    Its parts are there too, for queries that read them apart: ``compacted_calls`` (the file),
    ``pending_calls`` (spooled rows not yet compacted) and, when the file has it, ``calls_rollup`` (the
    hourly rollup of ``compacted_calls``).

    Args:
        db_path: the ledger file.
        timeout_s: how long to wait for a compaction in progress to finish.

    Yields:
        An in-memory DuckDB connection; query ``inference_calls`` as if it were the ledger table.
    """
    import duckdb

    path = Path(db_path).expanduser()
    spool = Spool(path)
    con = duckdb.connect(":memory:")
    try:
        with spool.locked(exclusive=False, timeout_s=timeout_s):
            _attach(con, path, spool, "ledger", rollup=True)
            con.execute("CREATE TEMP VIEW compacted_calls AS SELECT * FROM ledger_compacted")
            con.execute("CREATE TEMP VIEW pending_calls AS SELECT * FROM ledger_pending")
            con.execute(
                f"CREATE TEMP VIEW {schema.TABLE} AS "
                "SELECT * FROM compacted_calls UNION ALL SELECT * FROM pending_calls"
            )
            yield con
    finally:
        con.close()


@contextmanager
def connect_many(
    db_paths: list[str | os.PathLike[str]], *, timeout_s: float = 10.0
) -> Iterator[duckdb.DuckDBPyConnection]:
    """A DuckDB connection whose ``ledger_calls`` view holds every row of several ledgers, each with its index.

    ``ledger_calls`` has the columns of ``inference_calls`` and ``ledger`` (the position of its file in
    ``db_paths``). Every ledger is read as :func:`connect` reads one, under its own shared lock.

    Raises:
        ValueError: a ledger given twice.
    """
    import duckdb

    paths = [Path(p).expanduser() for p in db_paths]
    seen: set[Path] = set()
    for path in paths:
        resolved = path.resolve()
        if resolved in seen:
            raise ValueError(f"{path} is given twice")
        seen.add(resolved)
    con = duckdb.connect(":memory:")
    try:
        with ExitStack() as locks:
            selects = []
            for index, path in enumerate(paths):
                spool = Spool(path)
                locks.enter_context(spool.locked(exclusive=False, timeout_s=timeout_s))
                alias = f"ledger{index}"
                _attach(con, path, spool, alias, rollup=False)
                selects.append(
                    f"SELECT *, {index} AS ledger FROM {alias}_compacted UNION ALL "
                    f"SELECT *, {index} AS ledger FROM {alias}_pending"
                )
            con.execute("CREATE TEMP VIEW ledger_calls AS " + " UNION ALL ".join(selects or [_empty_select()]))
            yield con
    finally:
        con.close()


def _attach(con: duckdb.DuckDBPyConnection, path: Path, spool: Spool, alias: str, *, rollup: bool) -> None:
    """Views ``{alias}_compacted`` (the file's rows) and ``{alias}_pending`` (spooled rows not yet compacted)."""
    import duckdb

    compacted_select = _empty_select()
    compacted: set[str] = set()
    if path.exists() and path.stat().st_size > 0:
        try:
            con.execute(f"ATTACH {_quote(str(path))} AS {alias} (READ_ONLY)")
            tables = {
                r[0]
                for r in con.execute(
                    "SELECT table_name FROM duckdb_tables() WHERE database_name = ?", [alias]
                ).fetchall()
            }
            if "joule_meta" in tables:
                found = con.execute(f"SELECT value FROM {alias}.joule_meta WHERE key = 'schema_version'").fetchone()
                if found is not None and schema.version_of(found[0]) > schema.SCHEMA_VERSION:
                    # its columns may mean what this code cannot know: no answer rather than a wrong one
                    raise schema.LedgerTooNew(
                        f"{path} is at ledger schema version {found[0]}, written by a newer joule-otel; this one reads "
                        f"up to version {schema.SCHEMA_VERSION}: upgrade joule-otel to read it"
                    )
            if schema.TABLE in tables:
                present = {
                    r[0]
                    for r in con.execute(
                        "SELECT column_name FROM duckdb_columns() WHERE database_name = ? AND table_name = ?",
                        [alias, schema.TABLE],
                    ).fetchall()
                }
                compacted_select = f"SELECT {schema.select_list(present)} FROM {alias}.{schema.TABLE}"
                rollup_columns = {
                    r[0]
                    for r in con.execute(
                        "SELECT column_name FROM duckdb_columns() WHERE database_name = ? AND table_name = ?",
                        [alias, schema.ROLLUP_TABLE],
                    ).fetchall()
                }
                # a rollup of an older version (without a key this code groups by) is not read: the
                # dashboard reads single calls until a writer migrates the file
                if rollup and rollup_columns >= {name for name, _ in schema.FACT_KEYS}:
                    con.execute(f"CREATE TEMP VIEW calls_rollup AS SELECT * FROM {alias}.{schema.ROLLUP_TABLE}")
                cut = schema.pruned_before(con, f"{alias}.") if "joule_meta" in tables else None
                if rollup and cut is not None:  # rows before it were pruned: the rollup holds their totals
                    con.execute("CREATE TEMP TABLE joule_pruned AS SELECT ?::TIMESTAMPTZ AS before", [cut])
                if rollup and schema.TAG_VALUES_TABLE in tables:
                    con.execute(f"CREATE TEMP VIEW tag_values AS SELECT * FROM {alias}.{schema.TAG_VALUES_TABLE}")
            if "joule_segments" in tables:
                compacted = {r[0] for r in con.execute(f"SELECT name FROM {alias}.joule_segments").fetchall()}
        except duckdb.Error as exc:
            _log.warning("joule_otel: cannot read %s (%s); showing only rows not yet compacted", path, exc)
    con.execute(f"CREATE TEMP VIEW {alias}_compacted AS {compacted_select}")
    con.execute(f"CREATE TEMP TABLE {alias}_pending AS {_empty_select()}")
    pending = [str(s) for s in spool.segments() if s.name not in compacted]
    if pending:
        try:
            con.execute(f"INSERT INTO {alias}_pending {schema.parquet_select(con, pending)}", [pending])
        except duckdb.Error as exc:
            _log.warning("joule_otel: skipping unreadable spooled segments: %s", exc)


def require_ledger(path: Path, how_to_choose: str) -> None:
    """A ``FileNotFoundError`` that says so when nothing has been recorded at ``path`` (no file, no segment).

    Reading a ledger that is not there is a mistaken path far more often than an empty ledger, so it is
    said, never answered with an empty result; the demo's own ledger is named when it lies beside it.
    """
    if path.exists() or Spool(path).segments():
        return
    demo = path.with_name("demo.duckdb")
    hint = f"; the demo's ledger is {demo}" if path.name != demo.name and demo.exists() else ""
    raise FileNotFoundError(
        f"no ledger at {path}: nothing has been recorded there yet (instrument() writes it; {how_to_choose}){hint}"
    )


TimeBound = datetime | date | str | timedelta
"""What ``since``/``until`` accept: an instant, a day, an ISO 8601 text, or a span of time before now."""


def read_calls(
    db: str | os.PathLike[str] | None = None,
    *,
    since: TimeBound | None = None,
    until: TimeBound | None = None,
    workload: str | Iterable[str] | None = None,
    service: str | Iterable[str] | None = None,
    limit: int | None = None,
    db_path: str | os.PathLike[str] | None = None,
) -> Any:
    """Rows of ``inference_calls`` as a pandas DataFrame, newest first, optionally filtered.

    Args:
        db: the ledger; defaults to ``JOULE_OTEL_DB`` or the per-user default.
        since: keep rows started at or after this time.
        until: keep rows started before this time.
        workload: keep one workload, or any of several.
        service: keep one ``service.name``, or any of several.
        limit: at most this many rows.
        db_path: the former name of ``db``.

    A time is a :class:`~datetime.datetime` (a naive one is local time, as :meth:`datetime.now` gives),
    a :class:`~datetime.date` (its local midnight), an ISO 8601 text (``"2026-12-01"``,
    ``"2026-12-01T09:00Z"``) or a :class:`~datetime.timedelta` before now (``since=timedelta(hours=1)``).

    Raises:
        ValueError: an argument that is not one of the above (the message says what is accepted).
        FileNotFoundError: no ledger at the path (nothing has been recorded there).
    """
    from joule_otel._config import db_path_from_env

    if db is not None and db_path is not None:
        raise ValueError("pass the ledger as db= (db_path= is its former name), not both")
    chosen = db if db is not None else db_path
    if chosen is not None and not isinstance(chosen, (str, os.PathLike)):
        raise ValueError(f"db: {chosen!r} is not a path; pass a str or a pathlib.Path of a ledger file")
    path = Path(chosen).expanduser() if chosen is not None else db_path_from_env()
    if path is None:
        raise ValueError("the ledger is off (JOULE_OTEL_DB=off); pass db= the path of a ledger file")
    where: list[str] = []
    params: list[object] = []
    now = datetime.now(timezone.utc)
    for clause, value, name in (("started_at >= ?", since, "since"), ("started_at < ?", until, "until")):
        if value is not None:
            where.append(clause)
            params.append(_instant(name, value, now))
    for column, wanted in (("workload", workload), ("service", service)):
        if wanted is not None:
            names = _names(column, wanted)
            where.append(f"{column} IN ({', '.join('?' * len(names))})" if names else "false")
            params.extend(names)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit: {limit!r} is not a number of rows; pass an int >= 0")
    require_ledger(path, "JOULE_OTEL_DB or db= choose another")
    sql = f"SELECT * FROM {schema.TABLE}"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY started_at DESC"
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    with connect(path) as con:
        return con.execute(sql, params).df()


def _instant(name: str, value: object, now: datetime) -> datetime:
    """``value`` as an aware instant, or a ``ValueError`` naming what ``name`` accepts."""
    given = value
    if isinstance(value, timedelta):
        return now - value
    if isinstance(value, str):
        text = value.strip()
        if text.endswith(("Z", "z")):  # Python 3.10's fromisoformat does not read the suffix
            text = text[:-1] + "+00:00"
        try:
            value = datetime.fromisoformat(text)
        except ValueError:
            value = None
    if isinstance(value, datetime):
        return value if value.tzinfo is not None else value.astimezone()
    if isinstance(value, date):
        return datetime.combine(value, time()).astimezone()
    raise ValueError(
        f"{name}: {given!r} is not a time; pass a datetime, a date, an ISO 8601 text such as "
        "'2026-12-01' or '2026-12-01T09:00Z', or a timedelta before now"
    )


def _names(name: str, value: object) -> list[str]:
    """One name or several, as a list; a ``ValueError`` for anything else."""
    names: list[object] | None = None
    if isinstance(value, str):
        names = [value]
    elif isinstance(value, (list, tuple, set, frozenset)):
        names = list(value)
    if names is None or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{name}: {value!r} is not a name; pass a str, or a list of str for any of several")
    return [str(n) for n in names]
