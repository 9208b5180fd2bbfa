"""The Efficiency tab: energy per token by model, like with like, the energy histogram and latency."""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from joule_otel.dashboard import _charts as charts
from joule_otel.dashboard._data import show, text_number, three_figures
from joule_otel.dashboard._sidebar import View


def render(view: View, page: dict[str, Any]) -> None:
    """Draw the tab."""
    eff = page["efficiency"]
    if eff.empty:
        st.info("No served calls in this selection.")
    else:
        generation = eff[eff["kind"] == "generation"]
        embeddings = eff[eff["kind"] == "embeddings"]
        left, right = st.columns(2)
        if generation["j_per_output_token"].notna().any():
            show(
                left,
                charts.per_token(
                    generation,
                    "j_per_output_token",
                    "Generation: energy per output token",
                    "per output token",
                    view.colours,
                ),
                generation,
                "j_per_output_token",
            )
        if embeddings["j_per_input_token"].notna().any():
            show(
                right,
                charts.per_token(
                    embeddings,
                    "j_per_input_token",
                    "Embeddings: energy per input token",
                    "per input token",
                    view.colours,
                ),
                embeddings,
                "j_per_input_token",
            )
        table = pd.DataFrame(
            {
                "model": eff["model"],  # the model that served: the tab is of routed models
                "kind": eff["kind"],
                "J per output token": eff["j_per_output_token"].map(three_figures),
                "J per input token": eff["j_per_input_token"].map(three_figures),
                "J per call": eff["j_per_call"].map(three_figures),
                "calls": eff["calls"].map(lambda v: text_number(v, ",.0f")),
                "p50 ms": eff["p50_duration_ms"].map(three_figures),
                "p95 ms": eff["p95_duration_ms"].map(three_figures),
                "TTFT ms": eff["p50_ttft_ms"].map(three_figures),
            }
        )
        st.dataframe(
            table,
            hide_index=True,
            width="stretch",
            column_config={  # short headers, so the table fits a laptop's screen; the help says them in full
                "p50 ms": st.column_config.TextColumn(help="Median duration of a call, in milliseconds"),
                "p95 ms": st.column_config.TextColumn(help="95th percentile of a call's duration, in milliseconds"),
                "TTFT ms": st.column_config.TextColumn(
                    help="Time to first token: a stream's median wait for its first chunk"
                ),
            },
        )
    hist = page["histogram"]
    if not hist.empty:
        show(st, charts.histogram(hist), hist, "energy_histogram")
    sample = page["sample"]
    served = sample[sample["energy_j"].fillna(0) > 0] if not sample.empty else sample
    if not served.empty:  # a call without energy has no place on a log axis, nor its model in the legend
        show(st, charts.latency_energy(served, view.colours), served, "latency_energy")
        streams = served[served["ttft_ms"].notna()]
        if not streams.empty:
            show(st, charts.ttft(streams, view.colours), streams, "ttft")
