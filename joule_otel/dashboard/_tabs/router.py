"""The Router tab: what was asked for against what the router served."""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from joule_otel import _units as units
from joule_otel.dashboard import _charts as charts
from joule_otel.dashboard._data import show, text_number
from joule_otel.dashboard._sidebar import View


def render(view: View, page: dict[str, Any]) -> None:
    """What ``auto`` chose, by energy or calls; pinned calls served as pinned only when asked for (greyed)."""
    flows = page["flows"]
    if flows.empty:
        st.info("No routed calls in this selection.")
        return
    weigh, pinned = st.columns([2, 1])
    by = weigh.radio("Weigh flows by", ["energy", "calls"], key="router_by", horizontal=True)
    with_pinned = pinned.toggle("Show pinned calls too", key="router_pinned")
    routed = flows[flows["requested"] != flows["routed"]]
    shown = flows if with_pinned else routed
    if shown.empty:
        st.info(
            "Every call in this selection asked for a model and was served by it: the router chose nothing. "
            "Turn on *Show pinned calls too* to see them."
        )
    else:
        weight = "energy_j" if by == "energy" else "calls"
        show(st, charts.sankey(shown, weight, view.colours), shown, "router_flows")
        auto = flows[flows["requested"] == "auto"]
        if not auto.empty:
            share = auto["energy_j"].sum() / flows["energy_j"].sum()
            st.caption(
                f"`auto` chose among {auto['routed'].nunique()} models for {int(auto['calls'].sum()):,} calls "
                f"({share:.0%} of the energy in this selection)."
                + ("" if with_pinned else " Pinned calls served as pinned are hidden.")
            )
    st.dataframe(
        pd.DataFrame(
            {
                "requested model": shown["requested"],
                "routed to": shown["routed"],
                "energy": shown["energy_j"].map(units.energy),
                "calls": shown["calls"].map(lambda v: text_number(v, ",.0f")),
            }
        ),
        hide_index=True,
        width="stretch",
    )
