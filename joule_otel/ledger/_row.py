"""One ledger row: the shape every writer (capture, ``joule-otel collect``) hands the spool.

A ``NamedTuple`` rather than a dataclass: the spool turns a batch of them into Arrow in one C++ call
(:func:`joule_otel.ledger._writer.rows_to_arrow`), and a row is built for every call on a hot path.
Values are validated where they are parsed (:mod:`joule_otel._headers`); :func:`problem` checks a
finished row against the ledger's column types, so one bad row is dropped and counted, never left to
block the rows around it.
"""

from __future__ import annotations

import math
import time
from typing import NamedTuple

from joule_otel._headers import MAX_CARBON_MG, MAX_ENERGY_J, MAX_TOKENS
from joule_otel.ledger import _schema as schema


class LedgerRow(NamedTuple):
    """A row of ``inference_calls``, in table order (see DESIGN.md's ledger contract for each column)."""

    receipt_id: str | None
    started_at_us: int
    """Request start, µs since the epoch (UTC)."""
    duration_ms: float | None
    ttft_ms: float | None
    service: str | None
    workload: str | None
    operation: str | None
    server_address: str | None
    status_code: int | None
    error_type: str | None
    requested_model: str | None
    routed_to: str | None
    tier: str | None
    region: str | None
    energy_j: float | None
    carbon_mg: float | None
    input_tokens: int | None
    output_tokens: int | None
    stream: bool | None
    trace_id: str | None
    span_id: str | None
    provider: str | None
    tags: dict[str, str] | None = None
    """Chargeback tags (at most 16), or None (the default, so rows built before version 4 still are)."""


assert tuple(name if name != "started_at_us" else "started_at" for name in LedgerRow._fields) == schema.COLUMN_NAMES

_INT32 = (1 << 31) - 1

MAX_DURATION_MS = 86_400_000.0
"""A day: no single inference call lasts longer; a duration beyond it (or infinite) is missing, like a bad figure."""
EARLIEST_START_US = 1_577_836_800_000_000
"""2020-01-01T00:00Z: before any call the ledger could hold (a 1970 start is an unset clock, not a call)."""
FUTURE_SLACK_US = 86_400_000_000
"""A day: how far ahead of this machine's clock a sender's clock may run before its start times are refused."""


def duration_ms(value: object) -> float | None:
    """A duration or time to first chunk in ms: finite, in [0, :data:`MAX_DURATION_MS`], else ``None``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if 0 <= value <= MAX_DURATION_MS else None  # NaN fails, inf is above


def start_problem(started_at_us: object, now_us: int | None = None) -> str | None:
    """Why a start time (µs since the epoch) is not one a call could have, or ``None``."""
    latest = (time.time_ns() // 1000 if now_us is None else now_us) + FUTURE_SLACK_US
    if type(started_at_us) is not int or not EARLIEST_START_US <= started_at_us <= latest:
        return f"started_at is not a time a call could have started: {started_at_us!r} µs since 1970"
    return None


def _string_problem(name: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        return f"{name} is a {type(value).__name__}, not a string"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return f"{name} holds text that cannot be written as UTF-8"
    return None


def problem(row: LedgerRow) -> str | None:
    """Why ``row`` cannot be written to the ledger, or ``None`` if it can."""
    if not isinstance(row, tuple) or len(row) != len(LedgerRow._fields):
        return f"not a ledger row: {type(row).__name__}"
    for name in (
        "receipt_id",
        "service",
        "workload",
        "operation",
        "server_address",
        "error_type",
        "requested_model",
        "routed_to",
        "tier",
        "region",
        "trace_id",
        "span_id",
        "provider",
    ):
        found = _string_problem(name, getattr(row, name))
        if found:
            return found
    found = start_problem(row.started_at_us)
    if found:
        return found
    if row.status_code is not None and (type(row.status_code) is not int or not 0 <= row.status_code <= _INT32):
        return f"status_code is not an HTTP status: {row.status_code!r}"
    for name, ceiling in (
        ("duration_ms", MAX_DURATION_MS),
        ("ttft_ms", MAX_DURATION_MS),
        ("energy_j", MAX_ENERGY_J),
        ("carbon_mg", MAX_CARBON_MG),
    ):
        value = getattr(row, name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= ceiling:
            return f"{name} is not a figure in [0, {ceiling}]: {value!r}"
        if not math.isfinite(value):
            return f"{name} is not finite: {value!r}"
    for name in ("input_tokens", "output_tokens"):
        value = getattr(row, name)
        if value is not None and (type(value) is not int or not 0 <= value <= MAX_TOKENS):
            return f"{name} is not a token count that fits a BIGINT: {value!r}"
    if row.stream is not None and type(row.stream) is not bool:
        return f"stream is not a boolean: {row.stream!r}"
    return None
