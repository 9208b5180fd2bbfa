"""The ledger's schema: table ``inference_calls`` (the contract of DESIGN.md), its version, migrations.

Old files open: every column a later version adds is added to an existing table by
``ALTER TABLE … ADD COLUMN`` when a writer first opens it, and ``joule_meta.schema_version`` says
which version the file is at.
"""

from __future__ import annotations

from typing import Any

SCHEMA_VERSION = 4
"""1: first release. 2: no unique index on ``receipt_id`` (compaction dedupes by anti-join); the hourly rollup
table ``joule_rollup`` that the dashboard reads at scale. 3: column ``provider`` (``joule_cloud``, ``openai`` or the
host), also a rollup key. 4: column ``tags`` (``MAP(VARCHAR, VARCHAR)``, chargeback tags; not a rollup key)."""


class LedgerTooNew(Exception):
    """The file was written by a newer joule-otel (a higher schema version): this one must not write to it."""


TABLE = "inference_calls"
TAGS_TYPE = "MAP(VARCHAR, VARCHAR)"

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
    ("provider", "VARCHAR"),
    ("tags", TAGS_TYPE),
)
"""Column name and DuckDB type, in table order."""

COLUMN_NAMES = tuple(name for name, _ in COLUMNS)

ROLLUP_TABLE = "joule_rollup"
PRUNED_BEFORE = "pruned_before"
"""The ``joule_meta`` key of the retention boundary (ISO 8601, a whole UTC hour): rows before it were pruned."""
TAG_VALUES_TABLE = "joule_tag_values"
"""Each tag key and value the compacted rows hold, with its calls: the dashboard's tag filters without a scan."""

FACT_KEYS: tuple[tuple[str, str], ...] = (
    ("service", "VARCHAR"),
    ("provider", "VARCHAR"),
    ("workload", "VARCHAR"),
    ("operation", "VARCHAR"),
    ("requested_model", "VARCHAR"),
    ("routed_to", "VARCHAR"),
    ("region", "VARCHAR"),
    ("tier", "VARCHAR"),
    ("status_code", "INTEGER"),
    ("error_type", "VARCHAR"),
    ("stream", "BOOLEAN"),
    ("energy_bin", "SMALLINT"),
)
"""What the rollup groups by: every dashboard filter and split, and the energy histogram's ¼-decade bin."""

FACT_MEASURES: tuple[tuple[str, str, str], ...] = (
    # name, type, how one call contributes (a SQL expression over a row of inference_calls)
    ("calls", "BIGINT", "1"),
    ("energy_j", "DOUBLE", "energy_j"),
    ("energy_calls", "BIGINT", "CAST(energy_j IS NOT NULL AS BIGINT)"),
    ("carbon_mg", "DOUBLE", "carbon_mg"),
    ("carbon_energy_j", "DOUBLE", "CASE WHEN carbon_mg IS NOT NULL THEN energy_j END"),
    ("input_tokens", "BIGINT", "input_tokens"),
    ("output_tokens", "BIGINT", "output_tokens"),
    ("out_energy_j", "DOUBLE", "CASE WHEN output_tokens > 0 THEN energy_j END"),
    ("out_tokens_e", "BIGINT", "CASE WHEN output_tokens > 0 AND energy_j IS NOT NULL THEN output_tokens END"),
    ("first_at", "TIMESTAMPTZ", "started_at"),
    ("last_at", "TIMESTAMPTZ", "started_at"),
)
"""Additive measures: a rollup row holds their sums (``first_at``/``last_at``: min/max) over its calls."""

ENERGY_BIN_SQL = "CASE WHEN energy_j > 0 THEN CAST(floor(log10(energy_j) * 4) AS SMALLINT) END"
"""The ¼-decade bin of a call's energy: bin b spans [10^(b/4), 10^((b+1)/4)) joules."""


def select_list(present: set[str] | frozenset[str]) -> str:
    """The ledger's columns in table order, NULL for any that ``present`` lacks (an older segment or file).

    A missing ``provider`` reads as the schema upgrade would have set it (:data:`PROVIDER_BACKFILL_SQL`).
    """

    def missing(name: str, kind: str) -> str:
        if name == "provider" and present >= _BACKFILL_NEEDS:
            return f"{PROVIDER_BACKFILL_SQL} AS provider"
        return f"CAST(NULL AS {kind}) AS {name}"

    return ", ".join(name if name in present else missing(name, kind) for name, kind in COLUMNS)


def parquet_select(con: Any, files: list[str]) -> str:
    """``SELECT`` of the ledger's columns from Parquet segments, whichever version of the columns each holds."""
    described = con.execute("DESCRIBE SELECT * FROM read_parquet(?, union_by_name = true)", [files]).fetchall()
    present = {r[0] for r in described}
    return f"SELECT {select_list(present)} FROM read_parquet(?, union_by_name = true)"


def raw_facts_sql() -> str:
    """The select list that turns rows of ``inference_calls`` into facts (one call each, ``t`` = start)."""
    keys = [name if name != "energy_bin" else f"{ENERGY_BIN_SQL} AS energy_bin" for name, _ in FACT_KEYS]
    measures = [f"CAST({expr} AS {kind}) AS {name}" for name, kind, expr in FACT_MEASURES]
    return ", ".join(["started_at AS t", *keys, *measures])


def rollup_select_sql(facts: str) -> str:
    """Hourly rollup rows aggregated from a relation of facts (``facts`` is a table name or subquery)."""
    keys = ", ".join(name for name, _ in FACT_KEYS)
    measures = ", ".join(
        f"{'min' if name == 'first_at' else 'max' if name == 'last_at' else 'sum'}({name})::{kind} AS {name}"
        for name, kind, _ in FACT_MEASURES
    )
    return (
        f"SELECT to_timestamp(epoch_us(t) // 3600000000 * 3600) AS hour, {keys}, {measures} FROM {facts} GROUP BY ALL"
    )


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
        TAGS_TYPE: pa.map_(pa.string(), pa.string()),
    }
    return pa.schema([(name, types[kind]) for name, kind in COLUMNS])


def create_statements() -> list[str]:
    """DDL that creates a fresh ledger (idempotent)."""
    columns = ",\n  ".join(f"{name} {kind}" for name, kind in COLUMNS)
    rollup = ", ".join(
        ["hour TIMESTAMPTZ"] + [f"{n} {k}" for n, k in FACT_KEYS] + [f"{n} {k}" for n, k, _ in FACT_MEASURES]
    )
    return [
        f"CREATE TABLE IF NOT EXISTS {TABLE} (\n  {columns}\n)",
        f"CREATE TABLE IF NOT EXISTS {ROLLUP_TABLE} ({rollup})",
        "CREATE TABLE IF NOT EXISTS joule_meta (key VARCHAR PRIMARY KEY, value VARCHAR)",
        "CREATE TABLE IF NOT EXISTS joule_segments (name VARCHAR PRIMARY KEY, rows BIGINT, compacted_at TIMESTAMPTZ)",
        f"CREATE TABLE IF NOT EXISTS {TAG_VALUES_TABLE} "
        "(key VARCHAR, value VARCHAR, calls BIGINT, PRIMARY KEY (key, value))",
    ]


def migrate(con: Any) -> int:
    """Bring an open read-write ledger to :data:`SCHEMA_VERSION`; returns the version it was at (0 if new)."""
    try:  # the common case, a ledger already at this version: one query, no DDL
        row = con.execute("SELECT value FROM joule_meta WHERE key = 'schema_version'").fetchone()
    except Exception:  # no joule_meta yet: a new file, or one from before versions were recorded
        row = None
    if row is not None and row[0] == str(SCHEMA_VERSION):
        return SCHEMA_VERSION
    found = version_of(row[0]) if row else 0
    if found > SCHEMA_VERSION:
        # writing would rewrite the version downwards and miss what the newer schema keeps: refuse, rows wait
        raise LedgerTooNew(
            f"the ledger is at schema version {found}, written by a newer joule-otel; this one writes version "
            f"{SCHEMA_VERSION} and will not change it: upgrade joule-otel (rows wait in the spool until then)"
        )
    for statement in create_statements():
        con.execute(statement)
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
    if found < 3:
        # rows from before the provider column: the same rule capture applies (a Joule figure or Joule's host is
        # Joule Cloud; OpenAI's API host is openai; otherwise the host)
        con.execute(f"UPDATE {TABLE} SET provider = {PROVIDER_BACKFILL_SQL} WHERE provider IS NULL")
    if found < 3:
        con.execute(f"DROP TABLE IF EXISTS {ROLLUP_TABLE}")  # gains the provider key: rebuilt from the rows
        con.execute(create_statements()[1])
        rebuild_rollup(con)
    if found != SCHEMA_VERSION:
        con.execute("INSERT OR REPLACE INTO joule_meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])
    return found


PROVIDER_BACKFILL_SQL = (
    "CASE WHEN receipt_id IS NOT NULL OR energy_j IS NOT NULL OR carbon_mg IS NOT NULL OR routed_to IS NOT NULL "
    "OR tier IS NOT NULL THEN 'joule_cloud' "
    "WHEN lower(server_address) = 'greenjoules.cloud' OR lower(server_address) LIKE '%.greenjoules.cloud' "
    "THEN 'joule_cloud' WHEN lower(server_address) = 'api.openai.com' THEN 'openai' "
    "ELSE coalesce(server_address, 'unknown') END"
)
"""The ``provider`` of a row written before the column existed (see :func:`joule_otel._genai.provider_for`)."""
_BACKFILL_NEEDS = frozenset({"receipt_id", "energy_j", "carbon_mg", "routed_to", "tier", "server_address"})


def version_of(raw: str) -> int:
    """A ``joule_meta.schema_version`` as a number (one this code did not write counts as newer)."""
    try:
        return int(raw)
    except ValueError:  # not a number this code wrote: treat as newer, never overwrite it
        return SCHEMA_VERSION + 1


def pruned_before(con: Any, prefix: str = "") -> Any:
    """The retention boundary a ledger records (``prefix``: an attached database's name and a dot), else None."""
    from datetime import datetime

    try:
        found = con.execute(f"SELECT value FROM {prefix}joule_meta WHERE key = ?", [PRUNED_BEFORE]).fetchone()
    except Exception:
        return None
    return datetime.fromisoformat(found[0]) if found else None


def tag_values_sql(relation: str) -> str:
    """Calls per tag key and value in ``relation`` (rows with a ``tags`` column)."""
    return (
        "SELECT e.key AS key, e.value AS value, count(*) AS calls "
        f"FROM (SELECT unnest(map_entries(tags)) AS e FROM {relation} WHERE tags IS NOT NULL) GROUP BY ALL"
    )


def merge_tag_values(con: Any, relation: str) -> None:
    """Count the tags of ``relation``'s rows into :data:`TAG_VALUES_TABLE`."""
    con.execute(
        f"INSERT INTO {TAG_VALUES_TABLE} {tag_values_sql(relation)} "
        "ON CONFLICT (key, value) DO UPDATE SET calls = calls + excluded.calls"
    )


def forget_tag_values(con: Any, relation: str) -> None:
    """Take the tags of ``relation``'s rows (rows about to be deleted) out of :data:`TAG_VALUES_TABLE`."""
    con.execute(
        f"INSERT INTO {TAG_VALUES_TABLE} SELECT key, value, -calls FROM ({tag_values_sql(relation)}) "
        "ON CONFLICT (key, value) DO UPDATE SET calls = calls + excluded.calls"
    )
    con.execute(f"DELETE FROM {TAG_VALUES_TABLE} WHERE calls <= 0")


def rebuild_rollup(con: Any) -> int:
    """Recompute ``joule_rollup`` from every row of ``inference_calls``; returns its row count."""
    cut = pruned_before(con)
    if cut is None:
        con.execute(f"DELETE FROM {ROLLUP_TABLE}")
        con.execute(f"INSERT INTO {ROLLUP_TABLE} " + rollup_select_sql(f"(SELECT {raw_facts_sql()} FROM {TABLE})"))
    else:  # the hours before the retention boundary are totals only: their rows are gone, the rollup keeps them
        con.execute(f"DELETE FROM {ROLLUP_TABLE} WHERE hour >= ?", [cut])
        con.execute(
            f"INSERT INTO {ROLLUP_TABLE} "
            + rollup_select_sql(f"(SELECT {raw_facts_sql()} FROM {TABLE} WHERE started_at >= ?)"),
            [cut],
        )
    con.execute(f"DELETE FROM {TAG_VALUES_TABLE}")
    merge_tag_values(con, TABLE)
    return int(con.execute(f"SELECT count(*) FROM {ROLLUP_TABLE}").fetchone()[0])
