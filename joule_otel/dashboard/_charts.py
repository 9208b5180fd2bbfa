"""Every chart of the dashboard: query results → Plotly figures a person reads.

Rules every builder follows: values from the ledger (workloads, models, regions, receipts) are
escaped before Plotly sees them, so a model called ``<a href=…>`` is text, never a link; axes carry
their unit and a scale chosen for the data (J, kJ, MJ; mg, g, kg); time axes span the period shown
with ticks no finer than the bucket. No Streamlit here: the page decides where a figure goes.
"""

from __future__ import annotations

import html
import math
from datetime import datetime, timedelta
from typing import Any

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from joule_otel import _units as units
from joule_otel.dashboard._colours import NO_COLOURS, Colours
from joule_otel.dashboard._timerange import TICK_FORMATS

ENERGY_SCALES = ((1.0, "J"), (1e3, "kJ"), (1e6, "MJ"), (1e9, "GJ"))
CARBON_SCALES = ((1.0, "mg"), (1e3, "g"), (1e6, "kg"), (1e9, "t"))
BUCKET_MS = {"1 minute": 60_000, "5 minutes": 300_000, "1 hour": 3_600_000, "1 day": 86_400_000, "7 days": 604_800_000}


def text(value: Any) -> str:
    """A ledger value as Plotly text: escaped, so markup in it is shown, never interpreted."""
    return html.escape("" if value is None else str(value), quote=False)


def safe(frame: pd.DataFrame, *columns: str) -> pd.DataFrame:
    """A copy of ``frame`` with these text columns escaped for Plotly."""
    return frame.assign(**{c: frame[c].map(text) for c in columns if c in frame})


def scale(values: Any, scales: tuple[tuple[float, str], ...]) -> tuple[float, str]:
    """The divisor and unit that print the largest of ``values`` between 1 and 1000."""
    numbers = [abs(float(v)) for v in values if v is not None and not pd.isna(v)]
    peak = max(numbers, default=0.0)
    factor, name = scales[0]
    for candidate, candidate_name in scales:
        if peak >= candidate:
            factor, name = candidate, candidate_name
    return factor, name


_HOUR_MS, _DAY_MS = 3_600_000, 86_400_000
TICK_STEPS: tuple[tuple[int, int | str], ...] = (
    *((ms, ms) for ms in (60_000, 300_000, 900_000, 1_800_000)),
    *((h * _HOUR_MS, h * _HOUR_MS) for h in (1, 2, 3, 6, 12)),
    *((d * _DAY_MS, d * _DAY_MS) for d in (1, 2, 3, 7, 14)),
    (30 * _DAY_MS, "M1"),
    (91 * _DAY_MS, "M3"),
    (365 * _DAY_MS, "M12"),
)
"""Steps between time-axis ticks (about how long, and Plotly's ``dtick``): whole minutes, hours, days and months."""
MAX_TICKS = 12


def time_axis(bucket: str, start: datetime, end: datetime, tz_name: str) -> dict[str, Any]:
    """A time axis over the whole period, in ``tz_name``, with ticks at whole steps (6 to 12 of them).

    Plotly's own choice gives one or two ticks to a day of hourly buckets; here the step is the finest of
    :data:`TICK_STEPS` (never finer than the bucket) that keeps at most :data:`MAX_TICKS` ticks, counted from a
    whole hour (or midnight) of the zone shown.
    """
    first, last = (pd.Timestamp(t).tz_convert(tz_name).tz_localize(None) for t in (start, end))
    span_ms = max((last - first).total_seconds() * 1000, 1.0)
    floor = BUCKET_MS[bucket]
    ms, dtick = next(((ms, d) for ms, d in TICK_STEPS if ms >= floor and span_ms / ms <= MAX_TICKS), TICK_STEPS[-1])
    anchor = first.floor("D") if ms >= _DAY_MS else first.floor("h")
    if isinstance(dtick, str):  # months from the first of one
        anchor = anchor.replace(day=1)
    return {
        "type": "date",
        "range": [first, last],
        "tickformat": TICK_FORMATS[bucket],
        "title": tz_name,
        "dtick": dtick,
        "tick0": anchor,
    }


def _layout(fig: go.Figure, title: str, **axes: Any) -> go.Figure:
    fig.update_layout(title=title, margin={"t": 50, "l": 10, "r": 10, "b": 10}, legend_title_text="", **axes)
    return fig


def over_time(
    frame: pd.DataFrame,
    *,
    bucket: str,
    start: datetime,
    end: datetime,
    split_label: str,
    tz_name: str,
    colours: Colours = NO_COLOURS,
) -> go.Figure:
    """Stacked bars of energy per bucket and group, on an axis that spans the whole period."""
    factor, unit = scale(frame.groupby("bucket")["energy_j"].sum(), ENERGY_SCALES)
    fig = go.Figure()
    width = BUCKET_MS[bucket] * 0.9
    half = timedelta(milliseconds=BUCKET_MS[bucket] / 2)
    for group, part in frame.groupby("group", sort=True):
        name = text(group)
        colour = colours.of(split_label, group)
        # the legend's swatch is solid whatever the first bar is: a trace of its own, with no bars
        fig.add_bar(x=[None], y=[None], name=name, marker_color=colour, legendgroup=name, hoverinfo="skip")
        fig.add_bar(
            x=part["bucket"] + half,
            legendgroup=name,
            showlegend=False,
            y=part["energy_j"] / factor,
            name=name,
            width=width,
            marker={
                "color": colour,
                # a bar that rests on one call is hatched: one call is an anecdote, not a rate
                "pattern": {"shape": ["/" if c == 1 else "" for c in part["calls"]], "solidity": 0.4},
            },
            customdata=part[["calls"]].to_numpy(),
            hovertemplate=f"{name}<br>%{{x|%d %b %Y %H:%M}}<br>%{{y:,.3~f}} {unit}<br>%{{customdata[0]:,}} calls"
            "<extra></extra>",
        )
    return _layout(
        fig,
        f"Energy per {bucket} by {split_label}",
        barmode="stack",
        xaxis=time_axis(bucket, start, end, tz_name),
        yaxis={"title": f"Energy ({unit})", "tickformat": ",.3~f"},
    )


def breakdown(frame: pd.DataFrame, dim_label: str, colours: Colours = NO_COLOURS) -> go.Figure:
    """Horizontal bars of energy per value of one dimension (values without energy are left out)."""
    frame = frame[frame["energy_j"].fillna(0) > 0]
    factor, unit = scale(frame["energy_j"], ENERGY_SCALES)
    carbon_factor, carbon_unit = scale(frame["carbon_mg"], CARBON_SCALES)
    fig = go.Figure(
        go.Bar(
            x=frame["energy_j"] / factor,
            y=frame["group"].map(text),
            orientation="h",
            marker_color=[colours.of(dim_label, g) for g in frame["group"]],
            customdata=pd.concat(
                [frame["calls"], (frame["carbon_mg"] / carbon_factor).fillna(0), frame["errors"]], axis=1
            ).to_numpy(),
            hovertemplate=f"%{{y}}<br>%{{x:,.3~f}} {unit}<br>%{{customdata[1]:,.3~f}} {carbon_unit} CO2e"
            "<br>%{customdata[0]:,} calls, %{customdata[2]:,} errors<extra></extra>",
        )
    )
    fig.update_yaxes(autorange="reversed", title=dim_label, type="category")
    return _layout(fig, f"Energy by {dim_label}", xaxis={"title": f"Energy ({unit})", "tickformat": ",.3~f"})


def treemap(frame: pd.DataFrame, colours: Colours = NO_COLOURS) -> go.Figure:
    """Workload → model, sized by joules."""
    workloads = frame.groupby("workload", sort=False)["energy_j"].sum()
    ids = [f"w/{w}" for w in workloads.index] + [f"w/{w}/{m}" for w, m in zip(frame.workload, frame.model, strict=True)]
    labels = [text(w) for w in workloads.index] + [text(m) for m in frame.model]
    parents = [""] * len(workloads) + [f"w/{w}" for w in frame.workload]
    values = list(workloads) + list(frame.energy_j)
    fig = go.Figure(
        go.Treemap(
            ids=ids,
            labels=labels,
            parents=parents,
            values=values,
            branchvalues="total",
            marker_colors=[colours.of("workload", w) for w in workloads.index]
            + [colours.of("model", m) for m in frame.model],
            customdata=[units.energy(v) for v in values],
            texttemplate="%{label}<br>%{customdata}",
            hovertemplate="%{label}<br>%{customdata}<extra></extra>",
        )
    )
    return _layout(fig, "Workload → routed model, by energy")


def sankey(flows: pd.DataFrame, weight: str = "energy_j", colours: Colours = NO_COLOURS) -> go.Figure:
    """Requested model → routed model, weighted by joules (or calls): one colour per model on both sides.

    A flow to the model that was asked for (a pinned call served as pinned) is grey: the router chose nothing.
    """
    asked = list(dict.fromkeys(flows["requested"]))
    served = list(dict.fromkeys(flows["routed"]))
    labels = [f"asked: {text(x)}" for x in asked] + [f"served: {text(x)}" for x in served]
    colors = [colours.of("model", x) for x in asked] + [colours.of("model", x) for x in served]
    source = {name: i for i, name in enumerate(asked)}
    target = {name: len(asked) + i for i, name in enumerate(served)}
    identity = flows["requested"] == flows["routed"]
    shown = [units.energy(v) for v in flows["energy_j"]] if weight == "energy_j" else []
    if weight != "energy_j":
        shown = [f"{int(v):,} calls" for v in flows["calls"]]
    fig = go.Figure(
        go.Sankey(
            node={
                "label": labels,
                "color": colors,
                "pad": 14,
                "line": {"color": "white", "width": 0.5},
                "hovertemplate": "%{label}<extra></extra>",
            },
            link={
                "source": [source[r] for r in flows["requested"]],
                "target": [target[r] for r in flows["routed"]],
                "value": flows[weight].tolist(),
                "color": [
                    "rgba(160,160,160,0.35)" if same else _translucent(colours.of("model", routed))
                    for same, routed in zip(identity, flows["routed"], strict=True)
                ],
                "customdata": shown,
                "hovertemplate": "%{source.label} → %{target.label}<br>%{customdata}<extra></extra>",
            },
            textfont={"color": "#1f1f1f", "size": 13},
        )
    )
    by = "energy" if weight == "energy_j" else "calls"
    return _layout(fig, f"What was asked for → what served it, by {by}")


def _translucent(color: str, alpha: float = 0.45) -> str:
    """A ``#rrggbb`` colour as ``rgba`` at ``alpha``: links beneath their nodes' full colours."""
    if not (color.startswith("#") and len(color) == 7):
        return color
    red, green, blue = (int(color[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({red},{green},{blue},{alpha})"


def per_token(
    frame: pd.DataFrame, column: str, title: str, unit_label: str, colours: Colours = NO_COLOURS
) -> go.Figure:
    """Bars of a J-per-token figure by model (millijoules when below a joule)."""
    frame = frame[frame[column].notna()]
    factor, unit = (1e-3, "mJ") if frame[column].max() < 1 else (1.0, "J")
    fig = go.Figure(
        go.Bar(
            x=frame["model"].map(text),
            y=frame[column] / factor,
            marker_color=[colours.of("model", m) for m in frame["model"]],
            hovertemplate=f"%{{x}}<br>%{{y:,.3~f}} {unit} {unit_label}<extra></extra>",
        )
    )
    fig.update_xaxes(type="category", title="routed model")
    return _layout(fig, title, yaxis={"title": f"{unit} {unit_label}", "tickformat": ",.3~f"})


def carbon_regions(frame: pd.DataFrame) -> go.Figure:
    """Carbon per region, coloured by the effective grid intensity."""
    factor, unit = scale(frame["carbon_mg"], CARBON_SCALES)
    fig = go.Figure(
        go.Bar(
            x=frame["region"].map(text),
            y=frame["carbon_mg"] / factor,
            marker={
                "color": frame["g_per_kwh"],
                "colorscale": "RdYlGn_r",
                "colorbar": {"title": {"text": "g CO2e/kWh"}},
            },
            customdata=pd.concat([frame["g_per_kwh"].fillna(0), frame["calls"]], axis=1).to_numpy(),
            hovertemplate=f"%{{x}}<br>%{{y:,.3~f}} {unit} CO2e<br>%{{customdata[0]:,.0f}} g CO2e/kWh"
            "<br>%{customdata[1]:,} calls<extra></extra>",
        )
    )
    fig.update_xaxes(type="category", title="region")
    return _layout(fig, "Carbon by region", yaxis={"title": f"Carbon ({unit} CO2e)", "tickformat": ",.3~f"})


def carbon_savings(frame: pd.DataFrame, cleanest: str) -> go.Figure:
    """Carbon now and at the cleanest region, per workload."""
    factor, unit = scale(pd.concat([frame["carbon_mg"], frame["if_cleanest_mg"]]), CARBON_SCALES)
    fig = go.Figure()
    for column, name in (("carbon_mg", "as served"), ("if_cleanest_mg", f"if served from {text(cleanest)}")):
        fig.add_bar(
            x=frame["workload"].map(text),
            y=frame[column] / factor,
            name=name,
            text=[units.carbon(v).removesuffix(" CO2e") for v in frame[column]],
            textposition="outside",
            cliponaxis=False,
            hovertemplate=f"%{{x}}<br>{name}: %{{y:,.3~f}} {unit} CO2e<extra></extra>",
        )
    fig.update_xaxes(type="category", title="workload")
    return _layout(
        fig, "Carbon as served vs. at the cleanest region", barmode="group", yaxis={"title": f"Carbon ({unit} CO2e)"}
    )


def histogram(frame: pd.DataFrame) -> go.Figure:
    """Calls per ¼-decade energy bin, every bin from the lowest to the highest shown (empty ones at 0)."""
    bins = [round(4 * math.log10(v)) for v in frame["bin_start_j"]]
    calls = dict(zip(bins, frame["calls"], strict=True))
    every = list(range(min(bins), max(bins) + 1)) if bins else []
    labels = [f"{units.energy(10 ** (b / 4))}–{units.energy(10 ** ((b + 1) / 4))}" for b in every]
    fig = go.Figure(
        go.Bar(x=labels, y=[calls.get(b, 0) for b in every], hovertemplate="%{x}<br>%{y:,} calls<extra></extra>")
    )
    fig.update_xaxes(type="category", title="energy per call")
    return _layout(fig, "Energy per call (¼-decade bins)", yaxis={"title": "calls", "tickformat": ",d"})


def latency_energy(frame: pd.DataFrame, colours: Colours = NO_COLOURS) -> go.Figure:
    """Duration against energy per call, one colour per model; energy on a log axis with a tick per decade."""
    fig = go.Figure()
    for model, part in frame.groupby("model", sort=True):
        name = text(model)
        fig.add_scatter(
            x=part["duration_ms"],
            y=part["energy_j"],
            mode="markers",
            name=name,
            marker={"size": 5, "opacity": 0.7, "color": colours.of("model", model)},
            hovertemplate=f"{name}<br>%{{x:,.0f}} ms<br>%{{y:,.3~f}} J<extra></extra>",
        )
    return _layout(
        fig,
        "Latency vs energy per call",
        xaxis={"title": "duration (ms)", "tickformat": ",d"},
        yaxis={"title": "energy (J, log scale)", "type": "log", "dtick": 1, "tickformat": ",~g"},
    )


def ttft(frame: pd.DataFrame, colours: Colours = NO_COLOURS) -> go.Figure:
    """Time to first chunk of streams, per model."""
    fig = go.Figure()
    for model, part in frame.groupby("model", sort=True):
        fig.add_box(y=part["ttft_ms"], name=text(model), boxpoints=False, marker_color=colours.of("model", model))
    return _layout(fig, "Time to first chunk (streams)", showlegend=False, yaxis={"title": "ms", "tickformat": ",d"})


def burn_down(
    burn: pd.DataFrame,
    budgets: dict[str, float],
    month_start: datetime,
    month_end: datetime,
    colours: Colours = NO_COLOURS,
    *,
    as_of: datetime | None = None,
) -> go.Figure:
    """One small chart per budgeted workload: cumulative energy this month as a line, the budget dashed.

    Each workload gets its own scale and its own budget line, so a 500 J budget is not a flat line under
    a 400 kJ one and no two labels sit on each other.
    """
    names = [w for w in budgets if w in set(burn["workload"])]
    columns = min(3, max(1, len(names)))
    rows = math.ceil(len(names) / columns) if names else 1
    fig = make_subplots(rows=rows, cols=columns, subplot_titles=[text(n) for n in names], vertical_spacing=0.18)
    for i, name in enumerate(names):
        row, col = i // columns + 1, i % columns + 1
        part = burn[burn["workload"] == name].sort_values("day")
        factor, unit = scale([*part["cumulative_j"], budgets[name]], ENERGY_SCALES)
        fig.add_scatter(
            x=part["day"],
            y=part["cumulative_j"] / factor,
            mode="lines+markers",
            name=text(name),
            line_color=colours.of("workload", name),
            showlegend=False,
            hovertemplate=f"%{{x|%d %b}}<br>%{{y:,.3~f}} {unit} so far<extra></extra>",
            row=row,
            col=col,
        )
        spent = float(part["cumulative_j"].iloc[-1]) if len(part) else 0.0
        if as_of is not None and spent > 0 and spent < budgets[name]:
            # this month's average burn carried forward: where the line meets the budget is "runs out"
            per_s = spent / max((as_of - month_start).total_seconds(), 3600.0)
            out = as_of + timedelta(seconds=(budgets[name] - spent) / per_s)
            until = min(out, month_end)
            fig.add_scatter(
                x=[as_of, until],
                y=[spent / factor, (spent + per_s * (until - as_of).total_seconds()) / factor],
                mode="lines",
                line={"dash": "dash", "color": colours.of("workload", name)},
                name="projection",
                showlegend=False,
                hovertemplate=f"runs out {out:%d %b}<extra></extra>"
                if out < month_end
                else "lasts the month<extra></extra>",
                row=row,
                col=col,
            )
        fig.add_scatter(
            x=[month_start, month_end],
            y=[budgets[name] / factor] * 2,
            mode="lines",
            line={"dash": "dot", "color": "firebrick"},
            name="budget",
            showlegend=i == 0,
            hovertemplate=f"budget: {units.energy(budgets[name])}<extra></extra>",
            row=row,
            col=col,
        )
        fig.update_yaxes(title_text=unit, rangemode="tozero", tickformat=",.3~f", row=row, col=col)
        fig.update_xaxes(range=[month_start, month_end], tickformat="%d %b", row=row, col=col)
    fig.update_layout(height=300 * rows)
    return _layout(fig, "Burn-down this month: cumulative energy vs budget (UTC days)")


def migration_share(
    frame: pd.DataFrame, bucket: str, start: datetime, end: datetime, tz_name: str, colours: Colours = NO_COLOURS
) -> go.Figure:
    """Per workload, the share of calls not on Joule Cloud in each bucket (a line that should fall to 0 %)."""
    fig = go.Figure()
    # every bucket of the period, those without calls too: an empty bucket is a gap in the line, never bridged
    seen = pd.DatetimeIndex(frame["bucket"].unique())
    steps = pd.date_range(seen.min(), seen.max(), freq=pd.Timedelta(milliseconds=BUCKET_MS[bucket]))
    every = seen.union(steps)
    highest = 0.0
    for workload, part in frame.groupby("workload", sort=True):
        totals = part.groupby("bucket")["calls"].sum()
        elsewhere = part[part["provider"] != "joule_cloud"].groupby("bucket")["calls"].sum()
        share = (elsewhere.reindex(totals.index).fillna(0) / totals).reindex(every).sort_index()
        highest = max(highest, float(share.max(skipna=True) or 0.0))
        name = text(workload)
        fig.add_scatter(
            x=share.index,
            y=share.values,
            mode="lines+markers",
            name=name,
            connectgaps=False,
            line_color=colours.of("workload", workload),
            hovertemplate=f"{name}<br>%{{x|%d %b %Y %H:%M}}<br>%{{y:.0%}} of calls elsewhere<extra></extra>",
        )
    return _layout(
        fig,
        "Share of calls still on another provider",
        xaxis=time_axis(bucket, start, end, tz_name),
        # up to the highest share seen (a few per cent is readable), never past 100 %
        yaxis={
            "title": "calls on other providers",
            "tickformat": ".0%",
            "range": [0, min(1.05, max(highest * 1.25, 0.05))],
        },
    )
