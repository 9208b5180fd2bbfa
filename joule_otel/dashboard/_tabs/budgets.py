"""The Budgets tab: month to date against each workload's budget, and what the service itself enforced (402s)."""

from __future__ import annotations

from datetime import timedelta, timezone
from typing import Any

import pandas as pd
import streamlit as st

from joule_otel import _units as units
from joule_otel.dashboard import _charts as charts
from joule_otel.dashboard._data import show
from joule_otel.dashboard._sidebar import View


def render(view: View, page: dict[str, Any]) -> None:
    """Month to date against each workload's budget, and what the service itself enforced (402s)."""
    if view.budget_error:
        st.error(units.plain(view.budget_error))
    status = page["budgets"]
    if status is None or status.empty:
        st.info(
            "No energy budgets configured. Set JOULE_OTEL_BUDGETS to a JSON, TOML or CSV file of "
            'monthly joules per workload, e.g. {"support-bot": 150000}.'
        )
        return
    month_start = view.as_of.astimezone(timezone.utc).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    next_month = (month_start + timedelta(days=32)).replace(day=1)
    elapsed_days = max((view.as_of - month_start).total_seconds() / 86400, 1 / 24)
    rows = []
    for item in status.itertuples():
        rate = item.spent_j / elapsed_days
        left_j = item.budget_j - item.spent_j
        if item.refused_402:
            first_402 = pd.Timestamp(item.first_402).tz_convert(view.tz_name)
            projection = f"402 since {first_402:%d %b %H:%M}"
        elif left_j <= 0:
            projection = "spent"
        elif rate <= 0:
            projection = "no spend yet"
        else:
            when = view.as_of + timedelta(days=left_j / rate)
            projection = f"{when.astimezone(view.tz):%d %b}" if when < next_month else "lasts the month"
        rows.append(
            {
                "workload": item.workload,
                "budget (file)": units.energy(item.budget_j),
                "spent this month": units.energy(item.spent_j),
                "used": f"{item.used_share:.0%}",
                "burn per day": units.energy(rate),
                "runs out": projection,
                "402 refusals": int(item.refused_402),
                "last 402": pd.Timestamp(item.last_402).tz_convert(view.tz_name).strftime("%d %b %H:%M")
                if item.refused_402
                else "–",
            }
        )
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
    enforced = status[status["refused_402"] > 0]
    if not enforced.empty:
        counts = [(w, int(n)) for w, n in zip(enforced.workload, enforced.refused_402, strict=True)]
        st.warning(
            "Joule Cloud refused calls with 402 (insufficient balance) for "
            + ", ".join(f"{units.plain(w)} ({n:,} call{'s' if n != 1 else ''})" for w, n in counts)
            + ". The service enforces its own balance or per-token budget, which may be lower than this file's."
        )
    st.caption(
        f"Budgets from {units.plain(view.budgets_path or 'JOULE_OTEL_BUDGETS')}. Month to date as of "
        f'{view.as_of.astimezone(view.tz):%d %b %Y %H:%M} ({view.tz_name}); UTC months. "runs out" projects this '
        'month\'s average burn per day (the dashed line on each chart); "402 since" is when the service began refusing.'
    )
    burn = page["burn"]
    if burn is not None and not burn.empty:
        limits = {b.label: b.joules for b in view.budgets}
        show(
            st,
            charts.burn_down(burn, limits, month_start, next_month, view.colours, as_of=view.as_of),
            burn,
            "budget_burn",
        )
