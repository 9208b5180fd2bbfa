"""The joule-otel energy dashboard (Streamlit).

Order: page config → sidebar (source, live refresh, filters) → cached queries → KPI row → charts →
tables. The ledger is opened for each batch of queries and released at once, never held across
reruns, so apps keep writing while it is open.
"""

from __future__ import annotations

import io
import os
from datetime import datetime, time, timedelta, timezone
from typing import Any

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from joule_otel.config import JOULE_OTEL_TRACE_URL
from joule_otel.dashboard import queries, units
from joule_otel.dashboard.sources import SAMPLE_BUDGETS_PATH, Source, load_budgets, resolve_source, source_for

st.set_page_config(page_title="joule-otel · energy", page_icon="⚡", layout="wide")

# -- sidebar: source ----------------------------------------------------------------------------
st.sidebar.title("⚡ joule-otel")
default_source = resolve_source()
custom_path = st.sidebar.text_input(
    "Ledger, Parquet or CSV path", value="", key="source_path", placeholder=str(default_source.path)
)
source: Source = source_for(custom_path, "chosen in the sidebar") if custom_path.strip() else default_source
if source.kind != "sample" and not source.path.exists() and source.kind != "ledger":
    st.sidebar.error(f"{source.path} does not exist; showing {default_source.label}")
    source = default_source
st.sidebar.caption(f"**{source.label}**  \n{source.why}")

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
    budgets: tuple[tuple[str, float], ...],
    search: str,
    as_of: datetime | None,
) -> dict[str, Any]:
    """Every query of the page, in one short visit to the ledger."""
    bucket = queries.bucket_for((filters.end - filters.start) if filters.start and filters.end else timedelta(days=30))
    with _source.connect() as con:
        page: dict[str, Any] = {
            "kpis": queries.kpis(con, filters),
            "over_time": queries.energy_over_time(con, filters, split_by, bucket),
            "by": {dim: queries.breakdown(con, filters, dim) for dim in ("workload", "model", "region", "tier")},
            "treemap": queries.workload_model(con, filters),
            "flows": queries.router_flows(con, filters),
            "efficiency": queries.model_efficiency(con, filters),
            "regions": queries.carbon_by_region(con, filters),
            "savings": queries.carbon_savings(con, filters),
            "histogram": queries.energy_histogram(con, filters),
            "sample": queries.latency_sample(con, filters),
            "receipts": queries.receipts(con, filters, search),
            "budgets": None,
            "burn": None,
        }
        if budgets and as_of is not None:
            page["budgets"] = queries.budget_status(con, filters, dict(budgets), as_of)
            page["burn"] = queries.budget_burn(con, filters, [name for name, _ in budgets], as_of)
    page["bucket"] = bucket
    return page


def export_rows(source: Source, filters: queries.Filters, search: str, fmt: str) -> bytes:
    """Every filtered row as CSV or Parquet bytes, computed only when a download is clicked."""
    with source.connect() as con:
        frame = queries.receipts(con, filters, search, limit=None)
    buffer = io.BytesIO()
    if fmt == "csv":
        frame.to_csv(buffer, index=False)
    else:
        frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


try:
    opts = load_options(source.signature(), source)
except Exception as exc:  # a corrupt file, a folder without permission: say so, do not crash
    st.error(f"Cannot read {source.path}: {exc}")
    st.stop()

if not opts["rows"]:
    st.title("Energy")
    st.info(
        "No inference calls in this ledger yet. Instrument your app with `joule_otel.instrument()` "
        "(or run `joule-otel demo`), make a call, and it appears here within a second."
    )
    st.stop()

# -- sidebar: filters ---------------------------------------------------------------------------
first: datetime = opts["first"].to_pydatetime() if hasattr(opts["first"], "to_pydatetime") else opts["first"]
last: datetime = opts["last"].to_pydatetime() if hasattr(opts["last"], "to_pydatetime") else opts["last"]
st.sidebar.header("Filters")
date_range = st.sidebar.date_input(
    "Time range", value=(first.date(), last.date()), min_value=first.date(), max_value=last.date(), key="dates"
)
start_date, end_date = (
    date_range if isinstance(date_range, (tuple, list)) and len(date_range) == 2 else (first.date(), last.date())
)
filters = queries.Filters(
    start=datetime.combine(start_date, time.min, tzinfo=timezone.utc),
    end=datetime.combine(end_date, time.min, tzinfo=timezone.utc) + timedelta(days=1),
    services=tuple(st.sidebar.multiselect("Service", opts["services"], key="services")),
    workloads=tuple(st.sidebar.multiselect("Workload", opts["workloads"], key="workloads")),
    models=tuple(st.sidebar.multiselect("Model (routed)", opts["models"], key="models")),
    regions=tuple(st.sidebar.multiselect("Region", opts["regions"], key="regions")),
    tiers=tuple(st.sidebar.multiselect("Tier", opts["tiers"], key="tiers")),
    status=st.sidebar.selectbox("Status", queries.STATUSES, key="status") or "all",
)
as_of: datetime = min(last, filters.end) if filters.end is not None else last
# budgets are month to date as of the newest call shown (sample data lies in the past); a comment, never a bare
# string: Streamlit's "magic" would render a string statement on the page

budget_error = None
try:
    budget_map = load_budgets()
    if not budget_map and source.kind == "sample":
        budget_map = load_budgets(SAMPLE_BUDGETS_PATH)
except ValueError as exc:
    budget_map, budget_error = {}, str(exc)


def render() -> None:
    """The page below the sidebar (a fragment when live refresh is on)."""
    st.title("Where your joules go")
    split_by = st.session_state.get("split_by", "workload")
    search = st.session_state.get("search", "")
    page = load_page(
        source.signature(),
        source,
        filters,
        split_by,
        tuple(sorted(budget_map.items())),
        search,
        as_of,
    )
    kpi = page["kpis"]
    prev = kpi["previous"] or {}

    def delta(key: str, fmt: Any) -> str | None:
        before, now = prev.get(key), kpi.get(key)
        if before in (None, 0) or now is None or pd.isna(before) or pd.isna(now):
            return None
        return f"{(now - before) / before:+.0%} vs previous"

    # -- KPI row --------------------------------------------------------------------------------
    cols = st.columns(7)
    cols[0].metric(
        "Energy",
        units.energy(kpi["energy_j"]),
        delta("energy_j", None),
        delta_color="inverse",
        help=f"{units.energy_wh(kpi['energy_j'])} · {units.energy_equivalent(kpi['energy_j'])}",
    )
    cols[1].metric(
        "Carbon (CO2e)",
        units.carbon(kpi["carbon_mg"]).removesuffix(" CO2e"),
        delta("carbon_mg", None),
        delta_color="inverse",
        help=units.carbon_equivalent(kpi["carbon_mg"]),
    )
    cols[2].metric("Calls", f"{kpi['calls']:,}", delta("calls", None), delta_color="off")
    cols[3].metric(
        "Mean per call", units.energy(kpi["mean_j_per_call"]), delta("mean_j_per_call", None), delta_color="inverse"
    )
    cols[4].metric(
        "J per 1k output tokens",
        units.energy(kpi["j_per_1k_output"]),
        delta("j_per_1k_output", None),
        delta_color="inverse",
    )
    cols[5].metric("Sent to auto", f"{(kpi['auto_share'] or 0):.0%}", delta("auto_share", None), delta_color="off")
    cols[6].metric("402 refused", f"{kpi['refused_402']:,}", delta("refused_402", None), delta_color="inverse")
    st.caption(
        f"{units.energy_wh(kpi['energy_j'])} · {units.energy_equivalent(kpi['energy_j'])} · "
        f"{units.carbon_equivalent(kpi['carbon_mg'])}"
    )

    if not kpi["energy_j"]:
        st.warning(
            "These calls carry no energy figures (all were refused or failed). "
            "Check the Receipts tab and the 402s under Budgets."
        )

    overview, router, carbon_tab, efficiency, budgets_tab, receipts_tab = st.tabs(
        ["Overview", "Router", "Carbon", "Efficiency", "Budgets", "Receipts"]
    )

    with overview:
        st.radio("Split energy by", list(queries.DIMENSIONS)[:4], key="split_by", horizontal=True)
        if page["over_time"].empty or not page["over_time"]["energy_j"].notna().any():
            st.info("No energy recorded in this selection.")
        else:
            fig = px.bar(
                page["over_time"],
                x="bucket",
                y="energy_j",
                color="group",
                labels={"energy_j": "Energy (J)", "bucket": f"per {page['bucket']}", "group": split_by},
                title=f"Joules over time by {split_by}",
            )
            st.plotly_chart(fig, width="stretch", key="over_time")
        left, right = st.columns(2)
        for col, dim in ((left, "workload"), (right, "model"), (left, "region"), (right, "tier")):
            frame = page["by"][dim]
            if frame["energy_j"].notna().any():
                col.plotly_chart(
                    px.bar(
                        frame,
                        x="energy_j",
                        y="group",
                        orientation="h",
                        title=f"Energy by {dim}",
                        labels={"energy_j": "Energy (J)", "group": dim},
                        hover_data=["calls", "carbon_mg", "errors"],
                    ),
                    width="stretch",
                    key=f"by_{dim}",
                )
        if not page["treemap"].empty:
            st.plotly_chart(
                px.treemap(
                    page["treemap"], path=["workload", "model"], values="energy_j", title="Workload → model (joules)"
                ),
                width="stretch",
                key="treemap",
            )

    with router:
        flows = page["flows"]
        if flows.empty:
            st.info("No routed calls in this selection.")
        else:
            labels = [f"asked: {x}" for x in flows["requested"].unique()] + [
                f"served: {x}" for x in flows["routed"].unique()
            ]
            index = {label: i for i, label in enumerate(labels)}
            sankey = go.Figure(
                go.Sankey(
                    node={"label": labels, "pad": 14},
                    link={
                        "source": [index[f"asked: {r}"] for r in flows["requested"]],
                        "target": [index[f"served: {r}"] for r in flows["routed"]],
                        "value": flows["energy_j"].tolist(),
                    },
                )
            )
            sankey.update_layout(title="Requested model → routed model, weighted by joules")
            st.plotly_chart(sankey, width="stretch", key="router_sankey")
            st.dataframe(flows, hide_index=True, width="stretch")
        eff = page["efficiency"]
        if not eff.empty and eff["j_per_output_token"].notna().any():
            st.plotly_chart(
                px.bar(
                    eff,
                    x="model",
                    y="j_per_output_token",
                    title="J per output token by model",
                    labels={"j_per_output_token": "J / output token"},
                ),
                width="stretch",
                key="router_j_per_token",
            )

    with carbon_tab:
        regions = page["regions"]
        if regions.empty:
            st.info("No carbon figures in this selection.")
        else:
            st.plotly_chart(
                px.bar(
                    regions,
                    x="region",
                    y="carbon_mg",
                    color="g_per_kwh",
                    color_continuous_scale="RdYlGn_r",
                    hover_data=["energy_j", "mg_per_j", "calls"],
                    title="Carbon by region, coloured by effective intensity (g CO2e/kWh)",
                    labels={"carbon_mg": "Carbon (mg CO2e)", "g_per_kwh": "g/kWh"},
                ),
                width="stretch",
                key="carbon_regions",
            )
            savings = page["savings"]
            if not savings.empty:
                savings = savings.assign(saving_mg=savings["carbon_mg"] - savings["if_cleanest_mg"])
                st.subheader("Where moving a workload cuts carbon")
                st.caption(
                    f"If each workload were served from the cleanest region in the data "
                    f"({savings['cleanest_region'].iloc[0]}):"
                )
                st.plotly_chart(
                    px.bar(
                        savings,
                        x="workload",
                        y=["carbon_mg", "if_cleanest_mg"],
                        barmode="group",
                        labels={"value": "mg CO2e"},
                        title="Carbon now vs. at the cleanest region",
                    ),
                    width="stretch",
                    key="carbon_savings",
                )

    with efficiency:
        eff = page["efficiency"]
        if eff.empty:
            st.info("No served calls in this selection.")
        else:
            st.dataframe(
                eff,
                hide_index=True,
                width="stretch",
                column_config={
                    "j_per_output_token": st.column_config.NumberColumn("J / output token", format="%.3f"),
                    "j_per_call": st.column_config.NumberColumn("J / call", format="%.1f"),
                },
            )
        hist = page["histogram"]
        if not hist.empty:
            hist = hist.assign(
                range=[
                    f"{units.energy(a)}–{units.energy(b)}"
                    for a, b in zip(hist["bin_start_j"], hist["bin_end_j"], strict=True)
                ]
            )
            st.plotly_chart(
                px.bar(hist, x="range", y="calls", title="Energy per call (log-spaced bins)"),
                width="stretch",
                key="energy_histogram",
            )
        sample = page["sample"]
        if not sample.empty:
            left, right = st.columns(2)
            left.plotly_chart(
                px.scatter(
                    sample,
                    x="duration_ms",
                    y="energy_j",
                    color="model",
                    log_y=True,
                    title="Latency vs energy",
                    labels={"duration_ms": "duration (ms)"},
                ),
                width="stretch",
                key="latency_energy",
            )
            streams = sample[sample["ttft_ms"].notna()]
            if not streams.empty:
                right.plotly_chart(
                    px.box(
                        streams, x="model", y="ttft_ms", title="Time to first chunk (streams)", labels={"ttft_ms": "ms"}
                    ),
                    width="stretch",
                    key="ttft",
                )

    with budgets_tab:
        if budget_error:
            st.error(budget_error)
        status = page["budgets"]
        if status is None or status.empty:
            st.info(
                "No energy budgets configured. Set JOULE_OTEL_BUDGETS to a JSON, TOML or CSV file of "
                'monthly joules per workload, e.g. {"support-bot": 150000}.'
            )
        else:
            month_start = as_of.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
            elapsed_days = max((as_of - month_start).total_seconds() / 86400, 1 / 24)
            rows = []
            for item in status.itertuples():
                rate = item.spent_j / elapsed_days
                left_j = item.budget_j - item.spent_j
                if left_j <= 0:
                    projection = "exhausted"
                elif rate <= 0:
                    projection = "no spend yet"
                else:
                    when = as_of + timedelta(days=left_j / rate)
                    next_month = (month_start + timedelta(days=32)).replace(day=1)
                    projection = when.strftime("%Y-%m-%d") if when < next_month else "lasts the month"
                rows.append(
                    {
                        "workload": item.workload,
                        "budget": units.energy(item.budget_j),
                        "spent": units.energy(item.spent_j),
                        "used": item.used_share,
                        "burn per day": units.energy(rate),
                        "projected exhaustion": projection,
                        "402s": item.refused_402,
                    }
                )
            st.dataframe(
                pd.DataFrame(rows),
                hide_index=True,
                width="stretch",
                column_config={
                    "used": st.column_config.ProgressColumn("used", min_value=0.0, max_value=1.0, format="percent")
                },
            )
            burn = page["burn"]
            if burn is not None and not burn.empty:
                fig = px.line(
                    burn,
                    x="day",
                    y="cumulative_j",
                    color="workload",
                    markers=True,
                    title="Burn-down this month (cumulative joules vs budget)",
                )
                for name, joules in budget_map.items():
                    if name in set(burn["workload"]):
                        fig.add_hline(y=joules, line_dash="dot", annotation_text=f"{name} budget")
                st.plotly_chart(fig, width="stretch", key="budget_burn")

    with receipts_tab:
        st.text_input("Search receipt id or workload", key="search")
        table = page["receipts"]
        template = os.environ.get(JOULE_OTEL_TRACE_URL, "").strip()
        if template and "{trace_id}" in template:
            table = table.assign(
                trace=[template.replace("{trace_id}", t) if isinstance(t, str) else None for t in table["trace_id"]]
            )
        st.dataframe(
            table,
            hide_index=True,
            width="stretch",
            column_config={
                "trace": st.column_config.LinkColumn("trace", display_text="open trace"),
                "energy_j": st.column_config.NumberColumn("energy (J)", format="%.3f"),
            },
        )
        st.caption(f"Newest {len(table):,} rows shown; the export holds every filtered row.")
        left, right = st.columns(2)
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


if live:
    st.fragment(run_every=interval_s)(render)()
else:
    render()
