"""The Bill tab: the ledger against Joule Cloud's bill for the period shown — what it explains, what it misses.

The figures are :func:`joule_otel._reconcile.reconcile`'s, the same as ``joule-otel reconcile``'s for the same bill,
ledger, period and time zone. A bill is opened read-only, from a path or dropped on the page; so is the ledger.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from joule_otel import _reconcile as rc
from joule_otel import _units as units
from joule_otel._config import JOULE_OTEL_BILL
from joule_otel.dashboard._sidebar import View


@st.cache_data(ttl=5, show_spinner=False, max_entries=8)
def load_reconciliation(
    ledger_signature: tuple[Any, ...],
    bill_signature: tuple[Any, ...],
    _ledger: Path,
    _bill: Path,
    start: Any,
    end: Any,
    tz_name: str,
) -> dict[str, Any]:
    """The reconciliation of a bill with the ledger over [start, end), as plain data (cached per file signature)."""
    result = rc.reconcile(_bill, [_ledger], start=start, end=end, tz=rc.zone(tz_name))
    return {
        "summary": rc.to_json(result),
        "missing": result.missing.to_pandas() if result.missing is not None else pd.DataFrame(),
        "differing": result.differing.to_pandas() if result.differing is not None else pd.DataFrame(),
        "unbilled": result.unbilled.to_pandas() if result.unbilled is not None else pd.DataFrame(),
    }


READABLE = {
    "receipt_id": "receipt",
    "billed_at": "billed",
    "started_at": "started",
    "energy_j": "energy (J)",
    "carbon_mg": "carbon (mg CO2e)",
    "ledger_value": "in the ledger",
    "bill_value": "on the bill",
    "difference": "ledger − bill",
}


def _signature(path: Path) -> tuple[Any, ...]:
    try:
        stat = path.stat()
    except OSError:
        return (str(path), None)
    return (str(path), stat.st_mtime_ns, stat.st_size)


def _dropped(upload: Any) -> Path:
    """A dropped file, kept under a name made of its contents (so the cache sees a new drop as new)."""
    data = upload.getvalue()
    suffix = Path(upload.name).suffix.lower() or ".csv"
    path = Path(tempfile.gettempdir()) / f"joule-otel-bill-{hashlib.sha256(data).hexdigest()[:16]}{suffix}"
    if not path.exists():
        path.write_bytes(data)
    return path


def render(view: View, page: dict[str, Any]) -> None:
    """Draw the tab."""
    if view.source.kind != "ledger":
        st.info("Open a ledger (not an export or the sample) to check it against a bill.")
        return
    left, right = st.columns([3, 2])
    typed = left.text_input(
        "Bill file (CSV, JSON Lines, JSON or Parquet)",
        value=os.environ.get(JOULE_OTEL_BILL, ""),
        key="bill_path",
        help="Joule Cloud's receipts for a period; opened read-only. JOULE_OTEL_BILL sets the default.",
    )
    upload = right.file_uploader(
        "…or drop one here", type=["csv", "jsonl", "ndjson", "json", "parquet"], key="bill_drop"
    )
    if upload is not None:
        bill = _dropped(upload)
        name = upload.name
    elif typed.strip():
        bill = Path(typed.strip()).expanduser()
        name = str(bill)
    else:
        st.info(
            "Choose the bill to check the ledger against: `joule-otel simulate --bill-out FILE` writes one, "
            "`joule-otel demo` leaves one beside its ledger."
        )
        return
    try:
        found = load_reconciliation(
            view.source.signature(), _signature(bill), view.source.path, bill, view.start, view.end, view.tz_name
        )
    except (rc.BillError, ValueError, OSError) as exc:
        st.error(units.plain(" ".join(str(exc).split())))
        return
    summary = found["summary"]
    coverage = summary["coverage"]
    st.caption(
        f"Bill {units.plain(name)} · {units.plain(units_period(view))} · the same figures as `joule-otel reconcile`"
    )
    cols = st.columns(4)
    cols[0].metric(f"Billed: {coverage['billed_calls']:,} receipts", units.energy(coverage["billed_j"]))
    cols[1].metric(f"In the ledger: {coverage['found_calls']:,} receipts", units.energy(coverage["found_j"]))
    cols[2].metric("Coverage of joules", f"{coverage['joules_share']:.1%}")
    cols[3].metric("Coverage of receipts", f"{coverage['calls_share']:.1%}")
    if summary["explained"]:
        st.success("The ledger explains this bill: every billed joule is in it, and no figure differs.")
    missing = summary["billed_not_in_ledger"]
    days = pd.DataFrame(coverage["by_day"])
    if not days.empty:
        days["not in the ledger (J)"] = days["billed_j"] - days["found_j"]
        chart = days.rename(columns={"found_j": "in the ledger (J)"}).set_index("day")
        st.bar_chart(chart[["in the ledger (J)", "not in the ledger (J)"]], height=220)
    if missing["calls"]:
        st.subheader(f"Billed but in no ledger: {missing['calls']:,} receipts, {units.energy(missing['energy_j'])}")
        for group in missing["groups"][:3]:  # what to act on first, as the command says it
            st.markdown("- " + units.plain(rc.group_line(group)))
        groups = pd.DataFrame(missing["groups"])
        groups["token"] = groups["token"].fillna("(no token on the bill)")
        table = pd.DataFrame(
            {
                "token": groups["token"],
                "calls": groups["calls"],
                "energy": groups["energy_j"].map(units.energy),
                "hours": groups["hours"],
                "top model": groups["model"].fillna("–"),
                "share of calls": groups["model_share"],
                "region": groups["region"].fillna("–"),
                "tier": groups["tier"].fillna("–"),
            }
        )
        st.dataframe(
            table,
            hide_index=True,
            width="stretch",
            column_config={
                "calls": st.column_config.NumberColumn(format="localized"),
                "share of calls": st.column_config.ProgressColumn(min_value=0.0, max_value=1.0, format="percent"),
            },
        )
        token = st.selectbox("Receipts of", list(table["token"]), key="bill_group")
        receipts = found["missing"]
        chosen = receipts[receipts["token"].fillna("(no token on the bill)") == token]
        chosen = chosen.assign(billed_at=chosen["billed_at"].dt.tz_convert(view.tz_name).dt.tz_localize(None))
        st.dataframe(chosen.rename(columns=READABLE), hide_index=True, width="stretch")
    differing = summary["differing"]
    if differing["calls"]:
        st.subheader(f"Figures that differ from the bill: {differing['calls']:,} receipts")
        st.dataframe(found["differing"].rename(columns=READABLE), hide_index=True, width="stretch")
    unbilled = summary["in_ledger_not_billed"]
    if unbilled["calls"]:
        st.subheader(
            f"In the ledger but not on this bill: {unbilled['calls']:,} receipts, {units.energy(unbilled['energy_j'])}"
        )
        st.caption("Another period or account, or a receipt header the service never issued.")
        st.dataframe(
            found["unbilled"].drop(columns=["ledger"]).rename(columns=READABLE), hide_index=True, width="stretch"
        )


def units_period(view: View) -> str:
    """The period as the tab states it."""
    start, end = view.start.astimezone(view.tz), view.end.astimezone(view.tz)
    return f"{start:%d %b %Y %H:%M} – {end:%d %b %Y %H:%M} {view.tz_name}"
