"""Every query the dashboard runs: SQL over ``inference_calls`` → small DataFrames.

All aggregation happens in DuckDB; only aggregates (or a bounded page of rows) reach pandas. Every
value a user chose reaches SQL as a parameter, never as text spliced into the query. Testable
without Streamlit: pass any DuckDB connection whose ``inference_calls`` is the ledger.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any

from joule_otel._budgets import Budget
from joule_otel._tags import clean_key

DIMENSIONS = {
    "workload": "workload",
    "model": "routed_to",
    "region": "region",
    "tier": "tier",
    "service": "service",
    "requested model": "requested_model",
}
"""What a chart can be split by → the ledger column."""
TAG_SPLIT = "tag: "
"""A split by a tag key is named ``tag: team``."""
UNTAGGED = "(untagged)"
MAX_TAG_VALUES = 200
"""Values of one tag key offered as filters (the most used first)."""

STATUSES = ("all", "ok", "errors", "402 only")

_log = logging.getLogger("joule_otel")


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
    providers: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    """``key=value`` each: a call passes with any of a key's values, and must pass every key named."""
    status: str = "all"
    extra: tuple[tuple[str, Any], ...] = field(default=())

    def previous_period(self) -> Filters | None:
        """The same filters over the period of equal length just before this one."""
        if self.start is None or self.end is None:
            return None
        length = self.end - self.start
        return replace(self, start=self.start - length, end=self.start)


def where(filters: Filters) -> tuple[str, list[Any]]:
    """The WHERE clause (with leading ``WHERE``) over rows of ``inference_calls``, and its parameters."""
    clauses, params = _time_clauses(filters.start, filters.end)
    more, more_params = _dimension_clauses(filters)
    clauses += more
    params += more_params
    return ("WHERE " + " AND ".join(clauses)) if clauses else "", params


def _utc(moment: datetime | None) -> datetime | None:
    """The moment, aware and in UTC (a naive time is taken as UTC).

    The rollup's hours are UTC hours, and an hour boundary of a zone such as +05:30 is not one of them.
    """
    if moment is None:
        return None
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


def _time_clauses(
    start: datetime | None, end: datetime | None, column: str = "started_at"
) -> tuple[list[str], list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    if start is not None:
        clauses.append(f"{column} >= ?")
        params.append(_utc(start))
    if end is not None:
        clauses.append(f"{column} < ?")
        params.append(_utc(end))
    return clauses, params


def _dimension_clauses(filters: Filters) -> tuple[list[str], list[Any]]:
    """Everything but time: these columns are in the rows and in the rollup alike (tags in the rows only)."""
    clauses: list[str] = []
    params: list[Any] = []
    for column, values in (
        ("service", filters.services),
        ("workload", filters.workloads),
        ("routed_to", filters.models),
        ("region", filters.regions),
        ("tier", filters.tiers),
        ("provider", filters.providers),
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
    wanted: dict[str, list[str]] = {}
    for pair in filters.tags:
        key, _, value = pair.partition("=")
        if clean_key(key) == key:  # a key is a SQL literal here: only what a tag key can be
            wanted.setdefault(key, []).append(value)
    for key, chosen in wanted.items():
        clauses.append(f"list_contains(?::VARCHAR[], tags['{key}'])")
        params.append(chosen)
    return clauses, params


def is_split(by: str) -> bool:
    """Whether the Overview can split by ``by``: one of the first four dimensions, or ``tag: key``."""
    if by.startswith(TAG_SPLIT):
        return clean_key(by[len(TAG_SPLIT) :]) == by[len(TAG_SPLIT) :]
    return by in list(DIMENSIONS)[:4]


def tag_column(by: str) -> str | None:
    """The SQL of a ``tag: key`` split (``(untagged)`` where a call has no such tag), else None."""
    if not by.startswith(TAG_SPLIT):
        return None
    key = by[len(TAG_SPLIT) :]
    if clean_key(key) != key:
        raise ValueError(f"not a tag key: {key!r}")
    return f"coalesce(tags['{key}'], '{UNTAGGED}')"


def _df(con: Any, sql: str, params: list[Any]) -> Any:
    return con.execute(sql, params).df()


def _has_parts(con: Any) -> bool:
    """Whether the connection is a ledger reader's rather than a view over an export file.

    A reader's has ``compacted_calls`` and ``pending_calls`` (see :func:`joule_otel.ledger._reader.connect`).
    """
    return bool(con.execute("SELECT count(*) FROM duckdb_views() WHERE view_name = 'compacted_calls'").fetchone()[0])


def pruned_before(con: Any) -> datetime | None:
    """The ledger's retention boundary: calls before it are in the hourly totals only. None if never pruned."""
    if not con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'joule_pruned'").fetchone()[0]:
        return None
    found = con.execute("SELECT before FROM joule_pruned").fetchone()
    return found[0] if found else None


def _has_rollup(con: Any) -> bool:
    """Whether the hourly rollup is there and covers every compacted row.

    Compaction keeps it current; rows inserted or deleted by hand would make it disagree, and then the
    queries read single calls (right, slower) and say once how to rebuild it. Checked once per connection.
    """
    if not con.execute("SELECT count(*) FROM duckdb_views() WHERE view_name = 'calls_rollup'").fetchone()[0]:
        return False
    cut = pruned_before(con)
    # hours before a retention boundary are totals of pruned rows: the rows left match the hours after it
    since = "WHERE hour >= (SELECT before FROM joule_pruned)" if cut is not None else ""
    con.execute(
        "CREATE TEMP TABLE IF NOT EXISTS joule_rollup_check AS SELECT "
        f"(SELECT count(*) FROM compacted_calls) AS calls, (SELECT coalesce(sum(calls), 0) FROM calls_rollup {since}) "
        "AS rolled"
    )
    calls, rolled = con.execute("SELECT calls, rolled FROM joule_rollup_check").fetchone()
    if calls != rolled and (calls, rolled) not in _warned_stale_rollup:  # once per state, not once per rerun
        _warned_stale_rollup.add((calls, rolled))
        _log.warning(
            "joule_otel: the ledger's hourly rollup covers %s calls but the file holds %s (rows edited by hand?); "
            "the dashboard reads single calls meanwhile. Run `joule-otel ledger compact --rebuild-rollup`.",
            rolled,
            calls,
        )
    return bool(calls == rolled)


_warned_stale_rollup: set[tuple[int, int]] = set()


def _ceil_hour(moment: datetime) -> datetime:
    floor = moment.replace(minute=0, second=0, microsecond=0)
    return floor if floor == moment else floor + timedelta(hours=1)


def facts(
    con: Any, filters: Filters, *, hourly: bool = True, keep: bool = True, tags: bool = False
) -> tuple[str, list[Any]]:
    """A ``WITH facts AS (…)`` clause: the filtered calls as additive facts, and its parameters.

    A fact is a call, or an hour of calls that share every key of the rollup (see
    :data:`joule_otel.ledger._schema.FACT_MEASURES`): every aggregate the dashboard shows is a sum, min or
    max of facts, so reading the hourly rollup for the whole hours of the range and single calls only for
    the partial hours at its edges (and for spooled rows not compacted yet) gives the exact figures at a
    fraction of the scan. ``hourly=False`` reads single calls only (time buckets under an hour); ``keep=False``
    reads them in place, for a question asked once a connection. Tags are not in the rollup: ``tags=True`` (the
    facts carry each call's tags) and a filter by tag read single calls.
    """
    from joule_otel.ledger._schema import raw_facts_sql

    dims, dim_params = _dimension_clauses(filters)
    raw = raw_facts_sql() + (", tags" if tags else "")
    if tags or filters.tags:
        hourly = False

    def part(sql: str, clauses: list[str], params: list[Any]) -> tuple[str, list[Any]]:
        conditions = clauses + dims
        return sql + (" WHERE " + " AND ".join(conditions) if conditions else ""), params + dim_params

    parts: list[tuple[str, list[Any]]] = []
    start, end = _utc(filters.start), _utc(filters.end)
    low = _ceil_hour(start) if start is not None else None
    high = end.replace(minute=0, second=0, microsecond=0) if end is not None else None
    if hourly and _has_rollup(con) and (low is None or high is None or low < high):
        parts.append(part("SELECT hour AS t, * EXCLUDE (hour) FROM calls_rollup", *_time_clauses(low, high, "hour")))
        edges: list[str] = []
        edge_params: list[Any] = []
        if low is not None:
            lower, lower_params = _time_clauses(start, low)
            edges.append("(" + " AND ".join(lower) + ")")
            edge_params += lower_params
        if high is not None:
            upper, upper_params = _time_clauses(high, end)
            edges.append("(" + " AND ".join(upper) + ")")
            edge_params += upper_params
        if edges:
            parts.append(part(f"SELECT {raw} FROM compacted_calls", ["(" + " OR ".join(edges) + ")"], edge_params))
        parts.append(part(f"SELECT {raw} FROM pending_calls", *_time_clauses(start, end)))
    else:
        parts.append(part(f"SELECT {raw} FROM inference_calls", *_time_clauses(start, end)))
    sql = " UNION ALL BY NAME ".join(p for p, _ in parts)
    params = [v for _, part_params in parts for v in part_params]
    if not keep:
        return f"WITH facts AS ({sql})", params
    # A page asks a dozen questions of the same facts: gather them once a connection (a page's visit to the
    # ledger) into a temporary table, and let every query read that instead of the rollup, the edges and the
    # spool again. The name is a digest of the query and its values, so other filters get their own table.
    return f"WITH facts AS (SELECT * FROM {_kept(con, 'facts', sql, params)})", []


def _kept(con: Any, kind: str, sql: str, params: list[Any]) -> str:
    """The name of a temporary table holding what ``sql`` selects, made on first use on this connection."""
    digest = hashlib.blake2b(repr((sql, params)).encode(), digest_size=8).hexdigest()
    table = f"joule_{kind}_{digest}"
    con.execute(f"CREATE TEMP TABLE IF NOT EXISTS {table} AS {sql}", params)
    return table


def options(con: Any) -> dict[str, Any]:
    """Distinct values for every filter and the data's time span."""
    with_facts, params = facts(con, Filters(), keep=False)
    row = con.execute(
        f"{with_facts} SELECT min(first_at), max(last_at), coalesce(sum(calls), 0), "
        "list_sort(list(DISTINCT service)), list_sort(list(DISTINCT workload)), "
        "list_sort(list(DISTINCT routed_to)), list_sort(list(DISTINCT region)), list_sort(list(DISTINCT tier)), "
        "list_sort(list(DISTINCT provider)) "
        "FROM facts",
        params,
    ).fetchone()
    keys = ("first", "last", "rows", "services", "workloads", "models", "regions", "tiers", "providers")
    result = dict(zip(keys, row, strict=True))
    for key in keys[3:]:
        result[key] = [v for v in (result[key] or []) if v is not None]
    result["tags"] = tag_options(con)
    result["pruned_before"] = pruned_before(con)
    return result


_KPI_SQL = """
SELECT
  coalesce(sum(energy_j), 0) AS energy_j,
  coalesce(sum(carbon_mg), 0) AS carbon_mg,
  coalesce(sum(calls), 0) AS calls,
  coalesce(sum(calls) FILTER (WHERE provider = 'joule_cloud'), 0) AS joule_calls,
  coalesce(sum(energy_calls), 0) AS energy_calls,
  sum(energy_j) / nullif(sum(energy_calls), 0) AS mean_j_per_call,
  sum(out_energy_j) FILTER (WHERE operation IS DISTINCT FROM 'embeddings') * 1000.0
    / nullif(sum(out_tokens_e) FILTER (WHERE operation IS DISTINCT FROM 'embeddings'), 0) AS j_per_1k_output,
  sum(calls) FILTER (WHERE requested_model = 'auto') / nullif(sum(calls), 0) AS auto_share,
  coalesce(sum(calls) FILTER (WHERE status_code = 402), 0) AS refused_402,
  coalesce(sum(calls) FILTER (WHERE error_type IS NOT NULL), 0) AS errors
FROM facts
"""


def kpis(con: Any, filters: Filters) -> dict[str, Any]:
    """Headline numbers for the period, and the same for the previous period (``previous``)."""

    def one(f: Filters) -> dict[str, Any]:
        with_facts, params = facts(con, f)
        cursor = con.execute(with_facts + _KPI_SQL, params)
        names = [d[0] for d in cursor.description]
        values = dict(zip(names, cursor.fetchone(), strict=True))
        for name in ("calls", "joule_calls", "energy_calls", "refused_402", "errors"):
            values[name] = int(values[name])
        values["auto_share"] = float(values["auto_share"]) if values["auto_share"] is not None else 0.0
        return values

    current = one(filters)
    previous_filters = filters.previous_period()
    current["previous"] = one(previous_filters) if previous_filters is not None else None
    return current


BUCKET_SECONDS = {
    "1 minute": 60,
    "5 minutes": 300,
    "1 hour": 3600,
    "1 day": 86400,
    "7 days": 7 * 86400,
}
"""The time buckets a chart can use, and their length."""


def bucket_for(span: timedelta) -> str:
    """The bucket that gives a readable number of bars over ``span`` (about 12 to 100)."""
    if span <= timedelta(hours=2):
        return "1 minute"
    if span <= timedelta(hours=8):
        return "5 minutes"
    if span <= timedelta(days=4):
        return "1 hour"
    if span <= timedelta(days=90):
        return "1 day"
    return "7 days"


def _whole_hour_zone(tz: str, moment: datetime | None) -> bool:
    """Whether ``tz`` is a whole number of hours off UTC at ``moment`` (its days then start on UTC hours)."""
    from zoneinfo import ZoneInfo

    offset = (moment or datetime.now(timezone.utc)).astimezone(ZoneInfo(tz)).utcoffset() or timedelta(0)
    return offset % timedelta(hours=1) == timedelta(0)


def energy_over_time(con: Any, filters: Filters, by: str, bucket: str, tz: str = "UTC") -> Any:
    """Joules per time bucket, split by a dimension of :data:`DIMENSIONS`.

    Buckets start at midnight (days), on Mondays (weeks) and on the hour in the zone ``tz``; hourly and
    longer buckets read the hourly rollup when the zone's days begin on a UTC hour (not in +05:30).
    ``bucket`` is the bucket's start as a timestamp without zone, in ``tz``.
    """
    tagged = tag_column(by)
    group = tagged or _label(DIMENSIONS[by])
    seconds = BUCKET_SECONDS[bucket]
    hourly = seconds >= 3600 and _whole_hour_zone(tz, filters.start)
    with_facts, params = facts(con, filters, hourly=hourly, tags=tagged is not None)
    # weeks: time_bucket's default origin (2000-01-03) is a Monday
    return _df(
        con,
        f"""
        {with_facts}
        SELECT timezone(?, time_bucket(INTERVAL '{bucket}', t, ?)) AS bucket,
               {group} AS "group",
               sum(energy_j) AS energy_j, sum(carbon_mg) AS carbon_mg, sum(calls) AS calls
        FROM facts WHERE energy_j > 0
        GROUP BY ALL ORDER BY bucket, "group"
    """,
        [*params, tz, tz],
    )


UNKNOWN = {
    "workload": "(no workload)",
    "routed_to": "(not served)",
    "requested_model": "(unknown)",
    "region": "(unknown region)",
    "tier": "(unknown tier)",
    "service": "(unknown service)",
    "provider": "(unknown provider)",
}
"""What a person reads where the ledger holds NULL: a call refused before routing was served by no model."""


def _label(column: str) -> str:
    return f"coalesce({column}, '{UNKNOWN[column]}')"


def breakdown(con: Any, filters: Filters, by: str) -> Any:
    """Energy, carbon, calls, tokens and errors per value of one dimension (every value, with or without energy)."""
    column = DIMENSIONS[by]
    with_facts, params = facts(con, filters)
    return _df(
        con,
        f"""
        {with_facts}
        SELECT {_label(column)} AS "group", sum(energy_j) AS energy_j, sum(carbon_mg) AS carbon_mg,
               sum(calls) AS calls, sum(output_tokens) AS output_tokens,
               coalesce(sum(calls) FILTER (WHERE error_type IS NOT NULL), 0) AS errors
        FROM facts
        GROUP BY ALL ORDER BY energy_j DESC NULLS LAST
    """,
        params,
    )


def chargeback(con: Any, filters: Filters, by: str) -> Any:
    """Calls, tokens, energy, carbon and share of the energy per value of a dimension or a tag, largest first.

    The figures of ``joule-otel report --by``, for the dashboard's filters.
    """
    tagged = tag_column(by)
    with_facts, params = facts(con, filters, tags=tagged is not None)
    return _df(
        con,
        f"""
        {with_facts}
        SELECT {tagged or _label(DIMENSIONS[by])} AS "group", sum(calls) AS calls,
               sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,
               sum(energy_j) AS energy_j, sum(carbon_mg) AS carbon_mg,
               sum(energy_j) / nullif(sum(sum(energy_j)) OVER (), 0) AS share
        FROM facts
        GROUP BY ALL ORDER BY energy_j DESC NULLS LAST, calls DESC
    """,
        params,
    )


def tag_options(con: Any) -> dict[str, list[str]]:
    """Each tag key in the ledger and its values, the most used first (at most :data:`MAX_TAG_VALUES` a key).

    A ledger counts its compacted rows' tags as it compacts (``tag_values``): only the spooled rows are read here.
    """
    from joule_otel.ledger._schema import tag_values_sql

    if "tags" not in {r[0] for r in con.execute("DESCRIBE inference_calls").fetchall()}:
        return {}
    counted = bool(con.execute("SELECT count(*) FROM duckdb_views() WHERE view_name = 'tag_values'").fetchone()[0])
    counts = (
        f"SELECT key, value, calls FROM tag_values UNION ALL {tag_values_sql('pending_calls')}"
        if counted
        else tag_values_sql("inference_calls")
    )
    rows = con.execute(
        f"""
        SELECT key, list(value ORDER BY n DESC, value)[1:{MAX_TAG_VALUES}]
        FROM (SELECT key, value, sum(calls) AS n FROM ({counts}) GROUP BY ALL)
        GROUP BY key ORDER BY key
    """
    ).fetchall()
    return {key: list(values) for key, values in rows}


def workload_model(con: Any, filters: Filters) -> Any:
    """Energy per workload and routed model (the treemap)."""
    with_facts, params = facts(con, filters)
    return _df(
        con,
        f"""
        {with_facts}
        SELECT {_label("workload")} AS workload, {_label("routed_to")} AS model,
               sum(energy_j) AS energy_j, sum(calls) AS calls
        FROM facts
        GROUP BY ALL HAVING sum(energy_j) > 0 ORDER BY energy_j DESC
    """,
        params,
    )


def router_flows(con: Any, filters: Filters) -> Any:
    """Requested model → routed model, weighted by joules."""
    with_facts, params = facts(con, filters)
    return _df(
        con,
        f"""
        {with_facts}
        SELECT {_label("requested_model")} AS requested, {_label("routed_to")} AS routed,
               sum(energy_j) AS energy_j, sum(calls) AS calls
        FROM facts
        GROUP BY ALL HAVING sum(energy_j) > 0 ORDER BY energy_j DESC
    """,
        params,
    )


SAMPLE_TARGET_ROWS = 50_000
"""Row-level figures (latency percentiles, the scatter plot) read about this many calls: all of them when
the filtered calls are fewer, else a system sample of the table (whole vectors, so it skips reading)."""


def _sampled_calls(con: Any, filters: Filters) -> tuple[str, list[Any], bool]:
    """A FROM clause over the filtered calls, sampled when they are many; and whether it is sampled."""
    with_facts, params = facts(con, filters)
    total = con.execute(f"{with_facts} SELECT coalesce(sum(calls), 0) FROM facts", params).fetchone()[0]
    clause, where_params = where(filters)
    if total <= SAMPLE_TARGET_ROWS or not _has_parts(con):
        return f"FROM inference_calls {clause}", where_params, False
    percent = max(0.01, min(100.0, 100.0 * SAMPLE_TARGET_ROWS / total))
    return (
        f"FROM (SELECT * FROM compacted_calls TABLESAMPLE {percent:.4f}% (system, 7) "
        f"UNION ALL SELECT * FROM pending_calls) AS sampled {clause}",
        where_params,
        True,
    )


KIND_SQL = "CASE WHEN operation = 'embeddings' THEN 'embeddings' ELSE 'generation' END"
"""Efficiency compares like with like: generation per output token, embeddings per input token."""


def model_efficiency(con: Any, filters: Filters) -> Any:
    """Per routed model and kind of call: J per token, J per call, median latency and time to first chunk.

    Generation (chat, completions, responses) is measured per output token over the calls that produced
    some; embeddings, which produce none, per input token. Energy figures are exact; latency percentiles
    come from :func:`_sampled_calls` (exact up to :data:`SAMPLE_TARGET_ROWS` calls).
    """
    with_facts, params = facts(con, filters)
    energy = _df(
        con,
        f"""
        {with_facts}
        SELECT routed_to AS model, kind,
               CASE WHEN kind = 'generation' THEN sum(out_energy_j) / nullif(sum(out_tokens_e), 0) END
                 AS j_per_output_token,
               CASE WHEN kind = 'embeddings'
                    THEN sum(energy_j) / nullif(sum(input_tokens) FILTER (WHERE energy_j IS NOT NULL), 0)
               END AS j_per_input_token,
               sum(energy_j) / nullif(sum(energy_calls), 0) AS j_per_call, sum(calls) AS calls
        FROM (SELECT *, {KIND_SQL} AS kind FROM facts) WHERE routed_to IS NOT NULL
        GROUP BY routed_to, kind
    """,
        params,
    )
    source, sample_params, _ = _sampled_calls(con, filters)
    latency = _df(
        con,
        f"""
        SELECT routed_to AS model, {KIND_SQL} AS kind, median(duration_ms) AS p50_duration_ms,
               quantile_cont(duration_ms, 0.95) AS p95_duration_ms, median(ttft_ms) AS p50_ttft_ms
        {source} {"AND" if "WHERE" in source else "WHERE"} routed_to IS NOT NULL
        GROUP BY ALL
    """,
        sample_params,
    )
    merged = energy.merge(latency, on=["model", "kind"], how="left")
    return merged.sort_values(
        ["kind", "j_per_output_token", "j_per_input_token"], ascending=[False, False, False]
    ).reset_index(drop=True)


def carbon_by_region(con: Any, filters: Filters) -> Any:
    """Per region: energy, carbon and the effective intensity (mg per J, and g per kWh)."""
    with_facts, params = facts(con, filters)
    return _df(
        con,
        f"""
        {with_facts}
        SELECT {_label("region")} AS region, sum(energy_j) AS energy_j, sum(carbon_mg) AS carbon_mg,
               sum(carbon_mg) / nullif(sum(carbon_energy_j), 0) AS mg_per_j,
               sum(carbon_mg) / nullif(sum(carbon_energy_j), 0) * 3600 AS g_per_kwh,
               sum(calls) AS calls
        FROM facts
        GROUP BY ALL HAVING sum(energy_j) > 0 ORDER BY carbon_mg DESC
    """,
        params,
    )


def carbon_savings(con: Any, filters: Filters) -> Any:
    """Per workload: carbon now, and if served at the cleanest region seen in the data."""
    with_facts, params = facts(con, filters)
    return _df(
        con,
        f"""
        {with_facts},
        clean AS (
          SELECT region, sum(carbon_mg) / nullif(sum(carbon_energy_j), 0) AS mg_per_j FROM facts
          WHERE region IS NOT NULL AND carbon_mg IS NOT NULL GROUP BY region
          HAVING sum(carbon_energy_j) > 0 ORDER BY mg_per_j LIMIT 1)
        SELECT facts.workload, sum(facts.carbon_mg) AS carbon_mg,
               sum(facts.energy_j) * any_value(clean.mg_per_j) AS if_cleanest_mg,
               any_value(clean.region) AS cleanest_region
        FROM facts CROSS JOIN clean
        GROUP BY facts.workload HAVING sum(facts.carbon_mg) > 0
        ORDER BY sum(facts.carbon_mg) - sum(facts.energy_j) * any_value(clean.mg_per_j) DESC
    """,
        params,
    )


def energy_histogram(con: Any, filters: Filters) -> Any:
    """Calls per log-spaced energy bin (¼ decade), computed in DuckDB."""
    with_facts, params = facts(con, filters)
    return _df(
        con,
        f"""
        {with_facts}
        SELECT power(10, energy_bin / 4) AS bin_start_j, power(10, (energy_bin + 1) / 4) AS bin_end_j,
               sum(calls) AS calls
        FROM facts WHERE energy_bin IS NOT NULL
        GROUP BY ALL ORDER BY bin_start_j
    """,
        params,
    )


def latency_sample(con: Any, filters: Filters, rows: int = 3000) -> Any:
    """A uniform sample of calls (duration, time to first chunk, energy, model) for scatter plots."""
    source, params, _ = _sampled_calls(con, filters)
    return _df(
        con,
        f"""
        SELECT * FROM (
          SELECT duration_ms, ttft_ms, energy_j, {_label("routed_to")} AS model, workload, stream
          {source} {"AND" if "WHERE" in source else "WHERE"} energy_j IS NOT NULL)
        USING SAMPLE reservoir({int(rows)} ROWS) REPEATABLE (7)
    """,
        params,
    )


def _month_to_date(filters: Filters, workloads: list[str], as_of: datetime) -> Filters:
    """The filters narrowed to these workloads, from the start of ``as_of``'s UTC month to ``as_of``."""
    month_start = _utc(as_of).replace(day=1, hour=0, minute=0, second=0, microsecond=0)  # type: ignore[union-attr]
    return replace(filters, start=month_start, end=as_of + timedelta(microseconds=1), workloads=tuple(workloads))


def _budget_list(budgets: Any) -> list[Budget]:
    """Budgets as a list, from :class:`Budget` s, a ``{workload: joules}`` mapping, or workload names (the burn)."""
    if isinstance(budgets, dict):
        return [Budget(w, float(j)) for w, j in budgets.items()]
    return [b if isinstance(b, Budget) else Budget(b, 1.0) if isinstance(b, str) else Budget(*b) for b in budgets]


def budget_status(con: Any, filters: Filters, budgets: Any, as_of: datetime) -> Any:
    """Month to date per budget: spend, share used, and what the service enforced (402s, since when).

    ``budgets``: :class:`joule_otel._budgets.Budget` s (a budget of one service counts that service's calls
    only) or ``{workload: joules}``. One row per budget, ``workload`` holding its label.
    """
    items = _budget_list(budgets)
    if not items:
        return None
    with_facts, params = facts(con, _month_to_date(filters, sorted({b.workload for b in items}), as_of))
    return _df(
        con,
        f"""
        {with_facts},
        b AS (SELECT unnest(?::VARCHAR[]) AS label, unnest(?::VARCHAR[]) AS workload,
                     unnest(?::VARCHAR[]) AS service, unnest(?::DOUBLE[]) AS budget_j),
        spend AS (
          SELECT workload, service, coalesce(sum(energy_j), 0) AS spent_j,
                 coalesce(sum(calls) FILTER (WHERE status_code = 402), 0) AS refused,
                 min(first_at) FILTER (WHERE status_code = 402) AS first_402,
                 max(last_at) FILTER (WHERE status_code = 402) AS last_402
          FROM facts GROUP BY workload, service)
        SELECT b.label AS workload, any_value(b.budget_j) AS budget_j, coalesce(sum(spend.spent_j), 0) AS spent_j,
               coalesce(sum(spend.spent_j), 0) / any_value(b.budget_j) AS used_share,
               coalesce(sum(spend.refused), 0) AS refused_402, min(spend.first_402) AS first_402,
               max(spend.last_402) AS last_402
        FROM b LEFT JOIN spend ON spend.workload = b.workload AND (b.service IS NULL OR spend.service = b.service)
        GROUP BY b.label ORDER BY used_share DESC, b.label
    """,
        [
            *params,
            [x.label for x in items],
            [x.workload for x in items],
            [x.service for x in items],
            [x.joules for x in items],
        ],
    )


def budget_burn(con: Any, filters: Filters, budgets: Any, as_of: datetime) -> Any:
    """Cumulative joules per UTC day this month, per budget (the burn-down); ``workload`` holds its label.

    ``budgets`` as in :func:`budget_status`; a list of workload names also does.
    """
    items = _budget_list(budgets or [])
    if not items:
        return None
    with_facts, params = facts(con, _month_to_date(filters, sorted({b.workload for b in items}), as_of))
    return _df(
        con,
        f"""
        {with_facts},
        b AS (SELECT unnest(?::VARCHAR[]) AS label, unnest(?::VARCHAR[]) AS workload,
                     unnest(?::VARCHAR[]) AS service),
        daily AS (
          SELECT b.label AS workload, to_timestamp(epoch_us(facts.t) // 86400000000 * 86400) AS day,
                 coalesce(sum(facts.energy_j), 0) AS energy_j
          FROM facts JOIN b ON facts.workload = b.workload AND (b.service IS NULL OR facts.service = b.service)
          GROUP BY ALL)
        SELECT workload, day, sum(energy_j) OVER (PARTITION BY workload ORDER BY day) AS cumulative_j
        FROM daily ORDER BY workload, day
    """,
        [*params, [x.label for x in items], [x.workload for x in items], [x.service for x in items]],
    )


JOULE_PROVIDER = "joule_cloud"


def migration(con: Any, filters: Filters, bucket: str, tz: str = "UTC") -> Any:
    """Per time bucket, workload and provider: calls, tokens and measured energy (Joule's only)."""
    seconds = BUCKET_SECONDS[bucket]
    with_facts, params = facts(con, filters, hourly=seconds >= 3600 and _whole_hour_zone(tz, filters.start))
    return _df(
        con,
        f"""
        {with_facts}
        SELECT timezone(?, time_bucket(INTERVAL '{bucket}', t, ?)) AS bucket,
               {_label("workload")} AS workload, {_label("provider")} AS provider,
               sum(calls) AS calls, coalesce(sum(input_tokens), 0) + coalesce(sum(output_tokens), 0) AS tokens,
               sum(energy_j) FILTER (WHERE provider = '{JOULE_PROVIDER}') AS measured_j,
               sum(energy_calls) FILTER (WHERE provider = '{JOULE_PROVIDER}') AS measured_calls
        FROM facts
        GROUP BY ALL ORDER BY bucket, workload, provider
    """,
        [*params, tz, tz],
    )


def other_provider_calls(con: Any, filters: Filters) -> Any:
    """Calls not served by Joule, per provider, model and workload: what an estimate of their energy needs.

    Read from single calls (the mean latency is not in the rollup); these are the minority a migration
    leaves behind, and only read when the facts show some.
    """
    clause, params = where(filters)
    other = "provider IS DISTINCT FROM ?"
    clause = f"{clause} AND {other}" if clause else f"WHERE {other}"
    return _df(
        con,
        f"""
        SELECT {_label("provider")} AS provider, coalesce(routed_to, requested_model) AS model,
               {_label("workload")} AS workload, count(*) AS calls,
               coalesce(sum(output_tokens), 0) AS output_tokens,
               coalesce(sum(input_tokens), 0) + coalesce(sum(output_tokens), 0) AS tokens,
               coalesce(avg(output_tokens), 0) AS mean_output_tokens,
               coalesce(avg(duration_ms), 0) / 1000.0 AS mean_latency_s
        FROM inference_calls {clause} AND error_type IS NULL
        GROUP BY ALL ORDER BY calls DESC
    """,
        [*params, JOULE_PROVIDER],
    )


def _number(value: Any) -> float | None:
    """A float, or None for NULL/NaN (what pandas makes of a SQL NULL)."""
    if value is None:
        return None
    number = float(value)
    return None if math.isnan(number) else number


@dataclass(frozen=True)
class WhatIf:
    """A workload's calls as they ran, and the same calls on another model, tier or region."""

    workload: str
    rows: Any
    """Per kind of call: tokens, J per token now and then, energy now and then, carbon now and then."""
    energy_now_j: float
    energy_then_j: float
    carbon_now_mg: float
    carbon_then_mg: float
    intensity_then_mg_per_j: float | None
    missing: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...]
    """What could not be measured, left as it ran: (kind of call, models, tiers) with no calls in the period, or
    ("carbon", (region,), ()) for a region without carbon figures."""


def what_if(
    con: Any,
    filters: Filters,
    workload: str,
    *,
    model: str | None = None,
    tier: str | None = None,
    region: str | None = None,
) -> WhatIf:
    """The workload's calls in the period, re-priced at rates this ledger measured.

    Energy: each kind's tokens (generation: output tokens, embeddings: input tokens) times the J per
    token measured over every call of that kind on ``model`` and ``tier`` in the period (the
    workload's own rate where one is not given or has no calls). Carbon: that energy times ``region``'s
    measured intensity (mg per J), else the workload's own.
    """
    base = replace(filters, workloads=())
    with_facts, params = facts(con, base)
    rate = """
        CASE WHEN kind = 'generation' THEN sum(out_energy_j) / nullif(sum(out_tokens_e), 0)
             ELSE sum(energy_j) / nullif(sum(input_tokens) FILTER (WHERE energy_j IS NOT NULL), 0) END"""
    tokens = """
        CASE WHEN kind = 'generation' THEN sum(out_tokens_e)
             ELSE sum(input_tokens) FILTER (WHERE energy_j IS NOT NULL) END"""
    kinded = f"(SELECT *, {KIND_SQL} AS kind FROM facts)"
    own = _df(
        con,
        f"""
        {with_facts}
        SELECT kind, {tokens} AS tokens, {rate} AS j_per_token_now,
               sum(energy_j) AS energy_now_j, sum(carbon_mg) AS carbon_now_mg,
               sum(carbon_mg) / nullif(sum(carbon_energy_j), 0) AS mg_per_j_now,
               list(DISTINCT routed_to) FILTER (WHERE routed_to IS NOT NULL) AS models,
               list(DISTINCT tier) FILTER (WHERE tier IS NOT NULL) AS tiers
        FROM {kinded} WHERE workload = ? AND energy_j > 0
        GROUP BY kind ORDER BY kind DESC
    """,
        [*params, workload],
    )
    missing: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = []
    then_rates: list[float | None] = []
    for item in own.itertuples():
        if model is None and tier is None:  # only the region moves: the calls cost what they cost
            then_rates.append(item.j_per_token_now)
            continue
        models = [model] if model else list(item.models)
        tiers = [tier] if tier else list(item.tiers)
        measured = con.execute(
            f"""{with_facts} SELECT {rate} FROM {kinded}
                WHERE kind = ? AND list_contains(?::VARCHAR[], routed_to) AND list_contains(?::VARCHAR[], tier)
                GROUP BY kind""",
            [*params, item.kind, models, tiers],
        ).fetchone()
        found = measured[0] if measured else None
        if found is None:
            missing.append((item.kind, tuple(models), tuple(tiers)))
        then_rates.append(found if found is not None else item.j_per_token_now)
    rows = own.drop(columns=["models", "tiers"]).assign(j_per_token_then=then_rates)
    rows["energy_then_j"] = [
        t * r if _number(t) is not None and _number(r) is not None and (model or tier) else e
        for t, r, e in zip(rows["tokens"], rows["j_per_token_then"], rows["energy_now_j"], strict=True)
    ]
    intensity = None
    if region:
        found_region = con.execute(
            f"{with_facts} SELECT sum(carbon_mg) / nullif(sum(carbon_energy_j), 0) FROM facts WHERE region = ?",
            [*params, region],
        ).fetchone()
        intensity = found_region[0] if found_region else None
        if intensity is None:
            missing.append(("carbon", (region,), ()))
    now_intensity = rows["mg_per_j_now"]
    rows["carbon_then_mg"] = [
        e * (intensity if intensity is not None else (_number(i) or 0.0))
        for e, i in zip(rows["energy_then_j"], now_intensity, strict=True)
    ]
    return WhatIf(
        workload=workload,
        rows=rows,
        energy_now_j=float(rows["energy_now_j"].sum()),
        energy_then_j=float(rows["energy_then_j"].sum()),
        carbon_now_mg=float(rows["carbon_now_mg"].fillna(0).sum()),
        carbon_then_mg=float(rows["carbon_then_mg"].sum()),
        intensity_then_mg_per_j=intensity,
        missing=tuple(missing),
    )


MIN_RATE_CALLS = 30
"""The fewest calls a measured rate must rest on before a saving is recommended from it.

Per-call energy on one model varies with the prompt; with 30 calls the mean is within about a fifth of a per-call
spread of the true mean (1/sqrt(30)), and the recommendations below differ by far more than that between models or
tiers. Below it the page says how many calls there are and holds the recommendation back."""


@dataclass(frozen=True)
class Move:
    """One change to a workload the ledger can price: a pinned model, a tier or a region."""

    workload: str
    change: str
    """``model``, ``tier`` or ``region``."""
    to: str
    energy_now_j: float
    energy_then_j: float
    carbon_now_mg: float
    carbon_then_mg: float
    basis_calls: int
    """The fewest calls any rate this move rests on was measured over (the calls of each kind on the model and
    tier, or in the region)."""


def moves(con: Any, filters: Filters) -> list[Move]:
    """Every model, tier and region each workload could move to, priced as :func:`what_if` prices it.

    One scan of the facts (per workload, kind, model, tier and region), then arithmetic: a page shows the best
    moves of every workload without a query per choice. The figures equal :func:`what_if`'s for the same choice.
    """
    with_facts, params = facts(con, replace(filters, workloads=()))
    cells = con.execute(
        f"""
        {with_facts}
        SELECT workload, kind, routed_to, tier, region,
               coalesce(sum(calls), 0),
               -- a rate's parts: generation per output token, embeddings per input token
               coalesce(CASE WHEN kind = 'generation' THEN sum(out_tokens_e)
                             ELSE sum(input_tokens) FILTER (WHERE energy_j IS NOT NULL) END, 0),
               coalesce(CASE WHEN kind = 'generation' THEN sum(out_energy_j) ELSE sum(energy_j) END, 0),
               coalesce(sum(carbon_mg), 0), coalesce(sum(carbon_energy_j), 0),
               -- what the workload spent (the calls that had energy), as what_if() reads it
               coalesce(CASE WHEN kind = 'generation' THEN sum(out_tokens_e) FILTER (WHERE energy_j > 0)
                             ELSE sum(input_tokens) FILTER (WHERE energy_j > 0) END, 0),
               coalesce(sum(energy_j) FILTER (WHERE energy_j > 0), 0),
               coalesce(sum(carbon_mg) FILTER (WHERE energy_j > 0), 0),
               coalesce(sum(carbon_energy_j) FILTER (WHERE energy_j > 0), 0)
        FROM (SELECT *, {KIND_SQL} AS kind FROM facts) GROUP BY workload, kind, routed_to, tier, region
    """,
        params,
    ).fetchall()
    # per kind, model and tier: the tokens and energy a rate is made of, and the calls it rests on
    pool: dict[tuple[str, str, str], list[float]] = {}
    # per region: carbon and the energy it was measured over, and the calls
    regions: dict[str, list[float]] = {}
    # per workload and kind: tokens, energy, carbon, carbon's energy, and the models and tiers it ran on
    spent: dict[str, dict[str, list[Any]]] = {}
    for (
        workload,
        kind,
        model,
        tier,
        region,
        calls,
        tokens,
        energy,
        carbon,
        carbon_j,
        own_tokens,
        own_j,
        own_mg,
        own_cj,
    ) in cells:
        if model is not None and tier is not None:
            found = pool.setdefault((kind, model, tier), [0.0, 0.0, 0])
            found[0] += tokens
            found[1] += energy
            found[2] += calls
        if region is not None:
            place = regions.setdefault(region, [0.0, 0.0, 0])
            place[0] += carbon
            place[1] += carbon_j
            place[2] += calls
        if workload is not None and own_j > 0:
            mine = spent.setdefault(workload, {}).setdefault(kind, [0.0, 0.0, 0.0, 0.0, set(), set()])
            mine[0] += own_tokens
            mine[1] += own_j
            mine[2] += own_mg
            mine[3] += own_cj
            if model is not None:
                mine[4].add(model)
            if tier is not None:
                mine[5].add(tier)
    models = sorted({model for _, model, _ in pool})
    tiers = sorted({tier for _, _, tier in pool})
    chosen = set(filters.workloads)
    found_moves: list[Move] = []
    for workload in sorted(spent):
        if chosen and workload not in chosen:
            continue
        kinds = spent[workload]
        energy_now = sum(k[1] for k in kinds.values())
        carbon_now = sum(k[2] for k in kinds.values())

        def priced(
            to_models: set[str] | None, to_tiers: set[str] | None, kinds: dict[str, list[Any]] = kinds
        ) -> tuple[float, float, int] | None:
            energy = carbon = 0.0
            basis: int | None = None
            for kind, (tokens, _, mg, carbon_j, own_models, own_tiers) in kinds.items():
                tokens_in = energy_in = 0.0
                calls = 0
                for name in to_models or own_models:
                    for level in to_tiers or own_tiers:
                        t, e, c = pool.get((kind, name, level), (0.0, 0.0, 0))
                        tokens_in, energy_in, calls = tokens_in + t, energy_in + e, calls + int(c)
                if not tokens_in:
                    return None  # what_if would leave this kind as it ran: not a move to recommend
                basis = calls if basis is None else min(basis, calls)
                then = tokens * energy_in / tokens_in
                energy += then
                carbon += then * (mg / carbon_j if carbon_j else 0.0)
            return energy, carbon, basis or 0

        for model in models:
            then = priced({model}, None)
            if then is not None:
                found_moves.append(Move(workload, "model", model, energy_now, then[0], carbon_now, then[1], then[2]))
        for tier in tiers:
            then = priced(None, {tier})
            if then is not None:
                found_moves.append(Move(workload, "tier", tier, energy_now, then[0], carbon_now, then[1], then[2]))
        for region, (carbon, carbon_j, calls) in sorted(regions.items()):
            if carbon_j:
                carbon_then = energy_now * carbon / carbon_j
                found_moves.append(
                    Move(workload, "region", region, energy_now, energy_now, carbon_now, carbon_then, int(calls))
                )
    return found_moves


MIN_SAVING_SHARE = 0.01
"""A move is recommended only when it saves at least this share of what the workload spent (1 %): less is noise
in the rates, not a change worth making."""


def _gain(move: Move) -> float:
    """What a move saves in its own terms (carbon for a region, energy for a model or tier); 0 below 1 %."""
    if move.change == "region":
        now, then = move.carbon_now_mg, move.carbon_then_mg
    else:
        now, then = move.energy_now_j, move.energy_then_j
    return now - then if now > 0 and (now - then) / now >= MIN_SAVING_SHARE else 0.0


def recommendations(found: list[Move], min_calls: int = MIN_RATE_CALLS) -> tuple[list[Move], list[Move]]:
    """The best saving move of each kind (model, tier, region) per workload, ranked by energy saved then carbon.

    Apart: better moves held back because a rate rests on fewer than ``min_calls`` calls.
    """

    def best(moves_: list[Move]) -> dict[tuple[str, str], Move]:
        chosen: dict[tuple[str, str], Move] = {}
        for move in moves_:
            key = (move.workload, move.change)
            if _gain(move) > 0 and (key not in chosen or _gain(move) > _gain(chosen[key])):
                chosen[key] = move
        return chosen

    sure = best([m for m in found if m.basis_calls >= min_calls])
    unsure = best([m for m in found if m.basis_calls < min_calls])
    held = [m for key, m in unsure.items() if key not in sure or _gain(m) > _gain(sure[key])]

    def rank(move: Move) -> tuple[float, float]:
        return -(move.energy_now_j - move.energy_then_j), -(move.carbon_now_mg - move.carbon_then_mg)

    return sorted(sure.values(), key=rank), sorted(held, key=rank)


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
    """Rows, newest first, whose receipt id or workload contains ``search`` (case-insensitive).

    The file and the spooled rows are each cut to the newest ``limit`` before they meet: a top-N straight
    on the table reads only the newest row groups, which a top-N over their union cannot.
    """
    clause, params = where(filters)
    if search.strip():
        clause = (clause + " AND " if clause else "WHERE ") + (
            "(contains(lower(coalesce(receipt_id, '')), lower(?)) OR contains(lower(coalesce(workload, '')), lower(?)))"
        )
        params += [search.strip(), search.strip()]
    columns = ", ".join(RECEIPT_COLUMNS)
    cut = " LIMIT ?" if limit is not None else ""
    cut_params = [int(limit)] if limit is not None else []
    part_params = [*params, *cut_params]
    sql = (
        f"SELECT * FROM ("
        f"(SELECT {columns} FROM compacted_calls {clause} ORDER BY started_at DESC{cut}) UNION ALL "
        f"(SELECT {columns} FROM pending_calls {clause} ORDER BY started_at DESC{cut})"
        f") ORDER BY started_at DESC{cut}"
    )
    if not _has_parts(con):
        sql = f"SELECT {columns} FROM inference_calls {clause} ORDER BY started_at DESC{cut}"
        return _df(con, sql, part_params)
    return _df(con, sql, [*part_params, *part_params, *cut_params])
