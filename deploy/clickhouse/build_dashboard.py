"""Build the Grafana dashboard on ClickHouse (``joule-otel-clickhouse.json``) from the panels listed here.

    python deploy/clickhouse/build_dashboard.py          # rewrites deploy/clickhouse/joule-otel-clickhouse.json
    python deploy/clickhouse/build_dashboard.py --check  # exit 1 if the committed JSON is stale

Every panel is SQL for Grafana's ClickHouse data source (grafana-clickhouse-datasource) over the views of
``joule.sql``: ``otel.joule_hours`` for figures over time (rows while they are kept, hourly totals after), and
``otel.joule_calls_final`` for single calls. The variables narrow every panel; "All" is the value ``__all``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUTPUT = HERE / "joule-otel-clickhouse.json"
DATASOURCE = {"type": "grafana-clickhouse-datasource", "uid": "${datasource}"}

VARIABLES = {  # name: the column it narrows
    "service": "service",
    "workload": "workload",
    "model": "routed_to",
    "region": "region",
    "tier": "tier",
}
FILTER = " AND ".join(
    f"('__all' IN (${{{name}:singlequote}}) OR ifNull({column}, '') IN (${{{name}:singlequote}}))"
    for name, column in VARIABLES.items()
)
"""What every query over the calls keeps: the variables' choices (a missing value is the empty one)."""
HOURS = f"FROM otel.joule_hours WHERE $__timeFilter(hour) AND {FILTER}"
CALLS = f"FROM otel.joule_calls_final WHERE $__timeFilter(started_at) AND {FILTER}"


def stat(title: str, sql: str, unit: str, description: str) -> dict[str, Any]:
    """One figure over the time range."""
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "fieldConfig": {"defaults": {"unit": unit, "decimals": 2}, "overrides": []},
        "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}, "colorMode": "none"},
        "targets": [_query(sql, "table")],
    }


def series(title: str, sql: str, unit: str, description: str) -> dict[str, Any]:
    """Stacked hourly bars."""
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "fieldConfig": {"defaults": {"unit": unit, "custom": {"drawStyle": "bars", "stacking": {"mode": "normal"}}}},
        "options": {"legend": {"displayMode": "table", "placement": "right", "calcs": ["sum"]}},
        "targets": [_query(sql, "timeseries")],
    }


def table(title: str, sql: str, description: str) -> dict[str, Any]:
    """Rows as the query returns them."""
    return {
        "type": "table",
        "title": title,
        "description": description,
        "fieldConfig": {"defaults": {}, "overrides": []},
        "options": {"showHeader": True},
        "targets": [_query(sql, "table")],
    }


def _query(sql: str, kind: str) -> dict[str, Any]:
    return {
        "datasource": DATASOURCE,
        "editorType": "sql",
        "format": 0 if kind == "timeseries" else 1,
        "queryType": kind,
        "rawSql": sql,
        "refId": "A",
    }


def by_hour(measure: str, split: str) -> str:
    """A measure per hour, one series per value of ``split`` (Grafana's long-to-wide on the string column)."""
    return (
        f"SELECT hour AS time, ifNull({split}, '(none)') AS {split}, {measure} AS value {HOURS} "
        f"GROUP BY time, {split} ORDER BY time"
    )


PANELS: list[dict[str, Any]] = [
    stat("Energy", f"SELECT sum(energy_j) / 1000 AS kJ {HOURS}", "kJ", "Joules billed by Joule Cloud, in kJ."),
    stat("Carbon", f"SELECT sum(carbon_mg) / 1000 AS g {HOURS}", "massg", "CO2e of that energy, in grams."),
    stat("Calls", f"SELECT sum(calls) AS calls {HOURS}", "short", "Calls recorded, one per receipt."),
    stat(
        "Energy per 1k output tokens",
        f"SELECT sum(energy_j) / nullIf(sum(output_tokens), 0) * 1000 AS j {HOURS}",
        "J",
        "Joules per thousand output tokens (calls with a token count).",
    ),
    stat(
        "Refused for budget (402)",
        f"SELECT sum(calls) AS calls {HOURS} AND status_code = 402",
        "short",
        "Calls Joule Cloud refused with 402: a key's energy budget was spent.",
    ),
    stat(
        "Hours from totals only",
        f"SELECT countDistinct(hour) AS hours {HOURS} AND from_totals",
        "short",
        "Hours in range whose rows the TTL removed: their figures come from the hourly totals (no single calls).",
    ),
    series("Energy by workload", by_hour("sum(energy_j)", "workload"), "J", "Joules per hour and workload."),
    series("Carbon by region", by_hour("sum(carbon_mg) / 1000", "region"), "massg", "Grams CO2e per hour and region."),
    series("Calls by model", by_hour("sum(calls)", "routed_to"), "short", "Calls per hour by the model that served."),
    series("Energy by tier", by_hour("sum(energy_j)", "tier"), "J", "Joules per hour and capacity tier."),
    series(
        "Tokens",
        f"SELECT hour AS time, sum(input_tokens) AS input, sum(output_tokens) AS output {HOURS} "
        "GROUP BY time ORDER BY time",
        "short",
        "Input and output tokens per hour.",
    ),
    table(
        "The router: what was asked, what served",
        "SELECT ifNull(requested_model, '(none)') AS requested, ifNull(routed_to, '(none)') AS served, "
        f"sum(calls) AS calls, round(sum(energy_j), 1) AS energy_j {HOURS} "
        "GROUP BY requested, served ORDER BY calls DESC",
        "Requested model against the model that served ('auto' is the router's choice), with calls and joules.",
    ),
    table(
        "Receipts",
        "SELECT started_at, receipt_id, service, workload, routed_to, tier, region, energy_j, carbon_mg, "
        f"input_tokens, output_tokens, status_code {CALLS} ORDER BY started_at DESC LIMIT 200",
        "The latest calls, one row per receipt: check any against Joule's bill.",
    ),
]


def variable(name: str, column: str) -> dict[str, Any]:
    """A multi-value variable listing the values of ``column`` in the time range."""
    return {
        "type": "query",
        "name": name,
        "label": name,
        "datasource": DATASOURCE,
        "query": f"SELECT DISTINCT ifNull({column}, '') FROM otel.joule_hours WHERE $__timeFilter(hour) ORDER BY 1",
        "definition": "",
        "refresh": 2,
        "multi": True,
        "includeAll": True,
        "allValue": "__all",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
    }


def build() -> dict[str, Any]:
    """The dashboard's JSON model."""
    panels = []
    for index, panel in enumerate(PANELS):
        panels.append({"id": index + 1, "datasource": DATASOURCE, **panel})
    _lay_out(panels)
    return {
        "uid": "joule-otel-clickhouse",
        "title": "Joule Cloud energy (ClickHouse)",
        "description": "joule-otel's ledger in ClickHouse (deploy/clickhouse): energy, carbon, calls, router, 402s.",
        "tags": ["joule-otel", "clickhouse", "energy"],
        "editable": True,
        "schemaVersion": 39,
        "time": {"from": "now-7d", "to": "now"},
        "refresh": "1m",
        "templating": {
            "list": [
                {
                    "type": "datasource",
                    "name": "datasource",
                    "label": "ClickHouse",
                    "query": "grafana-clickhouse-datasource",
                    "current": {"text": "ClickHouse", "value": "clickhouse"},
                },
                *(variable(name, column) for name, column in VARIABLES.items()),
            ]
        },
        "panels": panels,
    }


def _lay_out(panels: list[dict[str, Any]]) -> None:
    """Stats in a row of six, series two a row, tables full width, in the order listed."""
    x = y = row_height = 0
    for panel in panels:
        width, height = {"stat": (4, 4), "timeseries": (12, 8)}.get(panel["type"], (24, 9))
        if x + width > 24:
            x, y = 0, y + row_height
        panel["gridPos"] = {"x": x, "y": y, "w": width, "h": height}
        x, row_height = x + width, height


def main() -> int:
    """Write the JSON, or check the committed one."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed JSON differs from the build")
    args = parser.parse_args()
    text = json.dumps(build(), indent=2) + "\n"
    if args.check:
        if OUTPUT.read_text() != text:
            print(f"{OUTPUT} is stale: run python {Path(__file__).relative_to(Path.cwd())}", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
