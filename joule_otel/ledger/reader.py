"""Reading the ledger while apps write it: the DuckDB file plus the segments not yet compacted.

Readers never hold the file across calls: :func:`connect` takes the shared lock, attaches the file
read-only, and releases both when the ``with`` block ends, so writers compact in between.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from joule_otel.ledger import schema
from joule_otel.ledger.spool import Spool

_log = logging.getLogger("joule_otel")


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _empty_select() -> str:
    return "SELECT " + ", ".join(f"CAST(NULL AS {kind}) AS {name}" for name, kind in schema.COLUMNS) + " WHERE false"


@contextmanager
def connect(db_path: str | os.PathLike[str], *, timeout_s: float = 10.0) -> Iterator[Any]:
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
            compacted_select = _empty_select()
            compacted: set[str] = set()
            if path.exists() and path.stat().st_size > 0:
                try:
                    con.execute(f"ATTACH {_quote(str(path))} AS ledger (READ_ONLY)")
                    tables = {
                        r[0]
                        for r in con.execute(
                            "SELECT table_name FROM duckdb_tables() WHERE database_name = 'ledger'"
                        ).fetchall()
                    }
                    if schema.TABLE in tables:
                        present = {
                            r[0]
                            for r in con.execute(
                                "SELECT column_name FROM duckdb_columns() WHERE database_name = 'ledger' "
                                "AND table_name = ?",
                                [schema.TABLE],
                            ).fetchall()
                        }
                        compacted_select = f"SELECT {schema.select_list(present)} FROM ledger.{schema.TABLE}"
                        rollup_columns = {
                            r[0]
                            for r in con.execute(
                                "SELECT column_name FROM duckdb_columns() WHERE database_name = 'ledger' "
                                "AND table_name = ?",
                                [schema.ROLLUP_TABLE],
                            ).fetchall()
                        }
                        # a rollup of an older version (without a key this code groups by) is not read: the
                        # dashboard reads single calls until a writer migrates the file
                        if rollup_columns >= {name for name, _ in schema.FACT_KEYS}:
                            con.execute(f"CREATE TEMP VIEW calls_rollup AS SELECT * FROM ledger.{schema.ROLLUP_TABLE}")
                    if "joule_segments" in tables:
                        compacted = {r[0] for r in con.execute("SELECT name FROM ledger.joule_segments").fetchall()}
                except duckdb.Error as exc:
                    _log.warning("joule_otel: cannot read %s (%s); showing only rows not yet compacted", path, exc)
            con.execute(f"CREATE TEMP VIEW compacted_calls AS {compacted_select}")
            con.execute(f"CREATE TEMP TABLE pending_calls AS {_empty_select()}")
            pending = [str(s) for s in spool.segments() if s.name not in compacted]
            if pending:
                try:
                    con.execute(f"INSERT INTO pending_calls {schema.parquet_select(con, pending)}", [pending])
                except duckdb.Error as exc:
                    _log.warning("joule_otel: skipping unreadable spooled segments: %s", exc)
            con.execute(
                f"CREATE TEMP VIEW {schema.TABLE} AS "
                "SELECT * FROM compacted_calls UNION ALL SELECT * FROM pending_calls"
            )
            yield con
    finally:
        con.close()


def read_calls(
    db_path: str | os.PathLike[str] | None = None,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    workload: str | None = None,
    service: str | None = None,
    limit: int | None = None,
) -> Any:
    """Rows of ``inference_calls`` as a pandas DataFrame, newest first, optionally filtered.

    Args:
        db_path: the ledger; defaults to ``JOULE_OTEL_DB`` or the per-user default.
        since: keep rows started at or after this time.
        until: keep rows started before this time.
        workload: keep one workload.
        service: keep one ``service.name``.
        limit: at most this many rows.
    """
    from joule_otel.config import db_path_from_env

    path = Path(db_path) if db_path is not None else db_path_from_env()
    if path is None:
        raise ValueError("the ledger is off (JOULE_OTEL_DB=off); pass db_path")
    where: list[str] = []
    params: list[object] = []
    for clause, value in (
        ("started_at >= ?", since),
        ("started_at < ?", until),
        ("workload = ?", workload),
        ("service = ?", service),
    ):
        if value is not None:
            where.append(clause)
            params.append(value)
    sql = f"SELECT * FROM {schema.TABLE}"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY started_at DESC"
    if limit is not None:
        sql += " LIMIT ?"
        params.append(int(limit))
    with connect(path) as con:
        return con.execute(sql, params).df()
