"""Joule Cloud's headers, and turning their values into an :class:`EnergyReading`.

No OpenTelemetry import here: this module is pure parsing, shared by capture, the simulator's tests
and anyone reconciling receipts by hand. A value that is not a finite, non-negative number is
*missing* (``None``), never 0 and never an exception.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

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

MAX_ENERGY_J = 1e7
"""The most energy one inference call can plausibly be billed: 10 MJ (2.8 kWh, a whole 8-GPU server for a quarter
of an hour). A larger figure is invalid like ``abc``: missing, and counted, so one corrupt header cannot swamp every
sum or push a Prometheus counter to a height it never comes down from."""
MAX_CARBON_MG = 1e7
"""The most carbon one call can plausibly cost: 10 kg CO2e (:data:`MAX_ENERGY_J` on the dirtiest grid is ~4 kg)."""
MAX_TOKENS = (1 << 63) - 1
"""Token counts must fit the ledger's BIGINT; a larger (or negative, or non-integer) count is missing."""

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class EnergyReading(NamedTuple):
    """What one response's headers say. ``None`` means missing or invalid.

    A named tuple (immutable, compared by value): made once a call, where a frozen dataclass costs twice as much.
    """

    energy_j: float | None = None
    carbon_mg: float | None = None
    routed_to: str | None = None
    tier: str | None = None
    region: str | None = None
    receipt_id: str | None = None
    invalid: tuple[str, ...] = ()
    """Names of headers that were present but unusable (counted by capture)."""


_DECIMAL = re.compile(r"\s*[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\s*", re.ASCII)
"""A decimal number as HTTP carries one: ASCII digits, a point, an exponent, ASCII whitespace around."""


def parse_quantity(value: str | bytes | float | None, ceiling: float = MAX_ENERGY_J) -> float | None:
    """A finite, non-negative float no larger than ``ceiling`` from a header (or JSON) value, else ``None``.

    Accepts surrounding whitespace and exponent notation (``" 1.25e1 "`` → 12.5); rejects ``abc``,
    ``NaN``, ``inf``, negatives, overflow (``1e400``), figures above ``ceiling`` (see :data:`MAX_ENERGY_J`),
    booleans and the empty string.
    """
    if value is None or isinstance(value, bool):
        return None
    if (
        isinstance(value, (str, bytes))
        and _DECIMAL.fullmatch(value if isinstance(value, str) else value.decode("latin-1")) is None
    ):
        return None  # float() would also take `1_000`, `１２`, `١٢`, `infinity`: not what a decimal in HTTP looks like
    try:
        number = float(value)
    except (ValueError, TypeError, OverflowError):
        return None
    if not 0 <= number <= ceiling:  # NaN fails every comparison; inf is above any ceiling
        return None
    return number + 0.0  # normalise -0.0


def parse_energy(value: str | bytes | float | None) -> float | None:
    """Joules: :func:`parse_quantity` under :data:`MAX_ENERGY_J`."""
    return parse_quantity(value, MAX_ENERGY_J)


def parse_carbon(value: str | bytes | float | None) -> float | None:
    """Milligrams CO2e: :func:`parse_quantity` under :data:`MAX_CARBON_MG`."""
    return parse_quantity(value, MAX_CARBON_MG)


def parse_token_count(value: Any) -> int | None:
    """A token count: an integer (not a bool) in [0, :data:`MAX_TOKENS`], else ``None``.

    JSON integers only; ``2.0`` or ``"2"`` are not what the OpenAI ``usage`` shape sends and are refused too.
    """
    if type(value) is int and 0 <= value <= MAX_TOKENS:
        return value
    return None


def clean_string(value: str | bytes | None) -> str | None:
    """Trimmed, control characters removed, capped at :data:`MAX_STRING`; empty → ``None``."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not value.isprintable():  # the common case has no control character nor lone surrogate: skip the regex
        value = _CONTROL.sub("", value)
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate ("\\ud800" in JSON) cannot be written to UTF-8 storage
            value = value.encode("utf-8", "replace").decode("utf-8")
    value = value.strip()[:MAX_STRING].strip()
    return value or None


_ENERGY_KEY, _CARBON_KEY, _ROUTED_KEY, _TIER_KEY, _REGION_KEY, _RECEIPT_KEY = (
    name.encode("latin-1") for name in (ENERGY_JOULES, CARBON_MG, ROUTED_TO, TIER, REGION, RECEIPT_ID)
)


def read_energy(get: Callable[[str], str | bytes | None], request_region: str | bytes | None = None) -> EnergyReading:
    """Read the Joule headers through ``get`` (a case-insensitive header lookup).

    Args:
        get: e.g. ``response.headers.get``.
        request_region: the request's ``X-Region``, used when the response does not say.
    """
    names = (ENERGY_JOULES, CARBON_MG, ROUTED_TO, TIER, REGION, RECEIPT_ID)
    return read_energy_map({name.encode("latin-1"): get(name) for name in names}, request_region)


def read_energy_map(
    values: Mapping[bytes, str | bytes | None], request_region: str | bytes | None = None
) -> EnergyReading:
    """:func:`read_energy` over a mapping of lower-cased header names (bytes) to values, e.g. :func:`header_map`'s."""
    return read_scanned([values.get(name) for name in SCANNED], request_region)


def read_scanned(found: list[Any], request_region: str | bytes | None = None) -> EnergyReading:
    """:func:`read_energy` of what :func:`scan_headers` found.

    Run for every call on the background thread, so the usual case (clean ASCII values, labels seen before) takes no
    call it can avoid: what :func:`parse_quantity` and :func:`clean_label` do is inlined here.
    """
    raw_energy, raw_carbon, routed, tier, receipt, region = found[:6]
    energy = carbon = None
    invalid: tuple[str, ...] = ()
    if raw_energy is not None:
        energy = parse_quantity(raw_energy, MAX_ENERGY_J)
        if energy is None:
            invalid = (ENERGY_JOULES,)
    if raw_carbon is not None:
        carbon = parse_quantity(raw_carbon, MAX_CARBON_MG)
        if carbon is None:
            invalid = (*invalid, CARBON_MG)
    if routed is not None:
        routed = _plain_labels.get(routed, _UNSEEN)
        if routed is _UNSEEN:
            routed = clean_label(found[_ROUTED])
    if tier is not None:
        tier = _lower_labels.get(tier, _UNSEEN)
        if tier is _UNSEEN:
            tier = clean_label(found[_TIER], lower=True)
    if region is not None:
        region = _lower_labels.get(region, _UNSEEN)
        if region is _UNSEEN:
            region = clean_label(found[_REGION], lower=True)
    if region is None and request_region is not None:
        region = clean_label(request_region, lower=True)
    receipt_id = clean_receipt(receipt) if receipt is not None else None
    if receipt_id is None and receipt is not None:
        invalid = (*invalid, RECEIPT_ID)
    return _new_tuple(EnergyReading, (energy, carbon, routed, tier, region, receipt_id, invalid))


SCANNED = (
    _ENERGY_KEY,
    _CARBON_KEY,
    _ROUTED_KEY,
    _TIER_KEY,
    _RECEIPT_KEY,
    _REGION_KEY,
    b"content-type",
    b"content-encoding",
    b"openai-version",
    b"openai-processing-ms",
)
"""The response headers capture reads (lower-cased), in the order :func:`scan_headers` gives their values: first the
:data:`RESPONSE_HEADERS`, then ``X-Region`` (which a request sends too), then the rest."""
_ROUTED, _TIER, _REGION = 2, 3, 5
SCANNED_CONTENT_TYPE, SCANNED_CONTENT_ENCODING, SCANNED_OPENAI = 6, 7, 8
_SLOTS = {name: slot for slot, name in enumerate(SCANNED)}
assert SCANNED[: len(RESPONSE_HEADERS)] == tuple(name.encode("latin-1") for name in RESPONSE_HEADERS)


def scan_headers(headers: Any) -> list[Any]:
    """The values of the :data:`SCANNED` headers of an httpx (or httpx2) message, ``None`` where absent, in one pass.

    The last one sent wins, as in :func:`header_map`. One lookup in a fixed table a header, where building a map of
    them all grows a dict twice.
    """
    found: list[Any] = [None] * len(SCANNED)
    if headers is None:
        return found
    slots = _SLOTS
    try:
        for _, lowered, value in headers._list:
            slot = slots.get(lowered)
            if slot is not None:
                found[slot] = value
    except (AttributeError, TypeError, ValueError):  # not httpx's layout: the public view
        for name, value in headers.raw:
            slot = slots.get(name.lower())
            if slot is not None:
                found[slot] = value
    return found


_new_tuple = tuple.__new__
"""A named tuple made without its ``__new__`` (a Python function taking keywords): for tuples made once a call."""
_UNSEEN: Any = object()
_LABELS_CACHED = 4_096
_plain_labels: dict[str | bytes, str | None] = {}
_lower_labels: dict[str | bytes, str | None] = {}


def clean_label(value: str | bytes | None, *, lower: bool = False) -> str | None:
    """:func:`clean_string` (lower-cased if asked) of a value from a small set (models, tiers, regions), remembered.

    The memory is bounded: past :data:`_LABELS_CACHED` distinct values it starts over.
    """
    if value is None:
        return None
    labels = _lower_labels if lower else _plain_labels
    known = labels.get(value, _UNSEEN)
    if known is not _UNSEEN:
        return known  # type: ignore[no-any-return]
    cleaned = clean_string(value)
    if cleaned is not None and lower:
        cleaned = cleaned.lower()
    if len(labels) >= _LABELS_CACHED:  # an unbounded set of values: start over rather than grow
        labels.clear()
    labels[value] = cleaned
    return cleaned


def clean_receipt(value: str | bytes | None) -> str | None:
    """A receipt id exactly as received (the whitespace HTTP trims aside), or ``None`` for one no receipt could be.

    The receipt is the ledger's idempotency key, so it is never cleaned into another id: cut to 256 characters
    or stripped of control characters, two distinct ids would merge and one call would be dropped as a
    duplicate. An id longer than :data:`MAX_STRING`, with a control character, or not UTF-8 is refused whole
    (the call is a row without a receipt, and the header is counted as invalid).
    """
    if type(value) is bytes:
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if type(value) is not str:
        return None
    if not (value.isascii() and value.isprintable()):
        value = value.strip(" \t")
        if not value.isprintable():
            return None
    elif value[:1] == " " or value[-1:] == " ":
        value = value.strip(" ")
    return value if 0 < len(value) <= MAX_STRING else None


def header_map(headers: Any) -> dict[bytes, bytes]:
    """The headers of an httpx (or httpx2) message as ``{lower-cased name: raw value}``, built in one pass.

    ``headers.get(name)`` of httpx scans and decodes the whole list once per name, and ``headers.raw``
    copies it; httpx already keeps each lower-cased name beside the raw one, so read those.
    """
    if headers is None:
        return {}
    try:
        return {lowered: value for _, lowered, value in headers._list}
    except (AttributeError, TypeError, ValueError):  # not httpx's layout: the public view
        return {name.lower(): value for name, value in headers.raw}


def read_response(headers: Any, request_headers: Any) -> tuple[EnergyReading, list[Any]]:
    """The reading of a response's headers, and what :func:`scan_headers` found.

    The request's ``X-Region`` stands when the response does not say where the call was served.
    """
    found = scan_headers(headers)
    region = header_value(request_headers, _REGION_KEY) if found[_REGION] is None else None
    return read_scanned(found, region), found


def header_value(headers: Any, name: bytes) -> bytes | None:
    """One header of httpx's ``headers`` by lower-cased ``name`` (the last one sent), without building a map."""
    if headers is None:
        return None
    found = None
    try:
        for _, lowered, value in headers._list:
            if lowered == name:
                found = value
    except (AttributeError, TypeError, ValueError):
        for raw_name, value in headers.raw:
            if raw_name.lower() == name:
                found = value
    return found
