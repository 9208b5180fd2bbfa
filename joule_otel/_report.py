"""``joule-otel report``: the ledger's energy, carbon, calls and tokens for a period, grouped for chargeback.

Groups are any of the ledger's dimensions (workload, service, provider, model, region, tier), a calendar unit (day,
week, month, in UTC as bills are) or a tag key; calls without a tag are grouped as ``(untagged)``, calls without a
value of a column as ``(none)``. The total is the ledger's own for the period, summed apart from the groups, so a
report can be checked against the dashboard and the bill.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from joule_otel import _units as units
from joule_otel._tags import clean_key
from joule_otel.ledger import _reader as reader

COLUMNS = {
    "workload": "workload",
    "service": "service",
    "provider": "provider",
    "model": "routed_to",
    "requested_model": "requested_model",
    "region": "region",
    "tier": "tier",
    "operation": "operation",
}
"""A dimension's name in ``--by`` → its ledger column (``model`` is the routed model, the one that ran)."""
CALENDAR = {"day": "%Y-%m-%d", "week": "%G-W%V", "month": "%Y-%m"}
"""Calendar groups, in UTC: ISO dates, ISO weeks, months."""
UNTAGGED = "(untagged)"
PRUNED = "(pruned)"
"""A tag's group for calls pruned by retention: their totals are kept, their tags are not."""
NONE = "(none)"
FORMATS = ("table", "csv", "json", "markdown")
MEASURES = ("calls", "input_tokens", "output_tokens", "energy_j", "carbon_mg")


@dataclass(frozen=True)
class Period:
    """``[start, end)`` in UTC, and how it was named."""

    start: datetime
    end: datetime
    name: str


def period(text: str) -> Period:
    """``2026-11`` (a month), ``2026-11-05`` (a day), ``2026`` (a year) or ``2026-11-01..2026-11-15`` (end exclusive).

    Raises:
        ValueError: anything else (the message shows the forms).
    """
    text = text.strip()
    try:
        if ".." in text:
            first, _, last = text.partition("..")
            start, end = date.fromisoformat(first.strip()), date.fromisoformat(last.strip())
            if end <= start:
                raise ValueError("the end must be after the start")
        elif re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            start = date.fromisoformat(text)
            end = start + timedelta(days=1)
        elif re.fullmatch(r"\d{4}-\d{2}", text):
            start = date.fromisoformat(text + "-01")
            end = (start + timedelta(days=32)).replace(day=1)
        elif re.fullmatch(r"\d{4}", text):
            start, end = date(int(text), 1, 1), date(int(text) + 1, 1, 1)
        else:
            raise ValueError("not a period")
    except ValueError as exc:
        raise ValueError(
            f"--period {text!r}: {exc}; use a month (2026-11), a day (2026-11-05), a year (2026) or "
            "FROM..TO dates (2026-11-01..2026-11-15, TO excluded)"
        ) from None
    return Period(
        datetime.combine(start, datetime.min.time(), timezone.utc),
        datetime.combine(end, datetime.min.time(), timezone.utc),
        text,
    )


def dimensions(text: str) -> list[str]:
    """``team,workload`` → the groups, checked: a ledger dimension, a calendar unit, or a tag key.

    Raises:
        ValueError: a name that can be none of them, or one given twice.
    """
    found: list[str] = []
    for raw in text.split(","):
        name = raw.strip().lower()
        if not name:
            continue
        if name.startswith("tag:"):
            name = name[4:]
        if name not in COLUMNS and name not in CALENDAR and clean_key(name) is None:
            raise ValueError(f"--by {raw.strip()!r}: not a tag key nor one of {', '.join([*COLUMNS, *CALENDAR])}")
        if name in found:
            raise ValueError(f"--by names {name!r} twice")
        found.append(name)
    if not found:
        raise ValueError("--by needs at least one name, e.g. --by team or --by team,workload")
    return found


def _group_sql(name: str) -> str:
    if name in COLUMNS:
        return f"coalesce({COLUMNS[name]}, '{NONE}')"
    if name in CALENDAR:
        return f"strftime(started_at AT TIME ZONE 'UTC', '{CALENDAR[name]}')"
    # a tag key: checked by clean_key (letters, digits, _ . -), so it can be quoted as a literal
    return f"CASE WHEN pruned THEN '{PRUNED}' ELSE coalesce(tags['{name}'], '{UNTAGGED}') END"


@dataclass
class Report:
    """Each group's measures (largest energy first), and the period's totals."""

    by: list[str]
    period: Period
    groups: list[dict[str, Any]]
    total: dict[str, Any]


def build(db: Path, by: list[str], when: Period) -> Report:
    """The report of the ledger ``db`` for ``when``, grouped ``by``."""
    with reader.connect(db) as con:
        return compute(con, by, when)


_CALLS = (
    "SELECT started_at, workload, service, provider, routed_to, requested_model, region, tier, operation, tags, "
    "1 AS calls, input_tokens, output_tokens, energy_j, carbon_mg, false AS pruned FROM inference_calls"
)
_PRUNED_HOURS = (
    "SELECT hour, workload, service, provider, routed_to, requested_model, region, tier, operation, "
    "NULL::MAP(VARCHAR, VARCHAR), calls, input_tokens, output_tokens, energy_j, carbon_mg, true "
    "FROM calls_rollup WHERE hour < (SELECT before FROM joule_pruned)"
)
"""The hours before a ledger's retention boundary: their rows are gone, their totals are in the rollup."""


def _relation(con: Any) -> str:
    """The calls to report on: single calls, and the hourly totals of pruned ones where a ledger has them."""
    present = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables() WHERE temporary").fetchall()}
    views = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE temporary").fetchall()}
    if "joule_pruned" in present and "calls_rollup" in views:
        return f"({_CALLS} UNION ALL {_PRUNED_HOURS})"
    return f"({_CALLS})"


def compute(con: Any, by: list[str], when: Period) -> Report:
    """The report of the calls in ``con``'s ``inference_calls`` (a ledger's, or an export's) for ``when``.

    Pruned hours (``joule-otel ledger prune``, ``JOULE_OTEL_RETENTION``) count by their totals: grouped by a column
    the rollup keeps as before, by a tag as ``(pruned)``.
    """
    measures = (
        "coalesce(sum(calls), 0) AS calls, sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens, "
        "sum(energy_j) AS energy_j, sum(carbon_mg) AS carbon_mg"
    )
    where = "WHERE started_at >= ? AND started_at < ?"
    keys = [_group_sql(name) for name in by]
    select = ", ".join(f"{sql} AS g{i}" for i, sql in enumerate(keys))
    group = ", ".join(f"g{i}" for i in range(len(keys)))
    calls = _relation(con)
    rows = con.execute(
        f"SELECT {select}, {measures} FROM {calls} {where} GROUP BY {group} "
        f"ORDER BY energy_j DESC NULLS LAST, calls DESC, {group}",
        [when.start, when.end],
    ).fetchall()
    total_row = con.execute(f"SELECT {measures} FROM {calls} {where}", [when.start, when.end]).fetchone()
    total = dict(zip(MEASURES, total_row or (0, None, None, None, None), strict=True))
    groups = []
    for row in rows:
        entry = dict(zip(by, row[: len(by)], strict=True))
        entry.update(zip(MEASURES, row[len(by) :], strict=True))
        entry["share"] = (entry["energy_j"] or 0) / total["energy_j"] if total["energy_j"] else None
        groups.append(entry)
    return Report(by, when, groups, total)


def _kwh(joules: float | None) -> float | None:
    return joules / 3.6e6 if joules is not None else None


CSV_COLUMNS = ("calls", "input_tokens", "output_tokens", "energy_j", "energy_kwh", "carbon_g", "energy_share")


def csv_text(report: Report) -> str:
    """One line per group and a ``TOTAL`` line; raw numbers in named units, for a spreadsheet or a chargeback."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["period_start", "period_end", *report.by, *CSV_COLUMNS])
    span = [report.period.start.date().isoformat(), report.period.end.date().isoformat()]
    for entry in [*report.groups, {**dict.fromkeys(report.by, ""), **report.total, "share": 1.0, "_total": True}]:
        names = ["TOTAL" if entry.get("_total") and i == 0 else entry[name] for i, name in enumerate(report.by)]
        energy = entry["energy_j"]
        writer.writerow(
            [
                *span,
                *names,
                entry["calls"],
                entry["input_tokens"] if entry["input_tokens"] is not None else "",
                entry["output_tokens"] if entry["output_tokens"] is not None else "",
                f"{energy:.6f}" if energy is not None else "",
                f"{_kwh(energy):.9f}" if energy is not None else "",
                f"{entry['carbon_mg'] / 1000:.6f}" if entry["carbon_mg"] is not None else "",
                f"{entry['share']:.6f}" if entry.get("share") is not None else "",
            ]
        )
    return buffer.getvalue()


def json_text(report: Report) -> str:
    """The report as one JSON object: period, groups (with each share of the energy), total."""
    document = {
        "period": {
            "name": report.period.name,
            "start": report.period.start.isoformat(),
            "end": report.period.end.isoformat(),
        },
        "by": report.by,
        "groups": report.groups,
        "total": report.total,
    }
    return json.dumps(document, indent=2) + "\n"


def _cells(report: Report) -> tuple[list[str], list[list[str]]]:
    header = [*report.by, "calls", "tokens in", "tokens out", "energy", "carbon", "share"]
    lines = []
    for entry in [*report.groups, {**dict.fromkeys(report.by, ""), **report.total, "share": 1.0, "_total": True}]:
        names = ["total" if entry.get("_total") and i == 0 else str(entry[name]) for i, name in enumerate(report.by)]
        lines.append(
            [
                *names,
                f"{entry['calls']:,}",
                f"{entry['input_tokens']:,}" if entry["input_tokens"] is not None else "–",
                f"{entry['output_tokens']:,}" if entry["output_tokens"] is not None else "–",
                units.energy(entry["energy_j"]) if entry["energy_j"] is not None else "–",
                units.carbon(entry["carbon_mg"]) if entry["carbon_mg"] is not None else "–",
                f"{entry['share']:.1%}" if entry.get("share") is not None else "–",
            ]
        )
    return header, lines


def table_text(report: Report) -> str:
    """Aligned columns for a terminal, the total last."""
    header, lines = _cells(report)
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    named = len(report.by)

    def line(row: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < named else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )

    title = f"joule-otel report: {report.period.name} (UTC), by {', '.join(report.by)}"
    rule = "  ".join("-" * w for w in widths)
    body = [line(row) for row in lines[:-1]] or ["(no calls in this period)"]
    return "\n".join([title, "", line(header), rule, *body, rule, line(lines[-1])]) + "\n"


def markdown_text(report: Report) -> str:
    """A markdown table, the total in bold."""
    header, lines = _cells(report)
    named = len(report.by)
    align = ["---" if i < named else "---:" for i in range(len(header))]
    out = [f"**{report.period.name}** (UTC), by {', '.join(report.by)}", "", "| " + " | ".join(header) + " |"]
    out.append("| " + " | ".join(align) + " |")
    for row in lines[:-1]:
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
    out.append("| " + " | ".join(f"**{c}**" if c else "" for c in lines[-1]) + " |")
    return "\n".join(out) + "\n"


RENDER = {"table": table_text, "csv": csv_text, "json": json_text, "markdown": markdown_text}
