"""The joule-otel energy dashboard (Streamlit).

Order: page config → sidebar (source, time, filters; mirrored in the URL) → cached queries → KPI row
→ tabs of charts and tables. The ledger is opened for each batch of queries and released at once,
never held across reruns, so apps keep writing while it is open. Every value from the ledger reaches
the page as text: through :func:`units.plain` in markdown, :mod:`charts` (escaped) in Plotly, and
dataframes, which never render markup.
"""

from __future__ import annotations

import functools
import io
import os
from datetime import date, datetime, time, timedelta, timezone
from typing import Any

import pandas as pd
import streamlit as st

from joule_otel import _units as units
from joule_otel._budgets import Budget, load_budgets
from joule_otel._config import JOULE_OTEL_TRACE_URL
from joule_otel.dashboard import _charts as charts
from joule_otel.dashboard import _estimates as estimates
from joule_otel.dashboard import _queries as queries
from joule_otel.dashboard import _timerange as timerange
from joule_otel.dashboard._sources import SAMPLE_BUDGETS_PATH, Source, resolve_source, sample_shift, source_for
from joule_otel.ledger._spool import Spool

st.set_page_config(page_title="joule-otel · energy", page_icon="⚡", layout="wide")

# column names a person reads, in tables and exports alike (comments, never bare strings: Streamlit's "magic"
# renders a string statement on the page)
READABLE = {
    "group": "value",
    "bucket": "time",
    "energy_j": "energy (J)",
    "carbon_mg": "carbon (mg CO2e)",
    "calls": "calls",
    "errors": "errors",
    "output_tokens": "output tokens",
    "j_per_output_token": "J per output token",
    "j_per_input_token": "J per input token",
    "j_per_call": "J per call",
    "p50_duration_ms": "median duration (ms)",
    "p95_duration_ms": "p95 duration (ms)",
    "p50_ttft_ms": "median time to first chunk (ms)",
    "mg_per_j": "mg CO2e per J",
    "g_per_kwh": "g CO2e per kWh",
    "if_cleanest_mg": "carbon at the cleanest region (mg CO2e)",
    "cleanest_region": "cleanest region",
    "bin_start_j": "bin from (J)",
    "bin_end_j": "bin to (J)",
    "cumulative_j": "energy this month so far (J)",
    "duration_ms": "duration (ms)",
    "ttft_ms": "time to first chunk (ms)",
    "measured_j": "measured energy (J)",
    "tokens": "tokens",
}

# the query parameters of a shared link
URL_LISTS = ("service", "workload", "model", "region", "tier", "provider")
URL_VALUES = ("range", "from", "to", "tz", "status", "split")


def _restore_from_url() -> None:
    """On a page's first run, the filters of a shared link (query parameters) become the widgets' values."""
    if st.session_state.get("_restored"):
        return
    st.session_state["_restored"] = True
    params = st.query_params
    for key in URL_LISTS:
        values = params.get_all(key)
        if values:
            st.session_state[f"f_{key}"] = values
    allowed: dict[str, Any] = {  # a link is typed by people: a value a widget cannot show is dropped, not an error
        "range": lambda v: v in timerange.PRESETS,
        "status": lambda v: v in queries.STATUSES,
        "split": lambda v: v in list(queries.DIMENSIONS)[:4],
        "tz": lambda v: timerange.zone(v).key == v,
    }
    for key in URL_VALUES:
        if key in params and allowed.get(key, lambda v: True)(params[key]):
            st.session_state[f"f_{key}"] = params[key]
    for key, day_key, time_key in (("from", "start_day", "start_time"), ("to", "end_day", "end_time")):
        if key in params:
            try:
                moment = datetime.fromisoformat(params[key])
            except ValueError:
                continue
            st.session_state[day_key], st.session_state[time_key] = moment.date(), moment.time().replace(second=0)


def _save_to_url(values: dict[str, Any]) -> None:
    """The page's filters as query parameters: the address bar is a link that restores this view."""
    wanted = {k: v for k, v in values.items() if v not in (None, "", [], ())}
    if dict(st.query_params.to_dict()) != {k: (v[-1] if isinstance(v, list) else v) for k, v in wanted.items()}:
        st.query_params.from_dict(wanted)


_restore_from_url()

# -- sidebar: source ----------------------------------------------------------------------------
st.sidebar.title("⚡ joule-otel")
default_source = resolve_source()
custom_path = st.sidebar.text_input(
    "Ledger, Parquet or CSV path", value="", key="source_path", placeholder=str(default_source.path)
)
source: Source = source_for(custom_path, "chosen in the sidebar") if custom_path.strip() else default_source
if (
    source.kind != "sample"
    and not source.path.exists()
    and not (source.kind == "ledger" and Spool(source.path).segments())
):
    st.sidebar.error(f"{units.plain(source.path)} does not exist; showing {units.plain(default_source.label)}")
    source = default_source
st.sidebar.caption(f"**{source.kind_label}**: {units.plain(source.path)}  \n{source.why}")
if source.kind == "sample":
    shift_weeks = sample_shift().days // 7
    st.sidebar.caption(
        f"The sample's calls are shown {shift_weeks} week{'s' if shift_weeks != 1 else ''} later than they were "
        "generated, so that they end in the past week (weekdays and hours of day kept)."
        if shift_weeks
        else "The sample's calls are shown at the dates they were generated."
    )

live = st.sidebar.toggle("Live refresh", value=False, key="live")
interval_s = st.sidebar.select_slider(
    "Refresh every (s)", options=[2, 5, 10, 30, 60], value=5, key="interval", disabled=not live
)


@st.cache_data(ttl=5, show_spinner=False)
def load_options(signature: tuple[Any, ...], _source: Source) -> dict[str, Any]:
    """Filter choices and the data's time span (cached per data signature)."""
    with _source.connect() as con:
        return queries.options(con)


@st.cache_data(ttl=5, show_spinner=False)
def load_page(
    signature: tuple[Any, ...],
    _source: Source,
    filters: queries.Filters,
    split_by: str,
    bucket: str,
    tz_name: str,
    budgets: tuple[Budget, ...],
    search: str,
    as_of: datetime,
) -> dict[str, Any]:
    """Every query of the page, in one short visit to the ledger."""
    with _source.connect() as con:
        page: dict[str, Any] = {
            "kpis": queries.kpis(con, filters),
            "over_time": queries.energy_over_time(con, filters, split_by, bucket, tz_name),
            "by": {dim: queries.breakdown(con, filters, dim) for dim in ("workload", "model", "region", "tier")},
            "treemap": queries.workload_model(con, filters),
            "flows": queries.router_flows(con, filters),
            "efficiency": queries.model_efficiency(con, filters),
            "regions": queries.carbon_by_region(con, filters),
            "savings": queries.carbon_savings(con, filters),
            "histogram": queries.energy_histogram(con, filters),
            "sample": queries.latency_sample(con, filters),
            "receipts": queries.receipts(con, filters, search),
            "migration": queries.migration(con, filters, bucket, tz_name),
            "budgets": None,
            "burn": None,
        }
        elsewhere = page["migration"]
        others = elsewhere[elsewhere["provider"] != queries.JOULE_PROVIDER]
        page["other_calls"] = queries.other_provider_calls(con, filters) if not others.empty else None
        if budgets:
            page["budgets"] = queries.budget_status(con, filters, list(budgets), as_of)
            page["burn"] = queries.budget_burn(con, filters, list(budgets), as_of)
    return page


@st.cache_data(ttl=5, show_spinner=False)
def load_what_if(
    signature: tuple[Any, ...],
    _source: Source,
    filters: queries.Filters,
    workload: str,
    model: str | None,
    tier: str | None,
    region: str | None,
) -> queries.WhatIf:
    """The what-if figures for one choice (cached like the page)."""
    with _source.connect() as con:
        return queries.what_if(con, filters, workload, model=model, tier=tier, region=region)


def export_rows(source: Source, filters: queries.Filters, search: str, fmt: str) -> bytes:
    """Every filtered row as CSV or Parquet bytes, computed only when a download is clicked."""
    with source.connect() as con:
        frame = queries.receipts(con, filters, search, limit=None)
    return _encode(frame, fmt)


def _encode(frame: pd.DataFrame, fmt: str) -> bytes:
    buffer = io.BytesIO()
    if fmt == "csv":
        frame.to_csv(buffer, index=False)
    else:
        frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def text_number(value: Any, fmt: str) -> str:
    """A number as a table shows it, and "–" where there is none (never "None" or "nan")."""
    if value is None or pd.isna(value):
        return "–"
    return format(int(value) if fmt.endswith("d") else float(value), fmt)


def readable(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame with the column names a person reads."""
    return frame.rename(columns=READABLE)


def show(container: Any, fig: Any, frame: pd.DataFrame, key: str) -> None:
    """A chart, and its figures as CSV and Parquet downloads beneath it."""
    container.plotly_chart(fig, width="stretch", key=key)
    data = readable(frame)
    formats = (("CSV", "csv", "text/csv"), ("Parquet", "parquet", "application/octet-stream"))
    for column, (label, fmt, mime) in zip(container.columns([1, 1, 4]), formats, strict=False):
        column.download_button(
            label,
            # encoded when clicked, never on every rerun (15 charts' CSV and Parquet were most of a warm page)
            data=functools.partial(_encode, data, fmt),
            file_name=f"{key}.{fmt}",
            mime=mime,
            key=f"{key}_{fmt}",
            type="tertiary",
        )


try:
    opts = load_options(source.signature(), source)
except Exception as exc:  # a corrupt file, a folder without permission: say so, do not crash
    # never a file's contents: DuckDB's CSV errors quote the line they stumbled on
    reason = str(exc).splitlines()[0] if source.kind != "csv" or isinstance(exc, ValueError) else type(exc).__name__
    st.error(f"Cannot read {units.plain(source.path)}: {units.plain(reason)}")
    st.stop()

if not opts["rows"]:
    st.title("Energy")
    st.info(
        "No inference calls in this ledger yet. Instrument your app with `joule_otel.instrument()` "
        "(or run `joule-otel demo`), make a call, and it appears here within a second."
    )
    st.stop()

# -- sidebar: time ------------------------------------------------------------------------------
first: datetime = pd.Timestamp(opts["first"]).to_pydatetime()
last: datetime = pd.Timestamp(opts["last"]).to_pydatetime()
now = datetime.now(timezone.utc)
st.sidebar.header("Time")
browser_zone = st.context.timezone or "UTC"
zone_choices = sorted({browser_zone, "UTC", *(st.session_state.get("f_tz") or "UTC").split(",")})
tz_name = st.sidebar.selectbox(
    "Time zone",
    zone_choices,
    index=zone_choices.index(st.session_state.get("f_tz") or browser_zone)
    if (st.session_state.get("f_tz") or browser_zone) in zone_choices
    else 0,
    key="f_tz_select",
    help="Times, days and weeks on the page are in this zone; your browser's is the default.",
)
tz = timerange.zone(tz_name)
tz_name = tz.key  # a zone the browser or a link named, once it is known to exist
presets = list(timerange.PRESETS)
wanted_preset = st.session_state.get("f_range") or timerange.default_preset(last, now)
preset = st.sidebar.selectbox(
    "Time range", presets, index=presets.index(wanted_preset) if wanted_preset in presets else 0, key="f_range_select"
)
custom: tuple[date, time, date, time] | None = None
if preset == timerange.CUSTOM:
    local_first, local_last = first.astimezone(tz), (last + timedelta(minutes=1)).astimezone(tz)
    day_from, time_from = st.sidebar.columns(2)
    day_to, time_to = st.sidebar.columns(2)
    custom = (
        day_from.date_input("From", value=st.session_state.get("start_day", local_first.date()), key="start_day"),
        time_from.time_input(
            "at", value=st.session_state.get("start_time", local_first.time().replace(second=0)), key="start_time"
        ),
        day_to.date_input("To", value=st.session_state.get("end_day", local_last.date()), key="end_day"),
        time_to.time_input(
            "at ", value=st.session_state.get("end_time", local_last.time().replace(second=0)), key="end_time"
        ),
    )
start, end = timerange.resolve(preset or timerange.ALL, now=now, first=first, last=last, tz=tz, custom=custom)
st.sidebar.caption(timerange.describe(start, end, tz))
bucket = queries.bucket_for(end - start)

# -- sidebar: filters ---------------------------------------------------------------------------
st.sidebar.header("Filters")


def pick(label: str, key: str, choices: list[str]) -> tuple[str, ...]:
    """A multiselect whose shared-link values are kept only when the data has them."""
    chosen = [v for v in st.session_state.get(f"f_{key}", []) if v in choices]
    return tuple(st.sidebar.multiselect(label, choices, default=chosen, key=f"f_{key}_select"))


filters = queries.Filters(
    start=start,
    end=end,
    services=pick("Service", "service", opts["services"]),
    workloads=pick("Workload", "workload", opts["workloads"]),
    models=pick("Model (routed)", "model", opts["models"]),
    regions=pick("Region", "region", opts["regions"]),
    tiers=pick("Tier", "tier", opts["tiers"]),
    providers=pick("Provider", "provider", opts["providers"]),
    status=st.sidebar.selectbox(
        "Status",
        queries.STATUSES,
        index=queries.STATUSES.index(st.session_state.get("f_status", "all"))
        if st.session_state.get("f_status", "all") in queries.STATUSES
        else 0,
        key="f_status_select",
    )
    or "all",
)
split_choices = list(queries.DIMENSIONS)[:4]
split_by: str = st.session_state["f_split"] if st.session_state.get("f_split") in split_choices else "workload"
_save_to_url(
    {
        "range": preset,
        "tz": tz_name,
        "from": start.astimezone(tz).strftime("%Y-%m-%dT%H:%M") if preset == timerange.CUSTOM else None,
        "to": end.astimezone(tz).strftime("%Y-%m-%dT%H:%M") if preset == timerange.CUSTOM else None,
        "service": list(filters.services),
        "workload": list(filters.workloads),
        "model": list(filters.models),
        "region": list(filters.regions),
        "tier": list(filters.tiers),
        "provider": list(filters.providers),
        "status": filters.status if filters.status != "all" else None,
        "split": split_by if split_by != "workload" else None,
    }
)
as_of = min(last, end, now)
# budgets are month to date as of the newest call shown (sample data lies in the past); a comment, never a bare
# string: Streamlit's "magic" would render a string statement on the page

budget_error = None
budget_list: list[Budget] = []
try:
    budget_list = load_budgets()
    if not budget_list and source.kind == "sample":
        budget_list = load_budgets(SAMPLE_BUDGETS_PATH)
except ValueError as exc:
    budget_error = str(exc)


def render() -> None:
    """The page below the sidebar (a fragment when live refresh is on)."""
    st.title("Where your joules go")
    search = st.session_state.get("search", "")
    page = load_page(
        source.signature(),
        source,
        filters,
        split_by,
        bucket,
        tz_name,
        tuple(budget_list),
        search,
        as_of,
    )
    kpi = page["kpis"]
    prev = kpi["previous"] or {}

    def delta(key: str) -> str | None:
        before, current = prev.get(key), kpi.get(key)
        if before in (None, 0) or current is None or pd.isna(before) or pd.isna(current):
            return None
        return f"{(current - before) / before:+.0%} vs previous {units.span(end - start)}"

    # -- KPI row --------------------------------------------------------------------------------
    cols = st.columns(7)
    cols[0].metric("Energy", units.energy(kpi["energy_j"]), delta("energy_j"), delta_color="inverse")
    cols[1].metric(
        "Carbon (CO2e)", units.carbon(kpi["carbon_mg"]).removesuffix(" CO2e"), delta("carbon_mg"), delta_color="inverse"
    )
    cols[2].metric("Calls", f"{kpi['calls']:,}", delta("calls"), delta_color="off")
    cols[3].metric("Energy per call", units.energy(kpi["mean_j_per_call"]), delta("mean_j_per_call"), "inverse")
    cols[4].metric(
        "Per 1k tok. out",
        units.energy(kpi["j_per_1k_output"]),
        delta("j_per_1k_output"),
        delta_color="inverse",
        help="Energy per 1000 output tokens, of generation calls only (chat, completions, responses): "
        "embeddings produce no output tokens.",
    )
    cols[5].metric("Asked for auto", f"{(kpi['auto_share'] or 0):.0%}", delta("auto_share"), delta_color="off")
    cols[6].metric("402 refused", f"{kpi['refused_402']:,}", delta("refused_402"), delta_color="inverse")
    st.caption(
        " · ".join(
            part
            for part in (
                units.energy_wh(kpi["energy_j"]),
                units.energy_equivalent(kpi["energy_j"]),
                units.carbon_equivalent(kpi["carbon_mg"]),
                f"times in {tz_name}",
            )
            if part
        )
    )
    if not kpi["calls"]:
        st.info(
            f"No calls in this period. The ledger holds calls from {first.astimezone(tz):%d %b %Y %H:%M} to "
            f"{last.astimezone(tz):%d %b %Y %H:%M}: choose *All data* or another range."
        )
    elif not kpi["energy_j"]:
        st.warning(
            "These calls carry no energy figures (all were refused, failed, or served by another provider). "
            "Check the Receipts, Budgets and Migration tabs."
        )

    tabs = st.tabs(["Overview", "Router", "Carbon", "Efficiency", "Budgets", "Migration", "What if", "Receipts"])
    overview, router, carbon_tab, efficiency, budgets_tab, migration_tab, what_if_tab, receipts_tab = tabs

    with overview:
        st.radio("Split energy by", split_choices, key="f_split", horizontal=True)
        over_time = page["over_time"]
        if over_time.empty:
            st.info("No energy recorded in this selection.")
        else:
            show(
                st,
                charts.over_time(over_time, bucket=bucket, start=start, end=end, split_label=split_by, tz_name=tz_name),
                over_time,
                "energy_over_time",
            )
        left, right = st.columns(2)
        for col, dim in ((left, "workload"), (right, "model"), (left, "region"), (right, "tier")):
            frame = page["by"][dim]
            if frame["energy_j"].fillna(0).gt(0).any():
                show(col, charts.breakdown(frame, dim), frame, f"by_{dim}")
        if not page["treemap"].empty:
            show(st, charts.treemap(page["treemap"]), page["treemap"], "treemap")

    with router:
        flows = page["flows"]
        if flows.empty:
            st.info("No routed calls in this selection.")
        else:
            show(st, charts.sankey(flows), flows, "router_flows")
            st.dataframe(
                pd.DataFrame(
                    {
                        "requested model": flows["requested"],
                        "routed to": flows["routed"],
                        "energy": flows["energy_j"].map(units.energy),
                        "calls": flows["calls"].map(lambda v: text_number(v, ",.0f")),
                    }
                ),
                hide_index=True,
                width="stretch",
            )

    with carbon_tab:
        regions = page["regions"]
        if regions.empty:
            st.info("No carbon figures in this selection.")
        else:
            show(st, charts.carbon_regions(regions), regions, "carbon_regions")
            savings = page["savings"]
            if not savings.empty:
                cleanest = str(savings["cleanest_region"].iloc[0])
                st.subheader("Where moving a workload cuts carbon")
                st.caption(
                    "If each workload were served from the cleanest region in this selection "
                    f"({units.plain(cleanest)}), at the energy it used."
                )
                show(st, charts.carbon_savings(savings, cleanest), savings, "carbon_savings")

    with efficiency:
        eff = page["efficiency"]
        if eff.empty:
            st.info("No served calls in this selection.")
        else:
            generation = eff[eff["kind"] == "generation"]
            embeddings = eff[eff["kind"] == "embeddings"]
            left, right = st.columns(2)
            if generation["j_per_output_token"].notna().any():
                show(
                    left,
                    charts.per_token(
                        generation, "j_per_output_token", "Generation: energy per output token", "per output token"
                    ),
                    generation,
                    "j_per_output_token",
                )
            if embeddings["j_per_input_token"].notna().any():
                show(
                    right,
                    charts.per_token(
                        embeddings, "j_per_input_token", "Embeddings: energy per input token", "per input token"
                    ),
                    embeddings,
                    "j_per_input_token",
                )
            table = pd.DataFrame(
                {
                    "routed model": eff["model"],
                    "kind": eff["kind"],
                    "J / token": [
                        text_number(o if k == "generation" else i, ".4f") + (" out" if k == "generation" else " in")
                        for k, o, i in zip(
                            eff["kind"], eff["j_per_output_token"], eff["j_per_input_token"], strict=True
                        )
                    ],
                    "J / call": eff["j_per_call"].map(lambda v: text_number(v, ",.1f")),
                    "calls": eff["calls"].map(lambda v: text_number(v, ",.0f")),
                    "median duration (ms)": eff["p50_duration_ms"].map(lambda v: text_number(v, ",.0f")),
                    "p95 duration (ms)": eff["p95_duration_ms"].map(lambda v: text_number(v, ",.0f")),
                    "median first chunk (ms)": eff["p50_ttft_ms"].map(lambda v: text_number(v, ",.0f")),
                }
            )
            st.dataframe(table, hide_index=True, width="stretch")
        hist = page["histogram"]
        if not hist.empty:
            show(st, charts.histogram(hist), hist, "energy_histogram")
        sample = page["sample"]
        if not sample.empty:
            left, right = st.columns(2)
            show(left, charts.latency_energy(sample), sample, "latency_energy")
            streams = sample[sample["ttft_ms"].notna()]
            if not streams.empty:
                show(right, charts.ttft(streams), streams, "ttft")

    with budgets_tab:
        _budgets(page)

    with migration_tab:
        _migration(page)

    with what_if_tab:
        _what_if()

    with receipts_tab:
        st.text_input("Search receipt id or workload", key="search")
        table = page["receipts"]
        template = os.environ.get(JOULE_OTEL_TRACE_URL, "").strip()
        if template and "{trace_id}" in template:
            table = table.assign(
                trace=[template.replace("{trace_id}", t) if isinstance(t, str) else None for t in table["trace_id"]]
            )
        table = table.assign(started_at=table["started_at"].dt.tz_convert(tz_name).dt.tz_localize(None))
        for column, fmt in (
            ("energy_j", ",.3f"),
            ("carbon_mg", ",.3f"),
            ("input_tokens", ",.0f"),
            ("output_tokens", ",.0f"),
            ("duration_ms", ",.0f"),
            ("ttft_ms", ",.0f"),
        ):
            table[column] = table[column].map(lambda v, fmt=fmt: text_number(v, fmt))
        for column in (
            "receipt_id",
            "workload",
            "service",
            "operation",
            "requested_model",
            "routed_to",
            "tier",
            "region",
            "error_type",
            "trace_id",
        ):
            table[column] = table[column].fillna("–")
        table["status_code"] = table["status_code"].map(lambda v: text_number(v, "d"))
        st.dataframe(
            table,
            hide_index=True,
            width="stretch",
            column_config={
                "started_at": st.column_config.DatetimeColumn(f"started ({tz_name})", format="YYYY-MM-DD HH:mm:ss"),
                "receipt_id": "receipt",
                "requested_model": "requested model",
                "routed_to": "routed to",
                "energy_j": "energy (J)",
                "carbon_mg": "carbon (mg CO2e)",
                "input_tokens": "input tokens",
                "output_tokens": "output tokens",
                "duration_ms": "duration (ms)",
                "ttft_ms": "first chunk (ms)",
                "status_code": "status",
                "error_type": "error",
                "trace_id": "trace id",
                "trace": st.column_config.LinkColumn("trace", display_text="open trace"),
            },
        )
        st.caption(f"Newest {len(table):,} rows shown; the export holds every filtered row.")
        left, right, _ = st.columns([1, 1, 4])
        left.download_button(
            "Export CSV",
            data=lambda: export_rows(source, filters, search, "csv"),
            file_name="inference_calls.csv",
            mime="text/csv",
            key="export_csv",
        )
        right.download_button(
            "Export Parquet",
            data=lambda: export_rows(source, filters, search, "parquet"),
            file_name="inference_calls.parquet",
            mime="application/octet-stream",
            key="export_parquet",
        )


def _budgets(page: dict[str, Any]) -> None:
    """Month to date against each workload's budget, and what the service itself enforced (402s)."""
    if budget_error:
        st.error(units.plain(budget_error))
    status = page["budgets"]
    if status is None or status.empty:
        st.info(
            "No energy budgets configured. Set JOULE_OTEL_BUDGETS to a JSON, TOML or CSV file of "
            'monthly joules per workload, e.g. {"support-bot": 150000}.'
        )
        return
    month_start = as_of.astimezone(timezone.utc).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    next_month = (month_start + timedelta(days=32)).replace(day=1)
    elapsed_days = max((as_of - month_start).total_seconds() / 86400, 1 / 24)
    rows = []
    for item in status.itertuples():
        rate = item.spent_j / elapsed_days
        left_j = item.budget_j - item.spent_j
        if item.refused_402:
            first_402 = pd.Timestamp(item.first_402).tz_convert(tz_name)
            projection = f"refused by the service since {first_402:%d %b %H:%M}"
        elif left_j <= 0:
            projection = "spent"
        elif rate <= 0:
            projection = "no spend yet"
        else:
            when = as_of + timedelta(days=left_j / rate)
            projection = f"{when.astimezone(tz):%d %b}" if when < next_month else "lasts the month"
        rows.append(
            {
                "workload": item.workload,
                "budget (file)": units.energy(item.budget_j),
                "spent this month": units.energy(item.spent_j),
                "used": item.used_share,
                "burn per day": units.energy(rate),
                "runs out": projection,
                "402 refusals": int(item.refused_402),
                "last 402": pd.Timestamp(item.last_402).tz_convert(tz_name).strftime("%d %b %H:%M")
                if item.refused_402
                else "–",
            }
        )
    st.dataframe(
        pd.DataFrame(rows),
        hide_index=True,
        width="stretch",
        column_config={
            "used": st.column_config.ProgressColumn("used", min_value=0.0, max_value=1.0, format="percent"),
        },
    )
    enforced = status[status["refused_402"] > 0]
    if not enforced.empty:
        counts = [(w, int(n)) for w, n in zip(enforced.workload, enforced.refused_402, strict=True)]
        st.warning(
            "Joule Cloud refused calls with 402 (insufficient balance) for "
            + ", ".join(f"{units.plain(w)} ({n:,} call{'s' if n != 1 else ''})" for w, n in counts)
            + ". The service enforces its own balance or per-token budget, which may be lower than this file's."
        )
    st.caption(f"Month to date as of {as_of.astimezone(tz):%d %b %Y %H:%M} ({tz_name}); UTC months.")
    burn = page["burn"]
    if burn is not None and not burn.empty:
        limits = {b.label: b.joules for b in budget_list}
        show(st, charts.burn_down(burn, limits, month_start, next_month), burn, "budget_burn")


def _migration(page: dict[str, Any]) -> None:
    """Calls still on another provider, per workload, over time; their energy estimated, never measured."""
    frame = page["migration"]
    if frame.empty:
        st.info("No calls in this selection.")
        return
    elsewhere = frame[frame["provider"] != queries.JOULE_PROVIDER]
    if elsewhere.empty:
        st.success("Every call in this selection was served by Joule Cloud: nothing left to migrate.")
        return
    moving = set(elsewhere["workload"])
    trend = frame[frame["workload"].isin(moving)]
    if end - start >= timedelta(days=14) and bucket != "7 days":  # shares of a few calls a day are noise
        trend = trend.assign(bucket=trend["bucket"].dt.to_period("W-SUN").dt.start_time)
        trend = trend.groupby(["bucket", "workload", "provider"], as_index=False)[["calls", "tokens"]].sum()
        trend_bucket = "7 days"
    else:
        trend_bucket = bucket
    show(st, charts.migration_share(trend, trend_bucket, start, end, tz_name), trend, "migration_share")
    per_workload = frame.groupby(["workload", "provider"], as_index=False)[["calls", "tokens", "measured_j"]].sum(
        min_count=1
    )
    totals = per_workload.groupby("workload")[["calls", "tokens"]].transform("sum")
    per_workload["share of calls"] = per_workload["calls"] / totals["calls"]
    per_workload["share of tokens"] = per_workload["tokens"] / totals["tokens"].where(totals["tokens"] > 0)
    estimate_text: dict[tuple[str, str], str] = {}
    other = page["other_calls"]
    have_estimator = estimates.available()
    if other is not None and have_estimator:
        sums: dict[tuple[str, str], list[float]] = {}
        for item in other.itertuples():
            found = estimates.estimate(
                item.provider, item.model, int(item.calls), item.mean_output_tokens, item.mean_latency_s
            )
            if found is not None:
                low_high = sums.setdefault((item.workload, item.provider), [0.0, 0.0])
                low_high[0] += found.low_j
                low_high[1] += found.high_j
        estimate_text = {k: f"{units.energy(lo)} – {units.energy(hi)}" for k, (lo, hi) in sums.items()}
    per_workload["energy"] = [
        units.energy(j)
        if p == queries.JOULE_PROVIDER
        else f"≈ {estimate_text[(w, p)]} (estimate)"
        if (w, p) in estimate_text
        else "not measured (no estimate for this model)"
        if have_estimator
        else "not measured"
        for w, p, j in zip(per_workload.workload, per_workload.provider, per_workload.measured_j, strict=True)
    ]
    st.dataframe(
        per_workload.drop(columns=["measured_j"]),
        hide_index=True,
        width="stretch",
        column_config={
            "calls": st.column_config.NumberColumn("calls", format="localized"),
            "tokens": st.column_config.NumberColumn("tokens", format="localized"),
            "share of calls": st.column_config.ProgressColumn(min_value=0.0, max_value=1.0, format="percent"),
            "share of tokens": st.column_config.ProgressColumn(min_value=0.0, max_value=1.0, format="percent"),
        },
    )
    if have_estimator:
        st.caption(
            "Joule Cloud's energy is measured per call. Other providers send no figure: their range is an "
            "estimate by EcoLogits (low–high, from the model, output tokens and latency of each call), never added "
            "to the measured totals above."
        )
    else:
        st.caption(
            "Other providers send no energy figure. `pip install 'joule-otel[estimates]'` adds an EcoLogits "
            "estimate (a range, labelled as such, never added to measured totals)."
        )


def _what_if() -> None:
    """One workload's calls re-priced on another model, tier or region, from rates this ledger measured."""
    workloads = [w for w in opts["workloads"] if not filters.workloads or w in filters.workloads]
    if not workloads:
        st.info("No workloads in this selection.")
        return
    pick_workload, pick_model, pick_tier, pick_region = st.columns(4)
    as_now = "as now"
    workload = pick_workload.selectbox("Workload", workloads, key="wi_workload")
    model = pick_model.selectbox("Pinned model", [as_now, *opts["models"]], key="wi_model")
    tier = pick_tier.selectbox("Tier", [as_now, *opts["tiers"]], key="wi_tier")
    region = pick_region.selectbox("Region", [as_now, *opts["regions"]], key="wi_region")
    if model == tier == region == as_now:
        st.info(
            "Choose a model, tier or region above: the page re-prices this workload's calls at the rates "
            "measured there."
        )
        return
    result = load_what_if(
        source.signature(),
        source,
        filters,
        workload,
        None if model == as_now else model,
        None if tier == as_now else tier,
        None if region == as_now else region,
    )
    if result.rows.empty:
        st.info(f"{units.plain(workload)} has no measured calls in this selection.")
        return
    saved_j = result.energy_now_j - result.energy_then_j
    saved_mg = result.carbon_now_mg - result.carbon_then_mg
    moves = [
        f"pinned to {units.plain(model)}" if model != as_now else "",
        f"on the {units.plain(tier)} tier" if tier != as_now else "",
        f"in {units.plain(region)}" if region != as_now else "",
    ]
    change = ", ".join(m for m in moves if m) or "as it ran"
    verb = "saved" if saved_j >= 0 else "cost"
    st.subheader(
        f"{units.plain(workload)} {change} would have {verb} "
        f"{units.energy(abs(saved_j))} and {units.carbon(abs(saved_mg))} in this period"
    )
    rows = result.rows
    st.dataframe(
        pd.DataFrame(
            {
                "kind of call": rows["kind"],
                "tokens (output; input for embeddings)": rows["tokens"],
                "J / token now": rows["j_per_token_now"],
                "J / token then": rows["j_per_token_then"],
                "energy now": rows["energy_now_j"].map(units.energy),
                "energy then": rows["energy_then_j"].map(units.energy),
                "mg CO2e / J now": rows["mg_per_j_now"],
                "carbon now": rows["carbon_now_mg"].map(units.carbon),
                "carbon then": rows["carbon_then_mg"].map(units.carbon),
            }
        ),
        hide_index=True,
        width="stretch",
        column_config={
            "tokens (output; input for embeddings)": st.column_config.NumberColumn(format="localized"),
            "J / token now": st.column_config.NumberColumn(format="%.5f"),
            "J / token then": st.column_config.NumberColumn(format="%.5f"),
            "mg CO2e / J now": st.column_config.NumberColumn(format="%.4f"),
        },
    )
    intensity = (
        f"{result.intensity_then_mg_per_j:.4f} mg CO2e per J measured in {units.plain(region)}"
        if result.intensity_then_mg_per_j is not None
        else "the workload's own intensity"
    )
    st.caption(
        "energy then = tokens × J per token measured on this ledger's calls of that kind on the chosen model and tier "
        f"in this period; carbon then = energy then × {intensity}."
    )
    for kind, names, tiers in result.missing:
        if kind == "carbon":
            st.warning(f"No carbon figures from {units.plain(names[0])} in this selection: carbon left as it ran.")
        else:
            st.warning(
                f"No {kind} calls on {', '.join(units.plain(n) for n in names)} at the "
                f"{', '.join(units.plain(t) for t in tiers)} tier in this selection: {kind} left as it ran."
            )


if live:
    st.fragment(run_every=interval_s)(render)()
else:
    render()
