"""The Migration tab: calls still on another provider, per workload, over time.

Their energy is estimated (EcoLogits, a range), never measured and never added to measured sums.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

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
    show(st, charts.migration_share(trend, trend_bucket, view.start, view.end, view.tz_name), trend, "migration_share")
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
