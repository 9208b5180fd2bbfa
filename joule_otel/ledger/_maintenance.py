"""What ``joule-otel ledger`` does: stats, compact, export, query."""

from __future__ import annotations

import contextlib
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
        con.execute(f"COPY ({select}) TO {_literal(output)} {options}")
    return int(count)


CLICKHOUSE_KEYS = (
    "service", "provider", "workload", "operation", "requested_model", "routed_to", "region", "tier", "status_code",
    "error_type", "stream",
)  # fmt: skip
"""What ``otel.joule_calls_hourly`` groups by (deploy/clickhouse/joule.sql)."""


def export_clickhouse(db_path: Path, output: Path) -> tuple[int, int, Path | None]:
    """Write the ledger in the columns of ClickHouse's ``otel.joule_calls``, and the totals of pruned hours.

    The rows go to ``output`` (Parquet), with each call's key (its receipt id, else its trace and span ids, else a
    hash of its figures) so that loading a file twice, or beside what the Collector already wrote, keeps one row a
    call. The hourly totals of pruned hours, whose rows are gone, go to ``<output stem>.hourly.parquet`` in the
    columns of ``otel.joule_calls_hourly``. Returns (rows, hourly rows, the totals' file or None).
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    rows_sql = f"""
        SELECT
            coalesce(
                receipt_id,
                CASE WHEN trace_id IS NOT NULL AND span_id IS NOT NULL THEN trace_id || '/' || span_id END,
                md5(concat_ws('|', epoch_us(started_at), service, workload, operation, server_address, status_code,
                              error_type, routed_to, energy_j, carbon_mg, input_tokens, output_tokens))
            ) AS call_key,
            {_ordered_columns()},
            'export' AS source,
            2::UTINYINT AS version
        FROM {schema.TABLE}
        ORDER BY started_at
    """
    keys = ", ".join(CLICKHOUSE_KEYS)
    hourly_sql = f"""
        SELECT hour::TIMESTAMPTZ AS hour, {keys},
            sum(calls)::UBIGINT AS calls, coalesce(sum(energy_j), 0)::DOUBLE AS energy_j,
            sum(energy_calls)::UBIGINT AS energy_calls, coalesce(sum(carbon_mg), 0)::DOUBLE AS carbon_mg,
            coalesce(sum(input_tokens), 0)::BIGINT AS input_tokens,
            coalesce(sum(output_tokens), 0)::BIGINT AS output_tokens
        FROM calls_rollup WHERE hour < (SELECT before FROM joule_pruned)
        GROUP BY ALL ORDER BY hour
    """
    hourly_path = output.with_name(output.stem + ".hourly.parquet")
    with reader.connect(db_path) as con:
        count = int((con.execute(f"SELECT count(*) FROM {schema.TABLE}").fetchone() or (0,))[0])
        con.execute(f"COPY ({rows_sql}) TO {_literal(output)} (FORMAT parquet, COMPRESSION zstd)")
        pruned = con.execute(
            "SELECT count(*) FROM duckdb_tables() WHERE table_name = 'joule_pruned' AND temporary"
        ).fetchone()
        if not (pruned and pruned[0]):
            with contextlib.suppress(FileNotFoundError):
                hourly_path.unlink()  # an older export's totals would be loaded with these rows
            return count, 0, None
        hourly = int((con.execute(f"SELECT count(*) FROM ({hourly_sql})").fetchone() or (0,))[0])
        con.execute(f"COPY ({hourly_sql}) TO {_literal(hourly_path)} (FORMAT parquet, COMPRESSION zstd)")
    return count, hourly, hourly_path


def _ordered_columns() -> str:
    """``inference_calls``'s columns in table order, ids and tags made what ClickHouse's non-null columns take."""
    special = {
        "trace_id": "coalesce(trace_id, '') AS trace_id",
        "span_id": "coalesce(span_id, '') AS span_id",
        "tags": "coalesce(tags, MAP {})::MAP(VARCHAR, VARCHAR) AS tags",
    }
    return ", ".join(special.get(name, name) for name in schema.COLUMN_NAMES)


def _literal(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def query(db_path: Path, sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run SQL against ``inference_calls``; returns column names and rows."""
    with reader.connect(db_path) as con:
        cursor = con.execute(sql)
        columns = [d[0] for d in cursor.description] if cursor.description else []
        return columns, cursor.fetchall()
