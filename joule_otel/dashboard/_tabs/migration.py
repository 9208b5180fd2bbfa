"""The Migration tab: calls still on another provider, per workload, over time.

Their energy is estimated (EcoLogits, a range), never measured and never added to measured sums.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pandas as pd
import streamlit as st

from joule_otel import _units as units
from joule_otel.dashboard import _charts as charts
from joule_otel.dashboard import _estimates as estimates
from joule_otel.dashboard import _queries as queries
from joule_otel.dashboard._data import show
from joule_otel.dashboard._sidebar import View


def render(view: View, page: dict[str, Any]) -> None:
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
    if view.end - view.start >= timedelta(days=14) and view.bucket != "7 days":  # shares of a few calls a day are noise
        trend = trend.assign(bucket=trend["bucket"].dt.to_period("W-SUN").dt.start_time)
        trend = trend.groupby(["bucket", "workload", "provider"], as_index=False)[["calls", "tokens"]].sum()
        trend_bucket = "7 days"
    else:
        trend_bucket = view.bucket
    show(
        st,
        charts.migration_share(trend, trend_bucket, view.start, view.end, view.tz_name, view.colours),
        trend,
        "migration_share",
    )
    per_workload = frame.groupby(["workload", "provider"], as_index=False)[
        ["calls", "tokens", "measured_j", "measured_calls"]
    ].sum(min_count=1)
    totals = per_workload.groupby("workload")[["calls"]].transform("sum")
    per_workload["share of calls"] = per_workload["calls"] / totals["calls"]
    ranges = _estimated_ranges(page["other_calls"]) if estimates.available() else {}
    per_call: list[str] = []
    per_1k: list[str] = []
    unestimated: set[str] = set()
    for item in per_workload.itertuples():
        if item.provider == queries.JOULE_PROVIDER:
            measured = item.measured_j if item.measured_j == item.measured_j else None  # NaN: no energy
            # per call with a figure: a refused or failed call has none, as the estimate counts served calls only
            per_call.append(units.energy(measured / item.measured_calls) if measured is not None else "–")
            per_1k.append(units.energy(measured / item.tokens * 1000) if measured is not None and item.tokens else "–")
            continue
        found = ranges.get((item.workload, item.provider))
        if found is None:
            unestimated.add(f"{item.workload} on {estimates.provider_name(item.provider)}")
            per_call.append("no estimate")
            per_1k.append("no estimate")
            continue
        low, high, calls, tokens = found
        per_call.append(f"≈ {units.energy(low / calls)}–{units.energy(high / calls)}")
        per_1k.append(f"≈ {units.energy(low / tokens * 1000)}–{units.energy(high / tokens * 1000)}" if tokens else "–")
    table = pd.DataFrame(
        {
            "workload": per_workload["workload"],
            "provider": [estimates.provider_name(p) for p in per_workload["provider"]],
            "calls": per_workload["calls"],
            "share of calls": (per_workload["share of calls"] * 100).round().astype(int).astype(str) + " %",
            "energy per call": per_call,
            "energy per 1k tokens": per_1k,
        }
    )
    st.dataframe(
        table,
        hide_index=True,
        width="stretch",
        column_config={"calls": st.column_config.NumberColumn("calls", format="localized")},
    )
    st.caption(
        "Joule Cloud: measured by the service on every call. "
        + (
            "Other providers: a range estimated by EcoLogits from each call's model, output tokens and latency "
            "(≈ low–high), not measured, never added to measured totals."
            if estimates.available()
            else "Other providers send no energy figure; `pip install 'joule-otel[estimates]'` adds EcoLogits' "
            "estimated range."
        )
        + (
            f" No estimate for {', '.join(sorted(unestimated))}: EcoLogits has no figures for its models."
            if unestimated and ranges
            else ""
        )
    )


def _estimated_ranges(other: pd.DataFrame | None) -> dict[tuple[str, str], tuple[float, float, int, int]]:
    """(workload, provider) → estimated energy low and high (J) over the calls estimated, and their calls and tokens."""
    found: dict[tuple[str, str], tuple[float, float, int, int]] = {}
    if other is None:
        return found
    for item in other.itertuples():
        estimate = estimates.estimate(
            item.provider, item.model, int(item.calls), item.mean_output_tokens, item.mean_latency_s
        )
        if estimate is None:
            continue
        low, high, calls, tokens = found.get((item.workload, item.provider), (0.0, 0.0, 0, 0))
        found[(item.workload, item.provider)] = (
            low + estimate.low_j,
            high + estimate.high_j,
            calls + int(item.calls),
            tokens + int(item.tokens),
        )
    return found
