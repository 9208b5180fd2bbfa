"""``joule-otel reconcile``: the ledger against the bill — what it explains, what it misses, and by which token.

A bill is Joule Cloud's receipts for a period (DESIGN.md's "Bill export"): CSV, JSON Lines, a JSON array or
Parquet, columns found by name. It is read, checked and joined with one or more ledgers inside DuckDB, so ten
million receipts never pass through Python one by one. Nothing here writes to a ledger.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from joule_otel.ledger._reader import connect_many, require_ledger

if TYPE_CHECKING:
    import duckdb
    import pyarrow as pa

FIELDS: dict[str, tuple[str, ...]] = {
    "receipt_id": ("receipt_id", "receipt", "id", "x_receipt_id"),
    "energy_j": ("energy_j", "energy_joules", "joules", "energy"),
    "billed_at": ("billed_at", "created_at", "timestamp", "time", "started_at"),
    "carbon_mg": ("carbon_mg", "carbon"),
    "model": ("model", "routed_to", "served_model"),
    "tier": ("tier",),
    "region": ("region",),
    "token": ("token", "token_id", "api_key_id", "key_name"),
}
"""A bill's fields and the column names each is found under (case-insensitive), in order of preference."""
REQUIRED = ("receipt_id", "energy_j", "billed_at")
SKEW_S = 2.0
"""How far a call's start and its billing may lie apart at a period's edges before it counts against either."""
MAX_LISTED = 100_000
"""Receipts kept per finding in a result (every one is counted; ``--out`` files list up to this many each)."""

_NUMBER = r"^\s*[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?\s*$"
"""A decimal number, as the ledger reads header figures: no ``1_000``, ``inf`` or other digits."""


class BillError(ValueError):
    """A bill that cannot be read: names the file, the row or column, and the problem."""


@dataclass(frozen=True)
class Period:
    """A half-open span of time, ``[start, end)``, shown in ``tz``."""

    start: datetime
    end: datetime
    tz: ZoneInfo


@dataclass
class Reconciliation:
    """What the ledgers explain of a bill, and what they do not."""

    bill: str
    ledgers: list[str]
    period: Period
    billed_calls: int
    billed_j: float
    found_calls: int
    found_j: float
    by_day: list[dict[str, Any]]
    missing_groups: list[dict[str, Any]]
    """Billed receipts no ledger holds, grouped by token, most joules first."""
    missing_calls: int
    missing_j: float
    unbilled_calls: int
    unbilled_j: float
    at_edges: int
    """Ledger rows within the skew allowance of the period's edges whose receipt the bill does not hold."""
    differing_calls: int
    in_two_ledgers: int
    unreceipted: int
    """Ledger rows without a receipt (refused calls): neither billed nor missing."""
    missing: pa.Table | None = None
    unbilled: pa.Table | None = None
    differing: pa.Table | None = None
    duplicated: pa.Table | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def coverage_calls(self) -> float:
        return self.found_calls / self.billed_calls if self.billed_calls else 1.0

    @property
    def coverage_j(self) -> float:
        return self.found_j / self.billed_j if self.billed_j else 1.0

    def explains(self, min_coverage: float = 1.0) -> bool:
        """Whether the ledgers explain the bill: joules covered at least ``min_coverage``, no figure differs."""
        return self.coverage_j >= min_coverage - 1e-12 and not self.differing_calls


# -- reading a bill ----------------------------------------------------------------------------------------------
def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _kind(path: Path) -> str:
    """``csv``, ``jsonl``, ``json`` or ``parquet``: by the file's first bytes, else its extension."""
    with path.open("rb") as handle:
        head = handle.read(4096)
    if head[:4] == b"PAR1":
        return "parquet"
    text = head.lstrip(b"\xef\xbb\xbf").lstrip()
    if text[:1] == b"[":
        return "json"
    if text[:1] == b"{":
        return "jsonl"
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return "parquet"
    return "csv"


def _scan(path: Path, kind: str) -> str:
    q = _quote(str(path))
    if kind == "parquet":
        return f"read_parquet({q})"
    if kind == "json":
        return f"read_json({q}, format = 'array', sample_size = -1)"
    if kind == "jsonl":
        return f"read_json({q}, format = 'newline_delimited', sample_size = -1)"
    # RFC 4180 as DESIGN.md's bill is: commas, double quotes; the header is the first line (nothing skipped)
    return (
        f"read_csv({q}, header = true, all_varchar = true, strict_mode = true, null_padding = false, skip = 0, "
        "delim = ',', quote = '\"', escape = '\"')"
    )


def _columns(con: duckdb.DuckDBPyConnection, scan: str) -> dict[str, str]:
    """Column name → DuckDB type, in order."""
    return {row[0]: str(row[1]) for row in con.execute(f"DESCRIBE SELECT * FROM {scan}").fetchall()}


def map_columns(found: list[str], mapping: dict[str, str] | None, where: str) -> dict[str, str]:
    """Bill field → the column that holds it: ``mapping`` first, then the aliases, without regard to case."""
    by_lower: dict[str, str] = {}
    for name in found:
        by_lower.setdefault(name.strip().lstrip("\ufeff").lower(), name)
    chosen: dict[str, str] = {}
    for name, column in (mapping or {}).items():
        if name not in FIELDS:
            raise BillError(f"{where}: --map names no bill field {name!r} (fields: {', '.join(FIELDS)})")
        actual = by_lower.get(column.strip().lower())
        if actual is None:
            raise BillError(f"{where}: --map {name}={column}: there is no column {column!r} (columns: {found})")
        chosen[name] = actual
    for name, aliases in FIELDS.items():
        if name in chosen:
            continue
        for alias in aliases:
            if alias in by_lower and by_lower[alias] not in chosen.values():
                chosen[name] = by_lower[alias]
                break
    missing = [name for name in REQUIRED if name not in chosen]
    if missing:
        raise BillError(
            f"{where}: no column for {', '.join(missing)} (columns: {', '.join(found) or 'none'}); "
            f"name one with --map {missing[0]}=COLUMN"
        )
    return chosen


def load_bill(con: duckdb.DuckDBPyConnection, path: Path, mapping: dict[str, str] | None = None) -> int:
    """Read the bill at ``path`` into the temp table ``bill``, checked; the number of receipts.

    Raises:
        BillError: the file cannot be read, lacks a required column, or holds a value no bill could (the message
            names the file, the row and the column).
    """
    import duckdb

    where = str(path)
    if not path.is_file():
        raise BillError(f"{where}: no such file")
    if path.stat().st_size == 0:
        raise BillError(f"{where}: the file is empty")
    kind = _kind(path)
    scan = _scan(path, kind)
    try:
        types = _columns(con, scan)
        return _load(con, scan, types, map_columns(list(types), mapping, where), where, "row")
    except duckdb.Error as exc:
        raise BillError(f"{where}: cannot be read as {kind.upper()}: {_first_line(exc)}") from None


def load_bill_records(con: duckdb.DuckDBPyConnection, records: list[dict[str, Any]], where: str) -> int:
    """:func:`load_bill` of records already read (the receipts API's pages)."""
    import pyarrow as pa

    names = sorted({key for record in records for key in record})
    if not records:
        raise BillError(f"{where}: no receipts in this period")
    table = pa.table({name: [None if (v := r.get(name)) is None else str(v) for r in records] for name in names})
    con.register("bill_records_arrow", table)
    try:
        con.execute("CREATE OR REPLACE TEMP TABLE bill_records AS SELECT * FROM bill_records_arrow")
    finally:
        con.unregister("bill_records_arrow")
    types = _columns(con, "bill_records")
    return _load(con, "bill_records", types, map_columns(names, None, where), where, "receipt")


def _row(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None) -> tuple[Any, ...] | None:
    """A query's first row, its result read to the end (DuckDB refuses other work beside an unfinished one)."""
    rows = con.execute(sql, params or []).fetchall()
    return rows[0] if rows else None


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


_NUMERIC = frozenset(
    {
        "TINYINT",
        "SMALLINT",
        "INTEGER",
        "BIGINT",
        "HUGEINT",
        "FLOAT",
        "DOUBLE",
        "DECIMAL",
        "UTINYINT",
        "USMALLINT",
        "UINTEGER",
        "UBIGINT",
    }
)
_PROBLEMS = {
    "receipt_id": "no receipt id",
    "energy_j": "{} is not a number of joules ≥ 0",
    "carbon_mg": "{} is not a number of mg ≥ 0",
    "billed_at": "{} is neither an ISO 8601 time nor epoch seconds or milliseconds",
}


def _load(
    con: duckdb.DuckDBPyConnection, scan: str, types: dict[str, str], chosen: dict[str, str], where: str, unit: str
) -> int:
    """Convert and check a bill in one pass into the temp table ``bill``.

    Raises :class:`BillError` at its first bad row, at its first repeated receipt, or when it holds none. A column of
    numbers or times (Parquet, JSON) is taken as it is typed; only text is matched against the number rule.
    """

    def kind(name: str) -> str:
        return types.get(chosen.get(name, ""), "VARCHAR").split("(")[0]

    def text(name: str) -> str:
        return f"CAST({_ident(chosen[name])} AS VARCHAR)" if name in chosen else "CAST(NULL AS VARCHAR)"

    def number(name: str) -> str:
        if name not in chosen:
            return "CAST(NULL AS DOUBLE)"
        if kind(name) in _NUMERIC:
            return f"CAST({_ident(chosen[name])} AS DOUBLE)"
        raw = text(name)
        return f"CASE WHEN regexp_full_match({raw}, '{_NUMBER}') THEN TRY_CAST({raw} AS DOUBLE) END"

    def instant() -> str:
        raw, column, typed = text("billed_at"), _ident(chosen["billed_at"]), kind("billed_at")
        if typed.startswith("TIMESTAMP") or typed == "DATE":
            return f"CAST({column} AS TIMESTAMPTZ)"
        if typed in _NUMERIC:
            seconds = f"CAST({column} AS DOUBLE)"
        else:
            seconds = (
                f"CASE WHEN regexp_full_match(trim({raw}), '[0-9]+([.][0-9]*)?') THEN TRY_CAST({raw} AS DOUBLE) END"
            )
        as_number = f"CASE WHEN {seconds} > 1e11 THEN to_timestamp({seconds} / 1000) ELSE to_timestamp({seconds}) END"
        return f"coalesce({as_number}, TRY_CAST(trim({raw}) AS TIMESTAMPTZ))"

    def label(name: str, lower: bool = False) -> str:
        value = f"nullif(trim({text(name)}), '')"
        return f"lower({value})" if lower else value

    carbon_given = f"nullif(trim({text('carbon_mg')}), '') IS NOT NULL"
    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE bill AS
            SELECT * EXCLUDE (carbon_given), CASE
                WHEN receipt_id IS NULL THEN 'receipt_id'
                WHEN energy_j IS NULL OR energy_j < 0 OR NOT isfinite(energy_j) THEN 'energy_j'
                WHEN carbon_given AND (carbon_mg IS NULL OR carbon_mg < 0 OR NOT isfinite(carbon_mg)) THEN 'carbon_mg'
                WHEN billed_at IS NULL THEN 'billed_at'
              END AS problem
            FROM (SELECT
              nullif(trim({text("receipt_id")}), '') AS receipt_id,
              {instant()} AS billed_at,
              {number("energy_j")} AS energy_j,
              {number("carbon_mg")} AS carbon_mg,
              {carbon_given} AS carbon_given,
              {label("model")} AS model,
              {label("tier", lower=True)} AS tier,
              {label("region", lower=True)} AS region,
              {label("token")} AS token
            FROM {scan})"""
    )
    count = (_row(con, "SELECT count(*) FROM bill") or (0,))[0]
    if not count:
        raise BillError(f"{where}: no receipts (a header and nothing else)")
    bad = _row(con, "SELECT rowid, problem FROM bill WHERE problem IS NOT NULL ORDER BY rowid LIMIT 1")
    if bad is not None:
        row, name = int(bad[0]), str(bad[1])
        value = _row(con, f"SELECT {text(name)} FROM {scan} LIMIT 1 OFFSET {row}")
        shown = _show(value[0] if value else None)
        raise BillError(f"{where}: {unit} {row + 1}, column {chosen[name]!r}: {_PROBLEMS[name].format(shown)}")
    repeated = _row(con, "SELECT receipt_id FROM bill GROUP BY receipt_id HAVING count(*) > 1 LIMIT 1")
    if repeated is not None:
        rows = [
            int(r[0]) + 1
            for r in con.execute(
                "SELECT rowid FROM bill WHERE receipt_id = ? ORDER BY rowid LIMIT 3", [repeated[0]]
            ).fetchall()
        ]
        raise BillError(
            f"{where}: receipt {_show(repeated[0])} appears more than once ({unit}s "
            f"{', '.join(map(str, rows))}): a bill holds each receipt once"
        )
    con.execute("ALTER TABLE bill DROP COLUMN problem")
    con.execute("CREATE OR REPLACE TEMP TABLE bill_fields AS SELECT unnest(?) AS name", [sorted(chosen)])
    return int(count)


def _show(value: object) -> str:
    """A value from a bill as text a terminal shows as it is: quoted, control characters escaped, capped."""
    text = "" if value is None else str(value)
    text = text if len(text) <= 80 else text[:77] + "…"
    return json.dumps(text, ensure_ascii=False)


# -- the receipts API ----------------------------------------------------------------------------------------------
def fetch_bill(
    base_url: str, api_key: str, since: datetime | None, until: datetime | None, *, page: int = 10_000
) -> Iterator[dict[str, Any]]:
    """The account's receipts from ``GET {base_url}/receipts``, page after page (``after=<last receipt id>``)."""
    import httpx

    params: dict[str, Any] = {"limit": page}
    if since is not None:
        params["since"] = since.isoformat()
    if until is not None:
        params["until"] = until.isoformat()
    url = base_url.rstrip("/") + "/receipts"
    with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {api_key}"}) as client:
        while True:
            response = client.get(url, params=params)
            if response.status_code != 200:
                raise BillError(f"{url}: HTTP {response.status_code}: {response.text[:200]}")
            body = response.json()
            yield from body.get("data") or []
            if not body.get("has_more") or not body.get("last_id"):
                return
            params["after"] = body["last_id"]


# -- the period ----------------------------------------------------------------------------------------------------
def zone(name: str) -> ZoneInfo:
    """The time zone called ``name`` (``UTC``, ``Europe/Helsinki``)."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"--tz {name!r} is not a time zone name (e.g. UTC, Europe/Helsinki)") from None


def instant(text: str | None, tz: ZoneInfo, name: str) -> datetime | None:
    """``--from``/``--to``: a date (its midnight) or an ISO 8601 time; without an offset, in ``tz``."""
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        try:
            moment = datetime.combine(date.fromisoformat(text.strip()), time())
        except ValueError:
            raise ValueError(f"{name} {text!r} is neither a date (2026-11-01) nor an ISO 8601 time") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=tz)


# -- reconciling ---------------------------------------------------------------------------------------------------
MEMORY_LIMIT = "2GB"
"""DuckDB's working memory for a reconciliation; a larger join spills to a temporary folder rather than grow."""


@contextmanager
def _session(ledgers: list[Path]) -> Iterator[duckdb.DuckDBPyConnection]:
    for path in ledgers:
        require_ledger(path, "--db chooses another")
    with tempfile.TemporaryDirectory(prefix="joule-otel-reconcile-") as spill, connect_many(list(ledgers)) as con:
        con.execute("SET TimeZone = 'UTC'")
        con.execute(f"SET temp_directory = {_quote(spill)}")
        con.execute(f"SET memory_limit = {_quote(MEMORY_LIMIT)}")
        yield con


def reconcile(
    bill: Path | list[dict[str, Any]],
    ledgers: list[Path],
    *,
    start: datetime | None = None,
    end: datetime | None = None,
    tz: ZoneInfo | None = None,
    skew_s: float = SKEW_S,
    mapping: dict[str, str] | None = None,
    bill_name: str | None = None,
) -> Reconciliation:
    """Compare a bill (a file, or records from the receipts API) with ``ledgers`` over ``[start, end)``.

    Without a period, the bill's own span is the period. Never writes to a ledger.

    Raises:
        BillError: the bill cannot be read (see :func:`load_bill`).
        FileNotFoundError: a ledger that is not there.
        ValueError: a period that ends before it starts.
    """
    tz = tz or ZoneInfo("UTC")
    where = bill_name or (str(bill) if isinstance(bill, Path) else "the receipts API")
    with _session(ledgers) as con:
        if isinstance(bill, Path):
            load_bill(con, bill, mapping)
        else:
            load_bill_records(con, bill, where)
        span = _row(con, "SELECT min(billed_at), max(billed_at) FROM bill")
        assert span is not None
        start = start or span[0]
        end = end or span[1] + timedelta(microseconds=1)
        if end <= start:
            raise ValueError(f"the period ends ({end}) before it starts ({start})")
        return _compare(con, where, [str(p) for p in ledgers], Period(start, end, tz), skew_s)


def _compare(
    con: duckdb.DuckDBPyConnection, bill: str, ledgers: list[str], period: Period, skew_s: float
) -> Reconciliation:
    skew = timedelta(seconds=skew_s)
    params = [period.start, period.end]
    # one full outer join of the whole bill with every ledger row that has a receipt answers every question: a row
    # without a ledger side is billed but in no ledger, one without a bill side is in a ledger but on no bill
    con.execute(
        """CREATE TEMP TABLE joined AS SELECT b.rowid AS bill_row, b.receipt_id AS billed_receipt, b.billed_at,
             b.energy_j, b.carbon_mg, b.model, b.tier, b.region, b.token,
             l.receipt_id AS ledger_receipt, l.ledger, l.started_at, l.energy_j AS ledger_energy_j,
             l.carbon_mg AS ledger_carbon_mg, l.routed_to AS ledger_model, l.tier AS ledger_tier,
             l.region AS ledger_region, l.service, l.workload
           FROM bill b FULL OUTER JOIN (SELECT * FROM ledger_calls WHERE receipt_id IS NOT NULL) l
             ON b.receipt_id = l.receipt_id"""
    )
    several = len(ledgers) > 1
    billed_rows = "SELECT * FROM joined WHERE billed_receipt IS NOT NULL AND billed_at >= $1 AND billed_at < $2"
    matched = _row(con, f"SELECT count(*), count(DISTINCT bill_row) FROM ({billed_rows})", params) if several else None
    if matched is not None and matched[0] != matched[1]:  # a receipt in two ledgers: each billed call counted once
        billed_rows += " QUALIFY row_number() OVER (PARTITION BY bill_row ORDER BY ledger) = 1"
    # a view, not a copy: each question below is one scan of the joined rows
    period_bounds = f"TIMESTAMPTZ '{period.start.isoformat()}'", f"TIMESTAMPTZ '{period.end.isoformat()}'"
    billed_sql = billed_rows.replace("$1", period_bounds[0]).replace("$2", period_bounds[1])
    con.execute(f"CREATE TEMP VIEW billed AS SELECT *, ledger_receipt IS NOT NULL AS found FROM ({billed_sql})")
    totals = _row(
        con,
        "SELECT count(*), coalesce(sum(energy_j), 0), count(*) FILTER (found), "
        "coalesce(sum(energy_j) FILTER (found), 0) FROM billed",
    )
    assert totals is not None
    billed_calls, billed_j, found_calls, found_j = totals
    tz_name = period.tz.key
    by_day = [
        dict(zip(("day", "billed_calls", "found_calls", "billed_j", "found_j"), row, strict=True))
        for row in con.execute(
            f"""SELECT CAST(date_trunc('day', timezone({_quote(tz_name)}, billed_at)) AS DATE) AS day, count(*),
                  count(*) FILTER (found), sum(energy_j), coalesce(sum(energy_j) FILTER (found), 0)
                FROM billed GROUP BY day ORDER BY day"""
        ).fetchall()
    ]
    for day in by_day:
        day["day"] = day["day"].isoformat()
    missing = _arrow(
        con,
        f"""SELECT billed_receipt AS receipt_id, token, billed_at, energy_j, carbon_mg, model, tier, region
            FROM billed WHERE NOT found ORDER BY billed_at, receipt_id LIMIT {MAX_LISTED}""",
    )
    edges = [period.start, period.end, period.start + skew, period.end - skew]
    unbilled_rows = f"""SELECT ledger_receipt AS receipt_id, ledger, started_at, ledger_energy_j AS energy_j, service,
          workload, ledger_model AS model, (started_at < $3 OR started_at >= $4) AS at_edge
        FROM joined WHERE billed_receipt IS NULL AND started_at >= $1 AND started_at < $2
        {"QUALIFY row_number() OVER (PARTITION BY ledger_receipt ORDER BY ledger) = 1" if several else ""}"""
    con.execute(f"CREATE TEMP TABLE unbilled AS {unbilled_rows}", edges)
    unbilled_row = _row(
        con,
        "SELECT count(*) FILTER (NOT at_edge), coalesce(sum(energy_j) FILTER (NOT at_edge), 0), "
        "count(*) FILTER (at_edge) FROM unbilled",
    )
    assert unbilled_row is not None
    unbilled = _arrow(
        con,
        f"""SELECT receipt_id, ledger, started_at, energy_j, service, workload, model FROM unbilled
            WHERE NOT at_edge ORDER BY started_at, receipt_id LIMIT {MAX_LISTED}""",
    )
    fields = {row[0] for row in con.execute("SELECT name FROM bill_fields").fetchall()}
    differing_sql = _differing_sql(fields)
    differing_calls = (_row(con, f"SELECT count(DISTINCT receipt_id) FROM ({differing_sql})") or (0,))[0]
    differing = _arrow(con, f"SELECT * FROM ({differing_sql}) ORDER BY receipt_id, field LIMIT {MAX_LISTED}")
    in_two, duplicated = 0, None
    if several:
        duplicated_sql = """SELECT ledger_receipt AS receipt_id, list(DISTINCT ledger ORDER BY ledger) AS in_ledgers
            FROM joined WHERE ledger_receipt IS NOT NULL
              AND ((billed_at >= $1 AND billed_at < $2) OR (started_at >= $1 AND started_at < $2))
            GROUP BY ledger_receipt HAVING count(DISTINCT ledger) > 1"""
        in_two = (_row(con, f"SELECT count(*) FROM ({duplicated_sql})", params) or (0,))[0]
        duplicated = _arrow(con, f"{duplicated_sql} ORDER BY receipt_id LIMIT {MAX_LISTED}", params)
    unreceipted = (
        _row(
            con,
            "SELECT count(*) FROM ledger_calls WHERE receipt_id IS NULL AND started_at >= $1 AND started_at < $2",
            params,
        )
        or (0,)
    )[0]
    return Reconciliation(
        bill=bill,
        ledgers=ledgers,
        period=period,
        billed_calls=int(billed_calls),
        billed_j=float(billed_j),
        found_calls=int(found_calls),
        found_j=float(found_j),
        by_day=by_day,
        missing_groups=_missing_groups(con, tz_name),
        missing_calls=int(billed_calls - found_calls),
        missing_j=float(billed_j - found_j),
        unbilled_calls=int(unbilled_row[0]),
        unbilled_j=float(unbilled_row[1]),
        at_edges=int(unbilled_row[2]),
        differing_calls=int(differing_calls),
        in_two_ledgers=int(in_two),
        unreceipted=int(unreceipted),
        missing=missing,
        unbilled=unbilled,
        differing=differing,
        duplicated=duplicated,
    )


def _arrow(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None) -> pa.Table:
    """A query's rows as an Arrow table, whichever DuckDB: ``to_arrow_table`` (1.4 on) or ``arrow``."""
    relation = con.sql(sql, params=params)
    convert = getattr(relation, "to_arrow_table", None) or relation.arrow
    return convert()


def _missing_groups(con: duckdb.DuckDBPyConnection, tz_name: str) -> list[dict[str, Any]]:
    """Billed receipts no ledger holds, by token: calls, joules, hours of day, and the models, regions and tiers."""
    rows = con.execute(
        f"""WITH missing AS (
              SELECT coalesce(token, '') AS token, energy_j, model, region, tier,
                     hour(timezone({_quote(tz_name)}, billed_at)) AS hour
              FROM billed WHERE NOT found),
            shares AS (
              SELECT token, 'model' AS kind, model AS value, count(*) AS n FROM missing GROUP BY ALL
              UNION ALL SELECT token, 'region', region, count(*) FROM missing GROUP BY ALL
              UNION ALL SELECT token, 'tier', tier, count(*) FROM missing GROUP BY ALL),
            top AS (SELECT token, kind, arg_max(value, n) AS value, max(n) AS n FROM shares GROUP BY token, kind)
            SELECT m.token, count(*) AS calls, sum(m.energy_j) AS energy_j,
                   list(DISTINCT m.hour ORDER BY m.hour) AS hours,
                   any_value(tm.value) AS model, any_value(tm.n) AS model_calls,
                   any_value(tr.value) AS region, any_value(tt.value) AS tier
            FROM missing m
            LEFT JOIN top tm ON tm.token = m.token AND tm.kind = 'model'
            LEFT JOIN top tr ON tr.token = m.token AND tr.kind = 'region'
            LEFT JOIN top tt ON tt.token = m.token AND tt.kind = 'tier'
            GROUP BY m.token ORDER BY energy_j DESC, calls DESC, m.token"""
    ).fetchall()
    groups = []
    for token, calls, energy, hours, model, model_calls, region, tier in rows:
        groups.append(
            {
                "token": token or None,
                "calls": int(calls),
                "energy_j": float(energy or 0.0),
                "hours": hour_ranges(hours, tz_name),
                "model": model,
                "model_share": (model_calls or 0) / calls if calls else 0.0,
                "region": region,
                "tier": tier,
            }
        )
    return groups


def hour_ranges(hours: list[int], tz_name: str) -> str:
    """``[9, 10, 11, 14]`` → ``09–11, 14 h UTC``: the hours of day the calls were billed in."""
    spans: list[tuple[int, int]] = []
    for hour in sorted(hours):
        if spans and hour == spans[-1][1] + 1:
            spans[-1] = (spans[-1][0], hour)
        else:
            spans.append((hour, hour))
    text = ", ".join(f"{a:02d}" if a == b else f"{a:02d}–{b:02d}" for a, b in spans)
    return f"{text} h {tz_name}"


_COMPARED = (
    ("energy_j", "energy_j", "ledger_energy_j", "number"),
    ("carbon_mg", "carbon_mg", "ledger_carbon_mg", "number"),
    ("model", "model", "ledger_model", "text"),
    ("tier", "tier", "ledger_tier", "text"),
    ("region", "region", "ledger_region", "text"),
)


def _differing_sql(fields: set[str]) -> str:
    """One row per (receipt, figure) where the ledger and the bill disagree; a figure the bill lacks is not compared."""
    parts = []
    for name, bill_column, ledger_column, kind in _COMPARED:
        if name not in fields:
            continue
        if kind == "number":
            differs = (
                f"{bill_column} IS NOT NULL AND ({ledger_column} IS NULL OR "
                f"abs({ledger_column} - {bill_column}) > 1e-9 * greatest(1.0, abs({bill_column})))"
            )
            difference = f"{ledger_column} - {bill_column}"
        else:
            differs = f"{bill_column} IS NOT NULL AND {ledger_column} IS DISTINCT FROM {bill_column}"
            if name != "model":
                differs = f"{bill_column} IS NOT NULL AND lower({ledger_column}) IS DISTINCT FROM {bill_column}"
            difference = "CAST(NULL AS DOUBLE)"
        parts.append(
            f"SELECT billed_receipt AS receipt_id, '{name}' AS field, "
            f"CAST({ledger_column} AS VARCHAR) AS ledger_value, CAST({bill_column} AS VARCHAR) AS bill_value, "
            f"{difference} AS difference FROM billed "
            f"WHERE found AND {differs}"
        )
    return " UNION ALL ".join(parts) or (
        "SELECT CAST(NULL AS VARCHAR) AS receipt_id, '' AS field, '' AS ledger_value, '' AS bill_value, "
        "CAST(NULL AS DOUBLE) AS difference WHERE false"
    )


# -- output --------------------------------------------------------------------------------------------------------
def _energy(joules: float) -> str:
    from joule_otel._units import energy

    return energy(joules)


def _share(part: float, whole: float) -> str:
    return f"{part / whole:.1%}" if whole else "–"


def group_line(group: dict[str, Any]) -> str:
    """One line a person can act on: ``token "jc_…c41f": 1,240 calls, 83.2 kJ, 09–11 h UTC, 92% gpt-oss-120b``."""
    token = _show(group["token"]) if group["token"] else "(no token on the bill)"
    parts = [f"token {token}: {group['calls']:,} call{'s' if group['calls'] != 1 else ''}", _energy(group["energy_j"])]
    parts.append(group["hours"])
    if group["model"]:
        parts.append(f"{group['model_share']:.0%} {_show(group['model'])[1:-1]}")
    if group["region"]:
        parts.append(f"region {_show(group['region'])[1:-1]}")
    return ", ".join(parts)


def render_text(result: Reconciliation, min_coverage: float = 1.0) -> str:
    """The terminal summary."""
    p = result.period
    lines = [
        f"Bill {result.bill} against {', '.join(result.ledgers)}",
        f"Period {p.start.astimezone(p.tz):%Y-%m-%d %H:%M:%S} – {p.end.astimezone(p.tz):%Y-%m-%d %H:%M:%S} {p.tz.key}"
        " (half-open)",
        "",
        f"Billed:     {result.billed_calls:,} receipts, {_energy(result.billed_j)}",
        f"In a ledger: {result.found_calls:,} ({_share(result.found_calls, result.billed_calls)} of receipts), "
        f"{_energy(result.found_j)} ({_share(result.found_j, result.billed_j)} of joules)",
    ]
    if result.missing_calls:
        lines += ["", f"Billed but in no ledger: {result.missing_calls:,} receipts, {_energy(result.missing_j)}"]
        lines += [f"  {group_line(g)}" for g in result.missing_groups[:10]]
        if len(result.missing_groups) > 10:
            lines.append(f"  … and {len(result.missing_groups) - 10} more tokens (--format json lists every one)")
    if result.differing_calls:
        lines += ["", f"Figures that differ from the bill: {result.differing_calls:,} receipts"]
        if result.differing is not None:
            for row in result.differing.slice(0, 10).to_pylist():
                lines.append(
                    f"  {_show(row['receipt_id'])} {row['field']}: ledger {_show(row['ledger_value'])}, "
                    f"bill {_show(row['bill_value'])}"
                )
    if result.unbilled_calls:
        lines += [
            "",
            f"In a ledger but not billed: {result.unbilled_calls:,} receipts, {_energy(result.unbilled_j)} "
            "(another period or account, or a forged header)",
        ]
    if result.at_edges:
        lines.append(f"At the period's edges, within the clock-skew allowance: {result.at_edges:,} (not counted)")
    if result.in_two_ledgers:
        lines.append(f"Rows in more than one ledger (counted once): {result.in_two_ledgers:,}")
    if result.unreceipted:
        lines.append(f"Refused calls without a receipt (neither billed nor missing): {result.unreceipted:,}")
    verdict = (
        "The ledger explains the bill."
        if result.explains(min_coverage)
        else f"The ledger does not explain the bill (needs {min_coverage:.1%} of joules and no differing figure)."
    )
    lines += ["", verdict]
    return "\n".join(lines) + "\n"


def to_json(result: Reconciliation, min_coverage: float = 1.0) -> dict[str, Any]:
    """Everything, receipts included (up to :data:`MAX_LISTED` per finding)."""
    p = result.period

    def rows(table: pa.Table | None) -> list[dict[str, Any]]:
        if table is None:
            return []
        return [
            {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in row.items()} for row in table.to_pylist()
        ]

    return {
        "bill": result.bill,
        "ledgers": result.ledgers,
        "period": {"start": p.start.isoformat(), "end": p.end.isoformat(), "tz": p.tz.key},
        "explained": result.explains(min_coverage),
        "min_coverage": min_coverage,
        "coverage": {
            "billed_calls": result.billed_calls,
            "billed_j": result.billed_j,
            "found_calls": result.found_calls,
            "found_j": result.found_j,
            "calls_share": result.coverage_calls,
            "joules_share": result.coverage_j,
            "by_day": result.by_day,
        },
        "billed_not_in_ledger": {
            "calls": result.missing_calls,
            "energy_j": result.missing_j,
            "groups": result.missing_groups,
            "receipts": rows(result.missing),
        },
        "in_ledger_not_billed": {
            "calls": result.unbilled_calls,
            "energy_j": result.unbilled_j,
            "at_edges": result.at_edges,
            "receipts": rows(result.unbilled),
        },
        "differing": {"calls": result.differing_calls, "figures": rows(result.differing)},
        "in_two_ledgers": {"calls": result.in_two_ledgers, "receipts": rows(result.duplicated)},
        "without_receipt": result.unreceipted,
    }


CSV_COLUMNS = ("finding", "receipt_id", "token", "time", "energy_j", "field", "ledger_value", "bill_value", "ledger")


def csv_rows(result: Reconciliation) -> Iterator[dict[str, Any]]:
    """One row per finding: a receipt billed but in no ledger, one not billed, a figure that differs."""
    for row in result.missing.to_pylist() if result.missing is not None else []:
        yield {
            "finding": "billed_not_in_ledger",
            "receipt_id": row["receipt_id"],
            "token": row["token"],
            "time": row["billed_at"].isoformat(),
            "energy_j": row["energy_j"],
        }
    for row in result.unbilled.to_pylist() if result.unbilled is not None else []:
        yield {
            "finding": "in_ledger_not_billed",
            "receipt_id": row["receipt_id"],
            "time": row["started_at"].isoformat(),
            "energy_j": row["energy_j"],
            "ledger": result.ledgers[row["ledger"]],
        }
    for row in result.differing.to_pylist() if result.differing is not None else []:
        yield {
            "finding": "differs",
            "receipt_id": row["receipt_id"],
            "field": row["field"],
            "ledger_value": row["ledger_value"],
            "bill_value": row["bill_value"],
        }
    for row in result.duplicated.to_pylist() if result.duplicated is not None else []:
        yield {
            "finding": "in_two_ledgers",
            "receipt_id": row["receipt_id"],
            "ledger": " ".join(result.ledgers[i] for i in row["in_ledgers"]),
        }


def _md(text: object) -> str:
    """A value from a bill or a ledger in a markdown table: a code span, nothing it can format or link."""
    value = "" if text is None else str(text)
    value = re.sub(r"[\x00-\x1f\x7f]", "�", value).replace("|", "\\|")
    ticks = "``" if "`" in value else "`"
    return f"{ticks} {value} {ticks}" if value else ""


def render_markdown(result: Reconciliation, min_coverage: float = 1.0) -> str:
    """The summary and every finding as markdown tables."""
    p = result.period
    out = [
        "# Reconciliation",
        "",
        f"Bill {_md(result.bill)} against {', '.join(_md(x) for x in result.ledgers)}, "
        f"{p.start.isoformat()} – {p.end.isoformat()} ({p.tz.key}, half-open).",
        "",
        "| | receipts | energy |",
        "|---|---|---|",
        f"| billed | {result.billed_calls:,} | {_energy(result.billed_j)} |",
        f"| in a ledger | {result.found_calls:,} ({_share(result.found_calls, result.billed_calls)}) | "
        f"{_energy(result.found_j)} ({_share(result.found_j, result.billed_j)}) |",
        f"| billed, in no ledger | {result.missing_calls:,} | {_energy(result.missing_j)} |",
        f"| in a ledger, not billed | {result.unbilled_calls:,} | {_energy(result.unbilled_j)} |",
        f"| figures that differ | {result.differing_calls:,} | |",
        "",
        "**"
        + (
            "The ledger explains the bill."
            if result.explains(min_coverage)
            else "The ledger does not explain the bill."
        )
        + "**",
    ]
    if result.missing_groups:
        out += [
            "",
            "## Billed but in no ledger, by token",
            "",
            "| token | calls | energy | hours | top model | share |",
            "|---|---|---|---|---|---|",
        ]
        out += [
            f"| {_md(g['token'] or '(none)')} | {g['calls']:,} | {_energy(g['energy_j'])} | {g['hours']} | "
            f"{_md(g['model'])} | {g['model_share']:.0%} |"
            for g in result.missing_groups
        ]
    if result.missing is not None and result.missing.num_rows:
        out += [
            "",
            "## Receipts billed but in no ledger",
            "",
            "| receipt | token | billed | energy |",
            "|---|---|---|---|",
        ]
        out += [
            f"| {_md(r['receipt_id'])} | {_md(r['token'])} | {r['billed_at'].isoformat()} | {_energy(r['energy_j'])} |"
            for r in result.missing.to_pylist()
        ]
    if result.differing is not None and result.differing.num_rows:
        out += ["", "## Figures that differ", "", "| receipt | field | ledger | bill |", "|---|---|---|---|"]
        out += [
            f"| {_md(r['receipt_id'])} | {r['field']} | {_md(r['ledger_value'])} | {_md(r['bill_value'])} |"
            for r in result.differing.to_pylist()
        ]
    if result.unbilled is not None and result.unbilled.num_rows:
        out += ["", "## In a ledger but not billed", "", "| receipt | started | energy | ledger |", "|---|---|---|---|"]
        out += [
            f"| {_md(r['receipt_id'])} | {r['started_at'].isoformat()} | {_energy(r['energy_j'] or 0.0)} | "
            f"{_md(result.ledgers[r['ledger']])} |"
            for r in result.unbilled.to_pylist()
        ]
    return "\n".join(out) + "\n"


def api_key_from_env(name: str) -> str:
    """The account's API key, from the environment variable ``name`` (never from the command line)."""
    key = os.environ.get(name, "").strip()
    if not key:
        raise ValueError(f"--from-api reads the account's API key from ${name}, which is not set")
    return key
