"""Numbers a person reads: J/kJ/MJ, Wh/kWh, mg/g/kg CO2e, and everyday equivalents."""

from __future__ import annotations

import math
import re
from datetime import timedelta

J_PER_KWH = 3.6e6
PHONE_CHARGE_J = 54_000.0
"""One smartphone charge ≈ 15 Wh."""
KETTLE_BOIL_J = 360_000.0
"""Boiling a litre of water in a kettle ≈ 0.1 kWh."""
CAR_G_PER_KM = 120.0
"""An average petrol car emits ≈ 120 g CO2e per km."""


def _scaled(value: float, units: tuple[tuple[float, str], ...], scale_of: float | None = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    magnitude = abs(value if scale_of is None else scale_of)
    factor, name = units[0]
    for candidate_factor, candidate_name in units:
        if magnitude >= candidate_factor:
            factor, name = candidate_factor, candidate_name
    scaled = value / factor
    digits = 0 if abs(scaled) >= 100 else 1 if abs(scaled) >= 10 else 2
    return f"{scaled:,.{digits}f} {name}"


def energy(joules: float, scale_of: float | None = None) -> str:
    """1234 → '1.23 kJ'; ``scale_of`` picks the unit instead (a column's largest value: one unit a column)."""
    return _scaled(joules, ((1.0, "J"), (1e3, "kJ"), (1e6, "MJ"), (1e9, "GJ")), scale_of)


def energy_wh(joules: float) -> str:
    """Joules as Wh / kWh / MWh."""
    return _scaled(joules / 3600.0 if joules is not None else joules, ((1.0, "Wh"), (1e3, "kWh"), (1e6, "MWh")))


def carbon(milligrams: float, scale_of: float | None = None) -> str:
    """Milligrams CO2e, readable: 12300 → '12.3 g CO2e'; ``scale_of`` as for :func:`energy`."""
    return _scaled(milligrams, ((1.0, "mg"), (1e3, "g"), (1e6, "kg"), (1e9, "t")), scale_of) + " CO2e"


def energy_equivalent(joules: float) -> str:
    """A comparison that makes joules tangible."""
    if not joules or joules <= 0:
        return ""
    if joules < PHONE_CHARGE_J:
        return f"≈ {joules / PHONE_CHARGE_J:.0%} of a phone charge"
    if joules < KETTLE_BOIL_J * 10:
        return f"≈ {joules / PHONE_CHARGE_J:,.0f} phone charges"
    return f"≈ {joules / KETTLE_BOIL_J:,.0f} kettles boiled"


def carbon_equivalent(milligrams: float) -> str:
    """A comparison that makes grams of CO2e tangible."""
    if not milligrams or milligrams <= 0:
        return ""
    metres = milligrams / 1000.0 / CAR_G_PER_KM * 1000.0
    return f"≈ {metres:,.0f} m by car" if metres < 1000 else f"≈ {metres / 1000:,.1f} km by car"


def plain(value: object) -> str:
    """A value from the ledger for Streamlit markdown: an inline code span, whose content is never markup.

    ``![b](http://host/x)`` then reads as those characters: no image is fetched and no link is made.
    Escaping is not enough: Streamlit links any ``http://…`` it finds in text, escaped or not, but never
    inside code. The fence is one backtick longer than any run in the value.
    """
    text = " ".join(str(value).splitlines()) or " "
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def span(length: timedelta) -> str:
    """A period's length as a person says it: '15 min', '24 h', '7 days'."""
    seconds = length.total_seconds()
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} days"
