"""What the dashboard's pages share: cached loaders, readable column names, charts with their downloads.

Each loader is one short visit to the ledger for a batch of queries; :func:`show` draws a chart with its figures as
CSV and Parquet downloads beneath it.
"""

from __future__ import annotations

import functools
import io
import math
from datetime import datetime
from typing import Any

import pandas as pd
import streamlit as st

from joule_otel._budgets import Budget
from joule_otel.dashboard import _queries as queries
from joule_otel.dashboard._sources import Source

# column names a person reads, in tables and exports alike (comments, never bare strings: Streamlit's "magic"
# renders a string statement on the page)
READABLE = {
    "group": "value",
    "bucket": "time",
    "energy_j": "energy (J)",
    "carbon_mg": "carbon (mg CO2e)",
    "calls": "calls",
    "errors": "errors",
    "output_tokens": "output tokens",
    "j_per_output_token": "J per output token",
    "j_per_input_token": "J per input token",
    "j_per_call": "J per call",
    "p50_duration_ms": "median duration (ms)",
    "p95_duration_ms": "p95 duration (ms)",
    "p50_ttft_ms": "median time to first chunk (ms)",
    "mg_per_j": "mg CO2e per J",
    "g_per_kwh": "g CO2e per kWh",
    "if_cleanest_mg": "carbon at the cleanest region (mg CO2e)",
    "cleanest_region": "cleanest region",
    "bin_start_j": "bin from (J)",
    "bin_end_j": "bin to (J)",
    "cumulative_j": "energy this month so far (J)",
    "duration_ms": "duration (ms)",
    "ttft_ms": "time to first chunk (ms)",
    "measured_j": "measured energy (J)",
    "tokens": "tokens",
}


@st.cache_data(ttl=5, show_spinner=False)
def load_options(signature: tuple[Any, ...], _source: Source) -> dict[str, Any]:
    """Filter choices and the data's time span (cached per data signature)."""
    with _source.connect() as con:
        return queries.options(con)


@st.cache_data(ttl=5, show_spinner=False)
def load_page(
    signature: tuple[Any, ...],
    _source: Source,
    filters: queries.Filters,
    split_by: str,
    bucket: str,
    tz_name: str,
    budgets: tuple[Budget, ...],
    search: str,
    as_of: datetime,
) -> dict[str, Any]:
    """Every query of the page, in one short visit to the ledger."""
    with _source.connect() as con:
        page: dict[str, Any] = {
            "kpis": queries.kpis(con, filters),
            "over_time": queries.energy_over_time(con, filters, split_by, bucket, tz_name),
            "by": {dim: queries.breakdown(con, filters, dim) for dim in ("workload", "model", "region", "tier")},
            "chargeback": queries.chargeback(con, filters, split_by),
            "treemap": queries.workload_model(con, filters),
            "flows": queries.router_flows(con, filters),
            "efficiency": queries.model_efficiency(con, filters),
            "moves": queries.moves(con, filters),
            "regions": queries.carbon_by_region(con, filters),
            "savings": queries.carbon_savings(con, filters),
            "histogram": queries.energy_histogram(con, filters),
            "sample": queries.latency_sample(con, filters),
            "receipts": queries.receipts(con, filters, search),
            "migration": queries.migration(con, filters, bucket, tz_name),
            "budgets": None,
            "burn": None,
        }
        elsewhere = page["migration"]
        others = elsewhere[elsewhere["provider"] != queries.JOULE_PROVIDER]
        page["other_calls"] = queries.other_provider_calls(con, filters) if not others.empty else None
        if budgets:
            page["budgets"] = queries.budget_status(con, filters, list(budgets), as_of)
            page["burn"] = queries.budget_burn(con, filters, list(budgets), as_of)
    return page


@st.cache_data(ttl=5, show_spinner=False)
def load_what_if(
    signature: tuple[Any, ...],
    _source: Source,
    filters: queries.Filters,
    workload: str,
    model: str | None,
    tier: str | None,
    region: str | None,
) -> queries.WhatIf:
    """The what-if figures for one choice (cached like the page)."""
    with _source.connect() as con:
        return queries.what_if(con, filters, workload, model=model, tier=tier, region=region)


def export_rows(source: Source, filters: queries.Filters, search: str, fmt: str) -> bytes:
    """Every filtered row as CSV or Parquet bytes, computed only when a download is clicked."""
    with source.connect() as con:
        frame = queries.receipts(con, filters, search, limit=None)
    return _encode(frame, fmt)


def _encode(frame: pd.DataFrame, fmt: str) -> bytes:
    buffer = io.BytesIO()
    if fmt == "csv":
        frame.to_csv(buffer, index=False)
    else:
        frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def text_number(value: Any, fmt: str) -> str:
    """A number as a table shows it, and "–" where there is none (never "None" or "nan")."""
    if value is None or pd.isna(value):
        return "–"
    return format(int(value) if fmt.endswith("d") else float(value), fmt)


def three_figures(value: Any) -> str:
    """A measured figure to three significant figures, never in exponent form ("0.000423", "1,230"); "–" if none."""
    if value is None or pd.isna(value):
        return "–"
    number = float(value)
    if number == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(number)))
    return f"{round(number, 2 - magnitude):,.{max(0, 2 - magnitude)}f}"


def readable(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame with the column names a person reads."""
    return frame.rename(columns=READABLE)


def show(container: Any, fig: Any, frame: pd.DataFrame, key: str) -> None:
    """A chart, and its figures as CSV and Parquet downloads beneath it."""
    container.plotly_chart(fig, width="stretch", key=key)
    downloads(container, frame, key)


def downloads(container: Any, frame: pd.DataFrame, key: str) -> None:
    """A frame's figures as CSV and Parquet downloads, their columns named as a person reads them."""
    data = readable(frame)
    formats = (("CSV", "csv", "text/csv"), ("Parquet", "parquet", "application/octet-stream"))
    for column, (label, fmt, mime) in zip(container.columns([1, 1, 4]), formats, strict=False):
        column.download_button(
            label,
            # encoded when clicked, never on every rerun (15 charts' CSV and Parquet were most of a warm page)
            data=functools.partial(_encode, data, fmt),
            file_name=f"{key}.{fmt}",
            mime=mime,
            key=f"{key}_{fmt}",
            type="tertiary",
        )
