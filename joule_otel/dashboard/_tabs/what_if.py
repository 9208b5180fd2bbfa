"""The What if tab: the savings this ledger supports, ranked, then any workload re-priced by hand.

Every figure comes from rates this ledger measured: a model's or tier's J per token, a region's carbon per joule.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from joule_otel import _units as units
from joule_otel.dashboard import _queries as queries
from joule_otel.dashboard._data import load_what_if
from joule_otel.dashboard._sidebar import View

AS_NOW = "as now"
_CHANGE_KEYS = {"model": "wi_model", "tier": "wi_tier", "region": "wi_region"}


def _wording(move: queries.Move, markdown: bool = True) -> str:
    """The change as words: names as code spans in markdown, as they are in a table's cells."""
    name = units.plain(move.to) if markdown else str(move.to)
    return {"model": f"pin {name}", "tier": f"move to the {name} tier", "region": f"run in {name}"}[move.change]


def _open(move: queries.Move) -> None:
    """Show a recommendation's detailed table below: its choices become the pickers' (before they are drawn)."""
    st.session_state["wi_workload"] = move.workload
    for change, key in _CHANGE_KEYS.items():
        st.session_state[key] = move.to if change == move.change else AS_NOW


def _latency(move: queries.Move, efficiency: pd.DataFrame) -> str:
    """The median latency of generation on the model a move pins, beside the models the workload ran on now."""
    if move.change != "model" or efficiency.empty:
        return ""
    generation = efficiency[(efficiency["kind"] == "generation") & efficiency["p50_duration_ms"].notna()]
    found = generation[generation["model"] == move.to]["p50_duration_ms"]
    return f"{found.iloc[0]:,.0f} ms" if not found.empty else ""


def recommendations(page: dict[str, Any]) -> None:
    """The best moves the ledger supports, ranked, each one click from its detailed table."""
    sure, held = queries.recommendations(page["moves"])
    st.subheader("What would have saved the most")
    if not sure:
        st.info(
            "No change of model, tier or region would have saved energy or carbon at the rates this ledger measured "
            f"over at least {queries.MIN_RATE_CALLS} calls each."
            if not held
            else "Nothing to recommend yet: every saving found rests on too few calls (below)."
        )
    else:
        efficiency = page["efficiency"]
        table = pd.DataFrame(
            {
                "workload": [m.workload for m in sure],
                "change": [_wording(m, markdown=False) for m in sure],
                "energy saved": [
                    "–" if m.change == "region" else units.energy(m.energy_now_j - m.energy_then_j) for m in sure
                ],
                "carbon saved": [units.carbon(m.carbon_now_mg - m.carbon_then_mg) for m in sure],
                "then (now)": [f"{units.energy(m.energy_then_j)} ({units.energy(m.energy_now_j)})" for m in sure],
                "measured over": [f"{m.basis_calls:,} calls" for m in sure],
                "median latency": [_latency(m, efficiency) or "–" for m in sure],
            }
        )
        st.dataframe(
            table,
            hide_index=True,
            width="stretch",
            column_config={
                "then (now)": st.column_config.TextColumn(help="The energy after the change, and as the calls ran"),
                "measured over": st.column_config.TextColumn(help="The calls the new rate was measured on"),
                "median latency": st.column_config.TextColumn(help="A call's median duration on the model moved to"),
            },
        )
        st.caption(
            "Each saving re-prices the workload's calls in this period at the rates this ledger measured on that "
            "model or tier (J per output token; per input token for embeddings), or at that region's measured "
            f"carbon per joule. Ranked by energy saved, then carbon. Only rates measured over at least "
            f"{queries.MIN_RATE_CALLS} calls are used."
        )
        buttons = st.columns(2)  # two to a row: a workload's name and the change fit on the button
        for i, move in enumerate(sure[:4]):
            column = buttons[i % 2]
            column.button(
                f"Details: {units.plain(move.workload)}, {_wording(move)}",  # labels are markdown: names as code
                key=f"wi_open_{move.workload}_{move.change}_{move.to}",
                on_click=_open,
                args=(move,),
            )
    for move in held:
        saved = (
            units.carbon(move.carbon_now_mg - move.carbon_then_mg)
            if move.change == "region"
            else units.energy(move.energy_now_j - move.energy_then_j)
        )
        st.caption(
            f"Held back: {units.plain(move.workload)} could {_wording(move)} and save {saved}, but that rate rests on "
            f"{move.basis_calls:,} call{'s' if move.basis_calls != 1 else ''} (fewer than {queries.MIN_RATE_CALLS})."
        )


def render(view: View, page: dict[str, Any]) -> None:
    """The ranked savings, then one workload's calls re-priced on the model, tier or region chosen."""
    recommendations(page)
    workloads = [w for w in view.opts["workloads"] if not view.filters.workloads or w in view.filters.workloads]
    if not workloads:
        st.info("No workloads in this selection.")
        return
    st.subheader("Re-price a workload")
    pick_workload, pick_model, pick_tier, pick_region = st.columns(4)
    as_now = AS_NOW
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
    energy_words = (
        f"saved {units.energy(saved_j)}" if saved_j >= 0 else f"cost +{units.energy(-saved_j)} more"
    ) + f" ({units.energy(result.energy_then_j)} in all, against {units.energy(result.energy_now_j)} as it ran)"
    carbon_words = f"{units.carbon(saved_mg)} less" if saved_mg >= 0 else f"+{units.carbon(-saved_mg)} more"
    moves = [
        f"pinned to {units.plain(model)}" if model != as_now else "",
        f"on the {units.plain(tier)} tier" if tier != as_now else "",
        f"in {units.plain(region)}" if region != as_now else "",
    ]
    change = ", ".join(m for m in moves if m) or "as it ran"
    st.markdown(f"**{units.plain(workload)} {change} would have {energy_words} in this period, and {carbon_words}.**")
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
