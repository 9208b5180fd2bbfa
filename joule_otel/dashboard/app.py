"""The joule-otel energy dashboard (Streamlit): ``joule-otel dashboard``, or ``streamlit run`` on this file.

Order: page config → sidebar (source, time, filters; mirrored in the URL: :mod:`._sidebar`) → the page's queries, in
one short visit to the ledger (:mod:`._data`) → KPI row (:mod:`._kpis`) → one module per tab (:mod:`._tabs`). The
ledger is opened for each batch of queries and released at once, never held across reruns, so apps keep writing
while it is open. Every value from the ledger reaches the page as text: through :func:`units.plain` in markdown,
:mod:`._charts` (escaped) in Plotly, and dataframes, which never render markup.
"""

from __future__ import annotations

import streamlit as st

st.set_page_config(page_title="joule-otel · energy", page_icon="⚡", layout="wide")

from joule_otel.dashboard import _kpis  # noqa: E402  (after the page config, Streamlit's first call)
from joule_otel.dashboard._data import load_page  # noqa: E402
from joule_otel.dashboard._sidebar import View, sidebar  # noqa: E402
from joule_otel.dashboard._tabs import (  # noqa: E402
    bill,
    budgets,
    carbon,
    efficiency,
    migration,
    overview,
    receipts,
    router,
    what_if,
)

TABS = (
    ("Overview", overview),
    ("Router", router),
    ("Carbon", carbon),
    ("Efficiency", efficiency),
    ("Budgets", budgets),
    ("Migration", migration),
    ("What if", what_if),
    ("Receipts", receipts),
    ("Bill", bill),
)


def render(view: View) -> None:
    """The page below the sidebar (a fragment when live refresh is on)."""
    st.title("Where your joules go")
    search = st.session_state.get("search", "")
    page = load_page(
        view.source.signature(),
        view.source,
        view.filters,
        view.split_by,
        view.bucket,
        view.tz_name,
        tuple(view.budgets),
        search,
        view.as_of,
    )
    _kpis.render(view, page)
    for tab, (_, module) in zip(st.tabs([title for title, _ in TABS]), TABS, strict=True):
        with tab:
            module.render(view, page)


view = sidebar()
if view.live:
    st.fragment(run_every=view.interval_s)(render)(view)
else:
    render(view)
