"""Every query the dashboard runs: SQL over ``inference_calls`` → small DataFrames.

All aggregation happens in DuckDB; only aggregates (or a bounded page of rows) reach pandas. Every
value a user chose reaches SQL as a parameter, never as text spliced into the query. Testable
without Streamlit: pass any DuckDB connection whose ``inference_calls`` is the ledger.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

DIMENSIONS = {
    "workload": "workload",
    "model": "routed_to",
    "region": "region",
    "tier": "tier",
    "service": "service",
    "requested model": "requested_model",
}
"""What a chart can be split by → the ledger column."""

STATUSES = ("all", "ok", "errors", "402 only")


@dataclass(frozen=True)
class Filters:
    """The sidebar's choices. Empty tuples mean "all"."""

    start: datetime | None = None
    end: datetime | None = None
    services: tuple[str, ...] = ()
    workloads: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    regions: tuple[str, ...] = ()
    tiers: tuple[str, ...] = ()
    status: str = "all"
    extra: tuple[tuple[str, Any], ...] = field(default=())

    def previous_period(self) -> Filters | None:
        """The same filters over the period of equal length just before this one."""
        if self.start is None or self.end is None:
            return None
        length = self.end - self.start
        return replace(self, start=self.start - length, end=self.start)


def where(filters: Filters) -> tuple[str, list[Any]]:
    """The WHERE clause (with leading ``WHERE``) and its parameters."""
    clauses: list[str] = []
    params: list[Any] = []
    if filters.start is not None:
        clauses.append("started_at >= ?")
        params.append(filters.start)
    if filters.end is not None:
        clauses.append("started_at < ?")
        params.append(filters.end)
    for column, values in (
        ("service", filters.services),
        ("workload", filters.workloads),
        ("routed_to", filters.models),
        ("region", filters.regions),
        ("tier", filters.tiers),
    ):
        if values:
            clauses.append(f"list_contains(?::VARCHAR[], {column})")
            params.append(list(values))
    if filters.status == "ok":
        clauses.append("error_type IS NULL")
    elif filters.status == "errors":
        clauses.append("error_type IS NOT NULL")
    elif filters.status == "402 only":
        clauses.append("status_code = 402")
    return ("WHERE " + " AND ".join(clauses)) if clauses else "", params


def _df(con: Any, sql: str, params: list[Any]) -> Any:
    return con.execute(sql, params).df()


def options(con: Any) -> dict[str, Any]:
    """Distinct values for every filter and the data's time span (one scan)."""
    row = con.execute(
        "SELECT min(started_at), max(started_at), count(*), "
        "list_sort(list(DISTINCT service)), list_sort(list(DISTINCT workload)), "
        "list_sort(list(DISTINCT routed_to)), list_sort(list(DISTINCT region)), list_sort(list(DISTINCT tier)) "
        "FROM inference_calls"
    ).fetchone()
    keys = ("first", "last", "rows", "services", "workloads", "models", "regions", "tiers")
    result = dict(zip(keys, row, strict=True))
    for key in keys[3:]:
        result[key] = [v for v in (result[key] or []) if v is not None]
    return result


_KPI_SQL = """
SELECT
  coalesce(sum(energy_j), 0) AS energy_j,
  coalesce(sum(carbon_mg), 0) AS carbon_mg,
  count(*) AS calls,
  avg(energy_j) AS mean_j_per_call,
  sum(energy_j) FILTER (WHERE output_tokens > 0) * 1000.0
    / nullif(sum(output_tokens) FILTER (WHERE output_tokens > 0 AND energy_j IS NOT NULL), 0) AS j_per_1k_output,
  avg(CASE WHEN requested_model = 'auto' THEN 1.0 ELSE 0.0 END) AS auto_share,
  count(*) FILTER (WHERE status_code = 402) AS refused_402,
  count(*) FILTER (WHERE error_type IS NOT NULL) AS errors
FROM inference_calls {where}
"""


def kpis(con: Any, filters: Filters) -> dict[str, Any]:
    """Headline numbers for the period, and the same for the previous period (``previous``)."""

    def one(f: Filters) -> dict[str, Any]:
        clause, params = where(f)
        cursor = con.execute(_KPI_SQL.format(where=clause), params)
        names = [d[0] for d in cursor.description]
        return dict(zip(names, cursor.fetchone(), strict=True))

    current = one(filters)
    previous_filters = filters.previous_period()
    current["previous"] = one(previous_filters) if previous_filters is not None else None
    return current


def bucket_for(span: timedelta) -> str:
    """A time bucket that gives a readable number of points over ``span``."""
    if span <= timedelta(hours=3):
        return "5 minutes"
    if span <= timedelta(days=2):
        return "1 hour"
    if span <= timedelta(days=90):
        return "1 day"
    return "7 days"


def energy_over_time(con: Any, filters: Filters, by: str, bucket: str) -> Any:
    """Joules per time bucket, split by a dimension of :data:`DIMENSIONS`."""
    column = DIMENSIONS[by]
    clause, params = where(filters)
    return _df(
        con,
        f"""
        SELECT time_bucket(?::INTERVAL, started_at) AS bucket, coalesce({column}, '(none)') AS "group",
               sum(energy_j) AS energy_j, sum(carbon_mg) AS carbon_mg, count(*) AS calls
        FROM inference_calls {clause}
        GROUP BY ALL ORDER BY bucket, "group"
    """,
        [bucket, *params],
    )


def breakdown(con: Any, filters: Filters, by: str) -> Any:
    """Energy, carbon, calls, tokens and errors per value of one dimension."""
    column = DIMENSIONS[by]
    clause, params = where(filters)
    return _df(
        con,
        f"""
        SELECT coalesce({column}, '(none)') AS "group", sum(energy_j) AS energy_j, sum(carbon_mg) AS carbon_mg,
               count(*) AS calls, sum(output_tokens) AS output_tokens,
               count(*) FILTER (WHERE error_type IS NOT NULL) AS errors
        FROM inference_calls {clause}
        GROUP BY ALL ORDER BY energy_j DESC NULLS LAST
    """,
        params,
    )


def workload_model(con: Any, filters: Filters) -> Any:
    """Energy per workload and routed model (the treemap)."""
    clause, params = where(filters)
    return _df(
        con,
        f"""
        SELECT coalesce(workload, '(none)') AS workload, coalesce(routed_to, '(refused)') AS model,
               sum(energy_j) AS energy_j, count(*) AS calls
        FROM inference_calls {clause}
        GROUP BY ALL HAVING sum(energy_j) > 0 ORDER BY energy_j DESC
    """,
        params,
    )


def router_flows(con: Any, filters: Filters) -> Any:
    """Requested model → routed model, weighted by joules."""
    clause, params = where(filters)
    return _df(
        con,
        f"""
        SELECT coalesce(requested_model, '(unknown)') AS requested, coalesce(routed_to, '(refused)') AS routed,
               sum(energy_j) AS energy_j, count(*) AS calls
        FROM inference_calls {clause}
        GROUP BY ALL HAVING sum(energy_j) > 0 ORDER BY energy_j DESC
    """,
        params,
    )


def model_efficiency(con: Any, filters: Filters) -> Any:
    """Per routed model: J per output token, J per call, median latency and time to first chunk."""
    clause, params = where(filters)
    return _df(
        con,
        f"""
        SELECT routed_to AS model,
               sum(energy_j) FILTER (WHERE output_tokens > 0)
                 / nullif(sum(output_tokens) FILTER (WHERE output_tokens > 0 AND energy_j IS NOT NULL), 0)
                 AS j_per_output_token,
               avg(energy_j) AS j_per_call, count(*) AS calls,
               median(duration_ms) AS p50_duration_ms, quantile_cont(duration_ms, 0.95) AS p95_duration_ms,
               median(ttft_ms) AS p50_ttft_ms
        FROM inference_calls {clause} {"AND" if clause else "WHERE"} routed_to IS NOT NULL
        GROUP BY ALL ORDER BY j_per_output_token DESC NULLS LAST
    """,
        params,
    )


def carbon_by_region(con: Any, filters: Filters) -> Any:
    """Per region: energy, carbon and the effective intensity (mg per J, and g per kWh)."""
    clause, params = where(filters)
    return _df(
        con,
        f"""
        SELECT coalesce(region, '(unpinned)') AS region, sum(energy_j) AS energy_j, sum(carbon_mg) AS carbon_mg,
               sum(carbon_mg) / nullif(sum(energy_j) FILTER (WHERE carbon_mg IS NOT NULL), 0) AS mg_per_j,
               sum(carbon_mg) / nullif(sum(energy_j) FILTER (WHERE carbon_mg IS NOT NULL), 0) * 3600
                 AS g_per_kwh,
               count(*) AS calls
        FROM inference_calls {clause}
        GROUP BY ALL HAVING sum(energy_j) > 0 ORDER BY carbon_mg DESC
    """,
        params,
    )


def carbon_savings(con: Any, filters: Filters) -> Any:
    """Per workload: carbon now, and if served at the cleanest region seen in the data."""
    clause, params = where(filters)
    return _df(
        con,
        f"""
        WITH f AS (SELECT * FROM inference_calls {clause}),
        clean AS (
          SELECT region, sum(carbon_mg) / nullif(sum(energy_j), 0) AS mg_per_j FROM f
          WHERE region IS NOT NULL AND carbon_mg IS NOT NULL GROUP BY region
          HAVING sum(energy_j) > 0 ORDER BY mg_per_j LIMIT 1)
        SELECT f.workload, sum(f.carbon_mg) AS carbon_mg, sum(f.energy_j) * any_value(clean.mg_per_j) AS if_cleanest_mg,
               any_value(clean.region) AS cleanest_region
        FROM f CROSS JOIN clean
        GROUP BY f.workload HAVING sum(f.carbon_mg) > 0
        ORDER BY sum(f.carbon_mg) - sum(f.energy_j) * any_value(clean.mg_per_j) DESC
    """,
        params,
    )


def energy_histogram(con: Any, filters: Filters) -> Any:
    """Calls per log-spaced energy bin (¼ decade), computed in DuckDB."""
    clause, params = where(filters)
    return _df(
        con,
        f"""
        SELECT power(10, floor(log10(energy_j) * 4) / 4) AS bin_start_j,
               power(10, (floor(log10(energy_j) * 4) + 1) / 4) AS bin_end_j, count(*) AS calls
        FROM inference_calls {clause} {"AND" if clause else "WHERE"} energy_j > 0
        GROUP BY ALL ORDER BY bin_start_j
    """,
        params,
    )


def latency_sample(con: Any, filters: Filters, rows: int = 3000) -> Any:
    """A uniform sample of calls (duration, time to first chunk, energy, model) for scatter plots."""
    clause, params = where(filters)
    return _df(
        con,
        f"""
        SELECT * FROM (
          SELECT duration_ms, ttft_ms, energy_j, coalesce(routed_to, '(refused)') AS model, workload, stream
          FROM inference_calls {clause} {"AND" if clause else "WHERE"} energy_j IS NOT NULL)
        USING SAMPLE reservoir({int(rows)} ROWS) REPEATABLE (7)
    """,
        params,
    )


def _month_to_date(filters: Filters, workloads: list[str], as_of: datetime) -> Filters:
    """The filters narrowed to these workloads, from the start of ``as_of``'s month to ``as_of``."""
    month_start = as_of.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return replace(filters, start=month_start, end=as_of + timedelta(microseconds=1), workloads=tuple(workloads))


def budget_status(con: Any, filters: Filters, budgets: dict[str, float], as_of: datetime) -> Any:
    """Month to date per budgeted workload: spend, burn rate, projected exhaustion, 402s."""
    if not budgets:
        return None
    clause, params = where(_month_to_date(filters, list(budgets), as_of))
    return _df(
        con,
        f"""
        WITH b AS (SELECT unnest(?::VARCHAR[]) AS workload, unnest(?::DOUBLE[]) AS budget_j),
        spend AS (
          SELECT workload, coalesce(sum(energy_j), 0) AS spent_j, count(*) FILTER (WHERE status_code = 402) AS refused,
                 min(started_at) FILTER (WHERE status_code = 402) AS first_402
          FROM inference_calls {clause} GROUP BY workload)
        SELECT b.workload, b.budget_j, coalesce(spend.spent_j, 0) AS spent_j,
               coalesce(spend.spent_j, 0) / b.budget_j AS used_share, coalesce(spend.refused, 0) AS refused_402,
               spend.first_402
        FROM b LEFT JOIN spend USING (workload) ORDER BY used_share DESC
    """,
        [list(budgets), [float(v) for v in budgets.values()], *params],
    )


def budget_burn(con: Any, filters: Filters, workloads: list[str], as_of: datetime) -> Any:
    """Cumulative joules per day this month, per budgeted workload (the burn-down)."""
    clause, params = where(_month_to_date(filters, workloads, as_of))
    return _df(
        con,
        f"""
        SELECT workload, day, sum(energy_j) OVER (PARTITION BY workload ORDER BY day) AS cumulative_j
        FROM (SELECT workload, date_trunc('day', started_at) AS day, coalesce(sum(energy_j), 0) AS energy_j
              FROM inference_calls {clause} GROUP BY ALL)
        ORDER BY workload, day
    """,
        params,
    )


RECEIPT_COLUMNS = (
    "started_at",
    "receipt_id",
    "workload",
    "service",
    "operation",
    "requested_model",
    "routed_to",
    "tier",
    "region",
    "energy_j",
    "carbon_mg",
    "input_tokens",
    "output_tokens",
    "duration_ms",
    "ttft_ms",
    "status_code",
    "error_type",
    "trace_id",
)


def receipts(con: Any, filters: Filters, search: str = "", limit: int | None = 500) -> Any:
    """Rows, newest first, whose receipt id or workload contains ``search`` (case-insensitive)."""
    clause, params = where(filters)
    if search.strip():
        clause = (clause + " AND " if clause else "WHERE ") + (
            "(contains(lower(coalesce(receipt_id, '')), lower(?)) OR contains(lower(coalesce(workload, '')), lower(?)))"
        )
        params += [search.strip(), search.strip()]
    sql = f"SELECT {', '.join(RECEIPT_COLUMNS)} FROM inference_calls {clause} ORDER BY started_at DESC"
    if limit is not None:
        sql += " LIMIT ?"
        params.append(int(limit))
    return _df(con, sql, params)
