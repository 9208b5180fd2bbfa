"""The sidebar: which data, which time, which calls; mirrored in the address bar, so a link restores the view.

:func:`sidebar` draws it and returns a :class:`View`, everything the page below it reads: the page modules take the
view as their one input and keep no state of their own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone, tzinfo
from typing import Any

import pandas as pd
import streamlit as st

from joule_otel import _units as units
from joule_otel._budgets import Budget, load_budgets
from joule_otel._config import JOULE_OTEL_BUDGETS
from joule_otel.dashboard import _queries as queries
from joule_otel.dashboard import _timerange as timerange
from joule_otel.dashboard._colours import Colours
from joule_otel.dashboard._data import load_options
from joule_otel.dashboard._sources import SAMPLE_BUDGETS_PATH, Source, resolve_source, sample_shift, source_for
from joule_otel.ledger._spool import Spool


@dataclass(frozen=True)
class View:
    """What the sidebar chose, and what the page needs of the data to draw it."""

    source: Source
    opts: dict[str, Any]
    """Filter choices and the data's time span (:func:`joule_otel.dashboard._queries.options`)."""
    first: datetime
    last: datetime
    tz: tzinfo
    tz_name: str
    start: datetime
    end: datetime
    bucket: str
    filters: queries.Filters
    split_choices: list[str]
    split_by: str
    as_of: datetime
    """Budgets are month to date as of the newest call shown (sample data lies in the past)."""
    budgets: list[Budget]
    budgets_path: str | None
    """Where the budgets came from (``JOULE_OTEL_BUDGETS``), to name it on the page."""
    budget_error: str | None
    live: bool
    interval_s: int
    colours: Colours
    """One colour per workload, model, region and tier, the same on every chart (from every value in the ledger)."""


# the query parameters of a shared link
URL_LISTS = ("service", "workload", "model", "region", "tier", "provider", "tag")
URL_VALUES = ("range", "from", "to", "tz", "status", "split")


def _restore_from_url() -> None:
    """On a page's first run, the filters of a shared link (query parameters) become the widgets' values."""
    if st.session_state.get("_restored"):
        return
    st.session_state["_restored"] = True
    params = st.query_params
    for key in URL_LISTS:
        values = params.get_all(key)
        if values:
            st.session_state[f"f_{key}"] = values
    allowed: dict[str, Any] = {  # a link is typed by people: a value a widget cannot show is dropped, not an error
        "range": lambda v: v in timerange.PRESETS,
        "status": lambda v: v in queries.STATUSES,
        "split": queries.is_split,
        "tz": lambda v: timerange.zone(v).key == v,
    }
    for key in URL_VALUES:
        if key in params and allowed.get(key, lambda v: True)(params[key]):
            st.session_state[f"f_{key}"] = params[key]
    for key, day_key, time_key in (("from", "start_day", "start_time"), ("to", "end_day", "end_time")):
        if key in params:
            try:
                moment = datetime.fromisoformat(params[key])
            except ValueError:
                continue
            st.session_state[day_key], st.session_state[time_key] = moment.date(), moment.time().replace(second=0)


def _save_to_url(values: dict[str, Any]) -> None:
    """The page's filters as query parameters: the address bar is a link that restores this view."""
    wanted = {k: v for k, v in values.items() if v not in (None, "", [], ())}
    if dict(st.query_params.to_dict()) != {k: (v[-1] if isinstance(v, list) else v) for k, v in wanted.items()}:
        st.query_params.from_dict(wanted)


def sidebar() -> View:
    """Draw the sidebar; stop the page with a message when there is nothing to show."""
    _restore_from_url()
    # -- source ----------------------------------------------------------------------------
    st.sidebar.title("⚡ joule-otel")
    default_source = resolve_source()
    custom_path = st.sidebar.text_input(
        "Ledger, Parquet or CSV path", value="", key="source_path", placeholder=str(default_source.path)
    )
    source: Source = source_for(custom_path, "chosen in the sidebar") if custom_path.strip() else default_source
    if (
        source.kind != "sample"
        and not source.path.exists()
        and not (source.kind == "ledger" and Spool(source.path).segments())
    ):
        st.sidebar.error(f"{units.plain(source.path)} does not exist; showing {units.plain(default_source.label)}")
        source = default_source
    st.sidebar.caption(f"**{source.kind_label}**: {units.plain(source.path)}  \n{source.why}")
    if source.kind == "sample":
        shift_weeks = sample_shift().days // 7
        st.sidebar.caption(
            f"The sample's calls are shown {shift_weeks} week{'s' if shift_weeks != 1 else ''} later than they were "
            "generated, so that they end in the past week (weekdays and hours of day kept)."
            if shift_weeks
            else "The sample's calls are shown at the dates they were generated."
        )

    live = st.sidebar.toggle("Live refresh", value=False, key="live")
    interval_s = st.sidebar.select_slider(
        "Refresh every (s)", options=[2, 5, 10, 30, 60], value=5, key="interval", disabled=not live
    )
    try:
        opts = load_options(source.signature(), source)
    except Exception as exc:  # a corrupt file, a folder without permission: say so, do not crash
        # never a file's contents: DuckDB's CSV errors quote the line they stumbled on
        reason = str(exc).splitlines()[0] if source.kind != "csv" or isinstance(exc, ValueError) else type(exc).__name__
        st.error(f"Cannot read {units.plain(source.path)}: {units.plain(reason)}")
        st.stop()

    if not opts["rows"]:
        st.title("Energy")
        st.info(
            "No inference calls in this ledger yet. Instrument your app with `joule_otel.instrument()` "
            "(or run `joule-otel demo`), make a call, and it appears here within a second."
        )
        st.stop()

    # -- sidebar: time ------------------------------------------------------------------------------
    first: datetime = pd.Timestamp(opts["first"]).to_pydatetime()
    last: datetime = pd.Timestamp(opts["last"]).to_pydatetime()
    now = datetime.now(timezone.utc)
    st.sidebar.header("Time")
    browser_zone = st.context.timezone or "UTC"
    zone_choices = sorted({browser_zone, "UTC", *(st.session_state.get("f_tz") or "UTC").split(",")})
    tz_name = st.sidebar.selectbox(
        "Time zone",
        zone_choices,
        index=zone_choices.index(st.session_state.get("f_tz") or browser_zone)
        if (st.session_state.get("f_tz") or browser_zone) in zone_choices
        else 0,
        key="f_tz_select",
        help="Times, days and weeks on the page are in this zone; your browser's is the default.",
    )
    tz = timerange.zone(tz_name)
    tz_name = tz.key  # a zone the browser or a link named, once it is known to exist
    presets = list(timerange.PRESETS)
    wanted_preset = st.session_state.get("f_range") or timerange.default_preset(last, now)
    preset = st.sidebar.selectbox(
        "Time range",
        presets,
        index=presets.index(wanted_preset) if wanted_preset in presets else 0,
        key="f_range_select",
    )
    custom: tuple[date, time, date, time] | None = None
    if preset == timerange.CUSTOM:
        local_first, local_last = first.astimezone(tz), (last + timedelta(minutes=1)).astimezone(tz)
        day_from, time_from = st.sidebar.columns(2)
        day_to, time_to = st.sidebar.columns(2)
        custom = (
            day_from.date_input("From", value=st.session_state.get("start_day", local_first.date()), key="start_day"),
            time_from.time_input(
                "at", value=st.session_state.get("start_time", local_first.time().replace(second=0)), key="start_time"
            ),
            day_to.date_input("To", value=st.session_state.get("end_day", local_last.date()), key="end_day"),
            time_to.time_input(
                "at ", value=st.session_state.get("end_time", local_last.time().replace(second=0)), key="end_time"
            ),
        )
    start, end = timerange.resolve(preset or timerange.ALL, now=now, first=first, last=last, tz=tz, custom=custom)
    st.sidebar.caption(timerange.describe(start, end, tz))
    pruned = opts.get("pruned_before")
    if pruned is not None and start < pruned:
        st.sidebar.caption(
            f"Calls before {pruned.astimezone(tz):%d %b %Y %H:%M} were pruned (retention): their totals come from the "
            "hourly rollup; receipts, latencies, tags and single calls start there."
        )
    bucket = queries.bucket_for(end - start)

    # -- sidebar: filters ---------------------------------------------------------------------------
    st.sidebar.header("Filters")

    def pick(label: str, key: str, choices: list[str]) -> tuple[str, ...]:
        """A multiselect whose shared-link values are kept only when the data has them."""
        chosen = [v for v in st.session_state.get(f"f_{key}", []) if v in choices]
        return tuple(st.sidebar.multiselect(label, choices, default=chosen, key=f"f_{key}_select"))

    filters = queries.Filters(
        start=start,
        end=end,
        services=pick("Service", "service", opts["services"]),
        workloads=pick("Workload", "workload", opts["workloads"]),
        models=pick("Model (routed)", "model", opts["models"]),
        regions=pick("Region", "region", opts["regions"]),
        tiers=pick("Tier", "tier", opts["tiers"]),
        providers=pick("Provider", "provider", opts["providers"]),
        tags=pick("Tags", "tag", [f"{k}={v}" for k, values in opts.get("tags", {}).items() for v in values])
        if opts.get("tags")
        else (),
        status=st.sidebar.selectbox(
            "Status",
            queries.STATUSES,
            index=queries.STATUSES.index(st.session_state.get("f_status", "all"))
            if st.session_state.get("f_status", "all") in queries.STATUSES
            else 0,
            key="f_status_select",
        )
        or "all",
    )
    split_choices = list(queries.DIMENSIONS)[:4] + [queries.TAG_SPLIT + key for key in opts.get("tags", {})]
    split_by: str = st.session_state["f_split"] if st.session_state.get("f_split") in split_choices else "workload"
    _save_to_url(
        {
            "range": preset,
            "tz": tz_name,
            "from": start.astimezone(tz).strftime("%Y-%m-%dT%H:%M") if preset == timerange.CUSTOM else None,
            "to": end.astimezone(tz).strftime("%Y-%m-%dT%H:%M") if preset == timerange.CUSTOM else None,
            "service": list(filters.services),
            "workload": list(filters.workloads),
            "model": list(filters.models),
            "region": list(filters.regions),
            "tier": list(filters.tiers),
            "provider": list(filters.providers),
            "tag": list(filters.tags),
            "status": filters.status if filters.status != "all" else None,
            "split": split_by if split_by != "workload" else None,
        }
    )
    budget_error = None
    budget_list: list[Budget] = []
    budgets_path: str | None = os.environ.get(JOULE_OTEL_BUDGETS, "").strip() or None
    try:
        budget_list = load_budgets()
        if not budget_list and source.kind == "sample":
            budget_list = load_budgets(SAMPLE_BUDGETS_PATH)
            budgets_path = "the sample's budgets"
    except ValueError as exc:
        budget_error = str(exc)
    return View(
        source=source,
        opts=opts,
        first=first,
        last=last,
        tz=tz,
        tz_name=tz_name,
        start=start,
        end=end,
        bucket=bucket,
        filters=filters,
        split_choices=split_choices,
        split_by=split_by,
        as_of=min(last, end, now),
        budgets=budget_list,
        budgets_path=budgets_path,
        budget_error=budget_error,
        live=live,
        interval_s=interval_s,
        colours=Colours.from_options(opts),
    )
