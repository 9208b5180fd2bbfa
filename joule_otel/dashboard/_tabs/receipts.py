"""The Receipts tab: the newest calls, searchable, with exports of every filtered row."""

from __future__ import annotations

import os
from typing import Any

import streamlit as st

from joule_otel._config import JOULE_OTEL_TRACE_URL
from joule_otel.dashboard._data import export_rows, text_number
from joule_otel.dashboard._sidebar import View

FIRST_COLUMNS = ("started_at", "workload", "routed_to", "energy_j", "status_code", "receipt_id")
"""What a person reads first, all of it in view without scrolling sideways; the rest on demand."""


def render(view: View, page: dict[str, Any]) -> None:
    """Draw the tab."""
    search_box, every = st.columns([3, 1])
    search_box.text_input("Search receipt id or workload", key="search")
    show_all = every.toggle("Show every column", key="receipts_all")
    search = st.session_state.get("search", "")
    table = page["receipts"]
    template = os.environ.get(JOULE_OTEL_TRACE_URL, "").strip()
    if template and "{trace_id}" in template:
        table = table.assign(
            trace=[template.replace("{trace_id}", t) if isinstance(t, str) else None for t in table["trace_id"]]
        )
    table = table.assign(started_at=table["started_at"].dt.tz_convert(view.tz_name).dt.tz_localize(None))
    for column, fmt in (
        ("energy_j", ",.3f"),
        ("carbon_mg", ",.3f"),
        ("input_tokens", ",.0f"),
        ("output_tokens", ",.0f"),
        ("duration_ms", ",.0f"),
        ("ttft_ms", ",.0f"),
    ):
        table[column] = table[column].map(lambda v, fmt=fmt: text_number(v, fmt))
    for column in (
        "receipt_id",
        "workload",
        "service",
        "operation",
        "requested_model",
        "routed_to",
        "tier",
        "region",
        "error_type",
        "trace_id",
    ):
        table[column] = table[column].fillna("–")
    table["status_code"] = table["status_code"].map(lambda v: text_number(v, "d"))
    first = [*FIRST_COLUMNS, *(["trace"] if "trace" in table else [])]
    st.dataframe(
        table,
        hide_index=True,
        width="stretch",
        column_order=None if show_all else first,
        column_config={
            "started_at": st.column_config.DatetimeColumn(f"started ({view.tz_name})", format="YYYY-MM-DD HH:mm:ss"),
            "receipt_id": "receipt",
            "requested_model": "requested model",
            "routed_to": "routed to",
            "energy_j": "energy (J)",
            "carbon_mg": "carbon (mg CO2e)",
            "input_tokens": "input tokens",
            "output_tokens": "output tokens",
            "duration_ms": "duration (ms)",
            "ttft_ms": "first chunk (ms)",
            "status_code": "status",
            "error_type": "error",
            "trace_id": "trace id",
            "trace": st.column_config.LinkColumn("trace", display_text="open trace"),
        },
    )
    st.caption(f"Newest {len(table):,} rows shown; the export holds every filtered row.")
    left, right, _ = st.columns([1, 1, 4])
    left.download_button(
        "Export CSV",
        data=lambda: export_rows(view.source, view.filters, search, "csv"),
        file_name="inference_calls.csv",
        mime="text/csv",
        key="export_csv",
    )
    right.download_button(
        "Export Parquet",
        data=lambda: export_rows(view.source, view.filters, search, "parquet"),
        file_name="inference_calls.parquet",
        mime="application/octet-stream",
        key="export_parquet",
    )
