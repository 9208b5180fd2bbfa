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
    """Draw the tab."""
    flows = page["flows"]
    if flows.empty:
        st.info("No routed calls in this selection.")
    else:
        show(st, charts.sankey(flows), flows, "router_flows")
        st.dataframe(
            pd.DataFrame(
                {
                    "requested model": flows["requested"],
                    "routed to": flows["routed"],
                    "energy": flows["energy_j"].map(units.energy),
                    "calls": flows["calls"].map(lambda v: text_number(v, ",.0f")),
                }
            ),
            hide_index=True,
            width="stretch",
        )
