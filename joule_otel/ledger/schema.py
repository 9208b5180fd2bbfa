"""The ledger's schema: table ``inference_calls`` (the contract of DESIGN.md), its version, migrations.

Old files open: every column a later version adds is added to an existing table by
``ALTER TABLE … ADD COLUMN`` when a writer first opens it, and ``joule_meta.schema_version`` says
which version the file is at.
"""

from __future__ import annotations

from typing import Any

SCHEMA_VERSION = 2
"""1: first release. 2: the unique index on ``receipt_id`` is dropped (compaction dedupes by anti-join)."""

TABLE = "inference_calls"

COLUMNS: tuple[tuple[str, str], ...] = (
    ("receipt_id", "VARCHAR"),
    ("started_at", "TIMESTAMPTZ"),
    ("duration_ms", "DOUBLE"),
    ("ttft_ms", "DOUBLE"),
    ("service", "VARCHAR"),
    ("workload", "VARCHAR"),
    ("operation", "VARCHAR"),
    ("server_address", "VARCHAR"),
    ("status_code", "INTEGER"),
    ("error_type", "VARCHAR"),
    ("requested_model", "VARCHAR"),
    ("routed_to", "VARCHAR"),
    ("tier", "VARCHAR"),
    ("region", "VARCHAR"),
    ("energy_j", "DOUBLE"),
    ("carbon_mg", "DOUBLE"),
    ("input_tokens", "BIGINT"),
    ("output_tokens", "BIGINT"),
    ("stream", "BOOLEAN"),
    ("trace_id", "VARCHAR"),
    ("span_id", "VARCHAR"),
)
"""Column name and DuckDB type, in table order."""

COLUMN_NAMES = tuple(name for name, _ in COLUMNS)


def arrow_schema() -> Any:
    """The same columns as a pyarrow schema (segments are written with it)."""
    import pyarrow as pa

    types = {
        "VARCHAR": pa.string(),
        "TIMESTAMPTZ": pa.timestamp("us", tz="UTC"),
        "DOUBLE": pa.float64(),
        "INTEGER": pa.int32(),
        "BIGINT": pa.int64(),
        "BOOLEAN": pa.bool_(),
    }
    return pa.schema([(name, types[kind]) for name, kind in COLUMNS])


def create_statements() -> list[str]:
    """DDL that creates a fresh ledger (idempotent)."""
    columns = ",\n  ".join(f"{name} {kind}" for name, kind in COLUMNS)
    return [
        f"CREATE TABLE IF NOT EXISTS {TABLE} (\n  {columns}\n)",
        "CREATE TABLE IF NOT EXISTS joule_meta (key VARCHAR PRIMARY KEY, value VARCHAR)",
        "CREATE TABLE IF NOT EXISTS joule_segments (name VARCHAR PRIMARY KEY, rows BIGINT, compacted_at TIMESTAMPTZ)",
    ]


def migrate(con: Any) -> int:
    """Bring an open read-write ledger to :data:`SCHEMA_VERSION`; returns the version it was at (0 if new)."""
    try:  # the common case, a ledger already at this version: one query, no DDL
        row = con.execute("SELECT value FROM joule_meta WHERE key = 'schema_version'").fetchone()
    except Exception:  # no joule_meta yet: a new file, or one from before versions were recorded
        row = None
    if row is not None and row[0] == str(SCHEMA_VERSION):
        return SCHEMA_VERSION
    for statement in create_statements():
        con.execute(statement)
    found = int(row[0]) if row else 0
    existing = {
        r[0]
        for r in con.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = ? AND table_schema = 'main'",
            [TABLE],
        ).fetchall()
    }
    for name, kind in COLUMNS:
        if name not in existing:
            con.execute(f"ALTER TABLE {TABLE} ADD COLUMN {name} {kind}")
    if found < 2:
        # version 1 kept receipts unique with an index that every insert had to maintain (half the ingest time
        # and a third of the bytes); compaction's anti-join keeps them unique now
        con.execute("DROP INDEX IF EXISTS inference_calls_receipt")
    if found != SCHEMA_VERSION:
        con.execute("INSERT OR REPLACE INTO joule_meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])
    return found
