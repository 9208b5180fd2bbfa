"""The page's time: which period it shows, in which zone, in buckets of what length.

Pure functions of their arguments (no Streamlit), so the rules are tested directly: a relative range
("last 24 hours") is a pair of instants and holds every call of the period in any zone; a custom
range is read as dates and times in the zone the page says it uses.
"""

from __future__ import annotations

from datetime import date, datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

PRESETS: dict[str, timedelta | None] = {
    "Last 15 minutes": timedelta(minutes=15),
    "Last hour": timedelta(hours=1),
    "Last 24 hours": timedelta(hours=24),
    "Last 7 days": timedelta(days=7),
    "Last 30 days": timedelta(days=30),
    "All data": None,
    "Custom": None,
}
"""What the range picker offers; a relative range ends now."""

CUSTOM = "Custom"
ALL = "All data"


def zone(name: str | None) -> ZoneInfo:
    """The zone called ``name``, or UTC for an empty or unknown name (a browser can send anything)."""
    try:
        return ZoneInfo(name) if name else ZoneInfo("UTC")
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def default_preset(last: datetime, now: datetime) -> str:
    """The last 30 days when the newest call is that recent (a live ledger), else all the data (an export)."""
    window = PRESETS["Last 30 days"]
    assert window is not None
    return "Last 30 days" if last >= now - window else ALL


def resolve(
    preset: str,
    *,
    now: datetime,
    first: datetime,
    last: datetime,
    tz: ZoneInfo,
    custom: tuple[date, time, date, time] | None = None,
) -> tuple[datetime, datetime]:
    """The period as two aware instants in UTC: ``[start, end)``.

    ``All data`` spans the first call to just past the last; a custom range's dates and times are in ``tz``.
    """
    length = PRESETS.get(preset)
    if length is not None:
        return (now - length).astimezone(timezone.utc), now.astimezone(timezone.utc)
    if preset == CUSTOM and custom is not None:
        start_day, start_time, end_day, end_time = custom
        start = datetime.combine(start_day, start_time, tzinfo=tz)
        end = datetime.combine(end_day, end_time, tzinfo=tz)
        if end <= start:
            end = start + timedelta(minutes=1)
        return start.astimezone(timezone.utc), end.astimezone(timezone.utc)
    return first.astimezone(timezone.utc), last.astimezone(timezone.utc) + timedelta(seconds=1)


def describe(start: datetime, end: datetime, tz: ZoneInfo) -> str:
    """``27 Nov 2026 09:00 – 28 Nov 2026 09:00 (Asia/Kolkata)``: what a person reads under the picker."""
    fmt = "%d %b %Y %H:%M"
    return f"{start.astimezone(tz).strftime(fmt)} – {end.astimezone(tz).strftime(fmt)} ({tz.key})"


TICK_FORMATS = {
    "1 minute": "%H:%M",
    "5 minutes": "%H:%M",
    "1 hour": "%H:%M\n%d %b",  # Plotly puts what follows \n on a second line, only where the day changes
    "1 day": "%d %b",
    "7 days": "%d %b %Y",
}
"""Axis tick labels per bucket: never finer than the bucket (no milliseconds on an axis of days)."""
