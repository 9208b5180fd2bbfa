"""The Overview tab: energy over time split as chosen (a tag too), its chargeback table, breakdowns, the treemap."""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from joule_otel import _units as units
from joule_otel.dashboard import _charts as charts
from joule_otel.dashboard import _queries as queries
from joule_otel.dashboard._data import downloads, show
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
    _chargeback(view, page["chargeback"])
    left, right = st.columns(2)
    for col, dim in ((left, "workload"), (right, "model"), (left, "region"), (right, "tier")):
        frame = page["by"][dim]
        if frame["energy_j"].fillna(0).gt(0).any():
            show(col, charts.breakdown(frame, dim, view.colours), frame, f"by_{dim}")
    if not page["treemap"].empty:
        show(st, charts.treemap(page["treemap"], view.colours), page["treemap"], "treemap")


def _chargeback(view: View, table: pd.DataFrame) -> None:
    """The split as a table for chargeback: what ``joule-otel report --by`` gives, with its downloads."""
    if table.empty:
        return
    name = view.split_by.removeprefix(queries.TAG_SPLIT)
    st.markdown(f"**Chargeback by {units.plain(name)}**")
    shown = pd.DataFrame(
        {
            name: table["group"],
            "calls": table["calls"].map(lambda v: f"{int(v):,}"),
            "tokens in": table["input_tokens"].map(lambda v: f"{int(v):,}" if pd.notna(v) else "–"),
            "tokens out": table["output_tokens"].map(lambda v: f"{int(v):,}" if pd.notna(v) else "–"),
            "energy": table["energy_j"].map(lambda v: units.energy(v) if pd.notna(v) else "–"),
            "carbon": table["carbon_mg"].map(lambda v: units.carbon(v) if pd.notna(v) else "–"),
            "share of energy": table["share"].map(lambda v: f"{v:.1%}" if pd.notna(v) else "–"),
        }
    )
    st.dataframe(shown, hide_index=True, width="stretch")
    downloads(st, table.rename(columns={"group": name}), f"chargeback_{name}")
