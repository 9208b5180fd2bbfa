"""Joule Cloud's headers, and turning their values into an :class:`EnergyReading`.

No OpenTelemetry import here: this module is pure parsing, shared by capture, the simulator's tests
and anyone reconciling receipts by hand. A value that is not a finite, non-negative number is
*missing* (``None``), never 0 and never an exception.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ENERGY_JOULES = "x-energy-joules"
"""Response: joules billed for the call (float ≥ 0)."""
CARBON_MG = "x-carbon-mg"
"""Response: mg CO2e of that energy (float ≥ 0)."""
ROUTED_TO = "x-routed-to"
"""Response: the model that served the call (what ``"auto"`` picked)."""
TIER = "x-tier"
"""Response: the capacity tier that served the call."""
RECEIPT_ID = "x-receipt-id"
"""Response: the billing receipt; the ledger's idempotency key."""
REGION = "x-region"
"""Request: the jurisdiction the app pinned. Response: where the call was served (wins if sent)."""

RESPONSE_HEADERS = (ENERGY_JOULES, CARBON_MG, ROUTED_TO, TIER, RECEIPT_ID)
"""A response carrying any of these is a Joule inference call."""

MAX_STRING = 256
"""Header strings are trimmed, stripped of control characters and capped at this many characters."""

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


@dataclass(frozen=True, slots=True)
class EnergyReading:
    """What one response's headers say. ``None`` means missing or invalid."""

    energy_j: float | None = None
    carbon_mg: float | None = None
    routed_to: str | None = None
    tier: str | None = None
    region: str | None = None
    receipt_id: str | None = None
    invalid: tuple[str, ...] = ()
    """Names of headers that were present but unusable (counted by capture)."""


def parse_quantity(value: str | bytes | None) -> float | None:
    """A finite, non-negative float from a header value, else ``None``.

    Accepts surrounding whitespace and exponent notation (``" 1.25e1 "`` → 12.5); rejects ``abc``,
    ``NaN``, ``inf``, negatives, overflow (``1e400``) and the empty string.
    """
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    try:
        number = float(value.strip())
    except ValueError:
        return None
    if not math.isfinite(number) or number < 0:
        return None
    return number + 0.0  # normalise -0.0


def clean_string(value: str | bytes | None) -> str | None:
    """Trimmed, control characters removed, capped at :data:`MAX_STRING`; empty → ``None``."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not value.isprintable():  # the common case has no control character: skip the regex
        value = _CONTROL.sub("", value)
    value = value.strip()[:MAX_STRING].strip()
    return value or None


def read_energy(get: Callable[[str], str | bytes | None], request_region: str | bytes | None = None) -> EnergyReading:
    """Read the Joule headers through ``get`` (a case-insensitive header lookup).

    Args:
        get: e.g. ``response.headers.get``.
        request_region: the request's ``X-Region``, used when the response does not say.
    """
    invalid: list[str] = []

    def quantity(name: str) -> float | None:
        raw = get(name)
        number = parse_quantity(raw)
        if raw is not None and number is None:
            invalid.append(name)
        return number

    energy = quantity(ENERGY_JOULES)
    carbon = quantity(CARBON_MG)
    tier = clean_string(get(TIER))
    region = clean_string(get(REGION)) or clean_string(request_region)
    return EnergyReading(
        energy_j=energy,
        carbon_mg=carbon,
        routed_to=clean_string(get(ROUTED_TO)),
        tier=tier.lower() if tier else None,
        region=region.lower() if region else None,
        receipt_id=clean_string(get(RECEIPT_ID)),
        invalid=tuple(invalid),
    )


def raw_lookup(headers: Any) -> Callable[[str], bytes | None]:
    """A case-insensitive lookup over httpx's ``headers.raw``, built in one pass.

    ``headers.get(name)`` of httpx scans and decodes the whole list once per name; reading the six Joule
    headers that way costs several times more than this.
    """
    lowered = {name.lower(): value for name, value in headers.raw} if headers is not None else {}

    def get(name: str) -> bytes | None:
        return lowered.get(_lower_bytes(name))

    return get


@functools.lru_cache(maxsize=128)
def _lower_bytes(name: str) -> bytes:
    return name.lower().encode("latin-1")
