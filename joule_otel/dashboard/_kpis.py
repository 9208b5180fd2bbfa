"""The row of key figures above the tabs, each against the previous period of the same length."""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from joule_otel import _units as units
from joule_otel.dashboard._sidebar import View


def render(view: View, page: dict[str, Any]) -> None:
    """Draw the KPI row, its caption, and a word when the period holds no calls or no energy."""
    kpi = page["kpis"]
    prev = kpi["previous"] or {}

    def delta(key: str) -> str | None:
        before, current = prev.get(key), kpi.get(key)
        if before in (None, 0) or current is None or pd.isna(before) or pd.isna(current):
            return None
        return f"{(current - before) / before:+.0%} vs previous {units.span(view.end - view.start)}"

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
                f"times in {view.tz_name}",
            )
            if part
        )
    )
    if not kpi["calls"]:
        st.info(
            f"No calls in this period. The ledger holds calls from {view.first.astimezone(view.tz):%d %b %Y %H:%M} to "
            f"{view.last.astimezone(view.tz):%d %b %Y %H:%M}: choose *All data* or another range."
        )
    elif not kpi["energy_j"]:
        st.warning(
            "These calls carry no energy figures (all were refused, failed, or served by another provider). "
            "Check the Receipts, Budgets and Migration tabs."
        )
