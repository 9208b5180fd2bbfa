"""The What if tab: one workload's calls re-priced on another model, tier or region, from rates this ledger measured."""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from joule_otel import _units as units
from joule_otel.dashboard._data import load_what_if
from joule_otel.dashboard._sidebar import View


def render(view: View, page: dict[str, Any]) -> None:
    """One workload's calls re-priced on another model, tier or region, from rates this ledger measured."""
    workloads = [w for w in view.opts["workloads"] if not view.filters.workloads or w in view.filters.workloads]
    if not workloads:
        st.info("No workloads in this selection.")
        return
    pick_workload, pick_model, pick_tier, pick_region = st.columns(4)
    as_now = "as now"
    workload = pick_workload.selectbox("Workload", workloads, key="wi_workload")
    model = pick_model.selectbox("Pinned model", [as_now, *view.opts["models"]], key="wi_model")
    tier = pick_tier.selectbox("Tier", [as_now, *view.opts["tiers"]], key="wi_tier")
    region = pick_region.selectbox("Region", [as_now, *view.opts["regions"]], key="wi_region")
    if model == tier == region == as_now:
        st.info(
            "Choose a model, tier or region above: the page re-prices this workload's calls at the rates "
            "measured there."
        )
        return
    result = load_what_if(
        view.source.signature(),
        view.source,
        view.filters,
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
