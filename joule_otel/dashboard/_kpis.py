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

    earlier = f"vs the previous {units.span(view.end - view.start)}"
    no_earlier = not prev or not prev.get("calls")

    def delta(key: str) -> dict[str, Any]:
        """A metric's change against the previous period, short enough to read whole; its period said apart."""
        if no_earlier:
            return {"delta": "no earlier data", "delta_arrow": "off", "delta_color": "off"}
        before, current = prev.get(key), kpi.get(key)
        if before in (None, 0) or current is None or pd.isna(before) or pd.isna(current):
            return {}
        return {"delta": f"{(current - before) / before:+.0%}"}  # the period is said once, in the caption

    def colored(key: str, color: str) -> dict[str, Any]:
        found = delta(key)
        found.setdefault("delta_color", color)
        return found

    # -- KPI row --------------------------------------------------------------------------------
    others = kpi["calls"] - kpi["joule_calls"]
    # two rows: seven figures in one row are cut off on a laptop's screen (1280 px with the sidebar open)
    cols = [*st.columns(4), *st.columns(4)[:3]]
    cols[0].metric("Energy", units.energy(kpi["energy_j"]), **colored("energy_j", "inverse"))
    cols[1].metric(
        "Carbon (CO2e)", units.carbon(kpi["carbon_mg"]).removesuffix(" CO2e"), **colored("carbon_mg", "inverse")
    )
    cols[2].metric(
        "Calls, all providers" if others else "Calls",
        f"{kpi['calls']:,}",
        **colored("calls", "off"),
        help=f"{kpi['joule_calls']:,} served by Joule Cloud, {others:,} by other providers (not measured)"
        if others
        else "Every call in this selection, including refused and failed ones.",
    )
    cols[3].metric(
        "Energy per call",
        units.energy(kpi["mean_j_per_call"]),
        **colored("mean_j_per_call", "inverse"),
        help=f"Joule Cloud's measured energy divided by its {kpi['energy_calls']:,} calls with a figure "
        "(refused and failed calls, and other providers' calls, have none).",
    )
    cols[4].metric(
        "Per 1k tok. out",
        units.energy(kpi["j_per_1k_output"]),
        **colored("j_per_1k_output", "inverse"),
        help="Energy per 1000 output tokens, of generation calls only (chat, completions, responses): "
        "embeddings produce no output tokens.",
    )
    cols[5].metric("Asked for auto", f"{(kpi['auto_share'] or 0):.0%}", **colored("auto_share", "off"))
    cols[6].metric("402 refused", f"{kpi['refused_402']:,}", **colored("refused_402", "inverse"))
    st.caption(
        " · ".join(
            part
            for part in (
                units.energy_wh(kpi["energy_j"]),
                units.energy_equivalent(kpi["energy_j"]),
                units.carbon_equivalent(kpi["carbon_mg"]),
                None if no_earlier else f"changes {earlier}",
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
