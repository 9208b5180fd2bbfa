"""The Overview tab: energy over time split as chosen, by workload, model, region and tier, and the treemap."""

from __future__ import annotations

from typing import Any

import streamlit as st

from joule_otel.dashboard import _charts as charts
from joule_otel.dashboard._data import show
from joule_otel.dashboard._sidebar import View


def render(view: View, page: dict[str, Any]) -> None:
    """Draw the tab."""
    st.radio("Split energy by", view.split_choices, key="f_split", horizontal=True)
    over_time = page["over_time"]
    if over_time.empty:
        st.info("No energy recorded in this selection.")
    else:
        show(
            st,
            charts.over_time(
                over_time,
                bucket=view.bucket,
                start=view.start,
                end=view.end,
                split_label=view.split_by,
                tz_name=view.tz_name,
                colours=view.colours,
            ),
            over_time,
            "energy_over_time",
        )
        if (over_time["calls"] == 1).any():
            st.caption("A hatched bar rests on a single call.")
    left, right = st.columns(2)
    for col, dim in ((left, "workload"), (right, "model"), (left, "region"), (right, "tier")):
        frame = page["by"][dim]
        if frame["energy_j"].fillna(0).gt(0).any():
            show(col, charts.breakdown(frame, dim, view.colours), frame, f"by_{dim}")
    if not page["treemap"].empty:
        show(st, charts.treemap(page["treemap"], view.colours), page["treemap"], "treemap")
