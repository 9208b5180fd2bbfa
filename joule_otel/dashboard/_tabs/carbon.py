"""The Carbon tab: carbon by region, and where moving a workload would cut it."""

from __future__ import annotations

from typing import Any

import streamlit as st

from joule_otel import _units as units
from joule_otel.dashboard import _charts as charts
from joule_otel.dashboard._data import show
from joule_otel.dashboard._sidebar import View


def render(view: View, page: dict[str, Any]) -> None:
    """Draw the tab."""
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
            now, then = float(savings["carbon_mg"].sum()), float(savings["if_cleanest_mg"].sum())
            if now > then and (now - then) / now >= 0.01:  # a saving under 1 % is not worth a headline
                st.markdown(
                    f"**Served from {units.plain(cleanest)}, these workloads would have emitted "
                    f"{units.carbon(now - then)} less ({(now - then) / now:.0%}): {units.carbon(then)} instead of "
                    f"{units.carbon(now)}.**"
                )
