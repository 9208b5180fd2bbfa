"""What ``joule-otel ledger`` does: stats, compact, export, query."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from joule_otel.ledger import _reader as reader
from joule_otel.ledger import _schema as schema
from joule_otel.ledger._compact import CompactResult, compact
from joule_otel.ledger._spool import Spool


def dropped_rows(spool: Spool) -> int:
    """Rows that processes reported dropped (their memory bound was reached while the disk refused)."""
    total = 0
    for report in spool.dir.glob("dropped-*.json") if spool.dir.exists() else []:
        try:
            total += int(json.loads(report.read_text()).get("rows_dropped", 0))
        except (OSError, ValueError, AttributeError):
            continue
    return total


def ledger_stats(db_path: Path) -> dict[str, Any]:
    """Rows, receipts, time span, energy, pending and quarantined segments, dropped rows."""
    spool = Spool(db_path)
    with reader.connect(db_path) as con:
        totals = con.execute(
            f"SELECT count(*), count(DISTINCT receipt_id), count(error_type), min(started_at), max(started_at), "
            f"sum(energy_j) FROM {schema.TABLE}"
        ).fetchone()
        assert totals is not None  # an aggregate without GROUP BY is one row
        rows, receipts, errors, first, last, energy = totals
        version = None
        try:
            found = con.execute("SELECT value FROM ledger.joule_meta WHERE key = 'schema_version'").fetchone()
            version = int(found[0]) if found else None
        except Exception:
            version = None
    segments = spool.segments()
    return {
        "path": str(db_path),
        "file_bytes": db_path.stat().st_size if db_path.exists() else 0,
        "schema_version": version,
        "rows": rows,
        "receipts": receipts,
        "error_rows": errors,
        "first_call": first,
        "last_call": last,
        "energy_j": round(energy or 0.0, 3),
        "pending_segments": len(segments),
        "pending_bytes": sum(s.stat().st_size for s in segments if s.exists()),
        "quarantined_segments": len(spool.quarantined()),
        "dropped_rows": dropped_rows(spool),
    }


def compact_now(db_path: Path, *, timeout_s: float, rebuild_rollup: bool = False) -> CompactResult:
    """Compact, waiting up to ``timeout_s`` for writers and readers to let go.

    ``rebuild_rollup`` recomputes the hourly rollup from every row afterwards: needed only after rows were
    changed by hand (``DELETE FROM inference_calls …``), since compaction keeps it current.
    """
    result = compact(db_path, timeout_s=timeout_s)
    if rebuild_rollup:
        from joule_otel.ledger._compact import open_writable

        with Spool(db_path).locked(exclusive=True, timeout_s=timeout_s):
            con: Any = open_writable(db_path)
            try:
                result.rollup_rows = schema.rebuild_rollup(con)
            finally:
                con.close()
    return result


def export(db_path: Path, output: Path, *, fmt: str | None = None, where: str | None = None) -> int:
    """Write ``inference_calls`` (optionally filtered by a SQL condition) to Parquet or CSV; returns rows."""
    fmt = fmt or ("csv" if output.suffix.lower() == ".csv" else "parquet")
    if fmt not in ("csv", "parquet"):
        raise ValueError(f"unknown export format {fmt!r}; use parquet or csv")
    output.parent.mkdir(parents=True, exist_ok=True)
    select = f"SELECT * FROM {schema.TABLE}" + (f" WHERE {where}" if where else "") + " ORDER BY started_at"
    options = "(FORMAT csv, HEADER true)" if fmt == "csv" else "(FORMAT parquet, COMPRESSION zstd)"
    with reader.connect(db_path) as con:
        count = (con.execute(f"SELECT count(*) FROM ({select})").fetchone() or (0,))[0]
        target = "'" + str(output).replace("'", "''") + "'"
        con.execute(f"COPY ({select}) TO {target} {options}")
    return int(count)


def query(db_path: Path, sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run SQL against ``inference_calls``; returns column names and rows."""
    with reader.connect(db_path) as con:
        cursor = con.execute(sql)
        columns = [d[0] for d in cursor.description] if cursor.description else []
        return columns, cursor.fetchall()
