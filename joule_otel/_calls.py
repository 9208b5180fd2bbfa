"""A call's facts → its ledger row and its metric measurement: the one place a row's rules live.

Every way a call reaches the ledger reads its facts its own way — an HTTP exchange captured in the app
(:func:`read_exchange`, used by the capture pipeline and the proxy), an HTTP client span or a call event received by
``joule-otel collect`` — and then builds its row with :func:`call_row` and its measurement with
:func:`measurement`. The rules that make the same facts the same row whichever way they arrive are here: a call
without a workload is its service's, a status is an HTTP status or missing, a duration lasts at most a day, an error
is named by its status first, ids are lower-case hex.

A leaf module: pure functions over values, importing only the parsing modules beneath it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from joule_otel._decode import BodyFacts, parse_body
from joule_otel._genai import JOULE_PROVIDER, RequestFields, error_type_for, provider_of_scanned, request_fields
from joule_otel._headers import SCANNED_CONTENT_ENCODING, SCANNED_CONTENT_TYPE, EnergyReading, read_response
from joule_otel.ledger._row import LedgerRow
from joule_otel.ledger._row import duration_ms as bounded_ms

_new = tuple.__new__
"""A named tuple made from a tuple in its fields' order, without its keyword-taking ``__new__`` (one a call)."""


class Measurement(NamedTuple):
    """What one call contributes to the metrics."""

    key: tuple[str | None, ...]
    """(workload, operation, provider, requested model, routed model, tier, region, error type): one attribute set."""
    energy_j: float | None
    carbon_mg: float | None
    duration_s: float | None
    ttft_s: float | None
    input_tokens: int | None
    output_tokens: int | None
    trace_id: int | None
    span_id: int | None


def status_code(value: object) -> int | None:
    """An HTTP status (an int in [0, 1000)), else ``None``: a sender's ``true`` or ``"200"`` is not one."""
    return value if type(value) is int and 0 <= value < 1000 else None


def _hex_id(value: int | str | None, width: int) -> str | None:
    if type(value) is int:
        return f"{value:0{width}x}" if value else None
    return value or None  # type: ignore[return-value]


def call_row(
    *,
    receipt_id: str | None,
    started_us: int,
    duration_ms: object,
    ttft_ms: object,
    service: str | None,
    workload: str | None,
    operation: str | None,
    server_address: str | None,
    status: object,
    error: str | None = None,
    error_code: str | None = None,
    requested_model: str | None,
    routed_to: str | None,
    tier: str | None,
    region: str | None,
    energy_j: float | None,
    carbon_mg: float | None,
    input_tokens: int | None,
    output_tokens: int | None,
    stream: bool | None,
    trace_id: int | str | None,
    span_id: int | str | None,
    provider: str | None,
    tags: dict[str, str] | None = None,
) -> LedgerRow:
    """The ledger row of a call, from facts each already parsed and cleaned where it was read.

    The keywords are the ledger's columns, and: ``workload`` is the first name the call's own context gave (a
    ``workload()`` block, baggage, a span attribute, a parent's agent name) or None, and the call is then its
    service's; ``duration_ms`` and ``ttft_ms`` are as received (anything but a duration of at most a day is missing);
    ``status`` is the HTTP status as received (anything that is not one is missing); ``error`` is the error
    the call ended with when its status does not say (a transport error, a span's ``error.type``), ``error_code`` the
    response body's (``insufficient_balance``); ``trace_id`` and ``span_id`` are ints (this process's spans) or
    lower-case hex (received ones); ``tags`` are already merged and bounded (:func:`joule_otel._tags.merged`).
    """
    status_ = status_code(status)
    return _new(
        LedgerRow,
        (
            receipt_id,
            started_us,
            bounded_ms(duration_ms),
            bounded_ms(ttft_ms),
            service,
            workload or service,
            operation,
            server_address,
            status_,
            error_type_for(status_, error_code) or error,
            requested_model,
            routed_to,
            tier,
            region,
            energy_j,
            carbon_mg,
            input_tokens,
            output_tokens,
            stream,
            _hex_id(trace_id, 32),
            _hex_id(span_id, 16),
            provider,
            tags or None,
        ),
    )


def completed(row: LedgerRow, *, workload: str | None, **later: Any) -> LedgerRow:
    """``row`` completed with facts that arrived after it (its GenAI parent span's), by :func:`call_row`'s rules.

    ``later``: columns to set (``ttft_ms``, ``requested_model``, ``input_tokens``, ``output_tokens``, ``stream``).
    """
    if "ttft_ms" in later:
        later["ttft_ms"] = bounded_ms(later["ttft_ms"])
    return row._replace(workload=workload or row.service, **later)


def measurement(row: LedgerRow, workload: str) -> Measurement:
    """What ``row`` contributes to the metrics, under ``workload`` (its own, or ``other`` past the metrics' bound)."""
    duration, ttft = row.duration_ms, row.ttft_ms
    return _new(
        Measurement,
        (
            (
                workload,
                row.operation,
                row.provider,
                row.requested_model,
                row.routed_to,
                row.tier,
                row.region,
                row.error_type,
            ),
            row.energy_j,
            row.carbon_mg,
            duration / 1000.0 if duration is not None else None,
            ttft / 1000.0 if ttft is not None else None,
            row.input_tokens,
            row.output_tokens,
            int(row.trace_id, 16) if row.trace_id else None,
            int(row.span_id, 16) if row.span_id else None,
        ),
    )


class ExchangeFacts(NamedTuple):
    """What an HTTP exchange with an inference API says of its call: headers, request body and response body read."""

    reading: EnergyReading
    """The response's Joule headers (energy and carbon here are the headers'; see ``energy_j``)."""
    energy_j: float | None
    """The call's energy: a stream's final event wins over the header (it is the complete figure)."""
    carbon_mg: float | None
    requested_model: str | None
    stream: bool
    input_tokens: int | None
    output_tokens: int | None
    error_code: str | None
    provider: str
    is_sse: bool


_NO_BODY = BodyFacts()


def read_exchange(
    *,
    response_headers: Any,
    request_headers: Any,
    host: str | None,
    status: int | None,
    request: RequestFields | None = None,
    request_body: bytes | None = None,
    body: bytes = b"",
    decoded: bool = False,
    scanned: tuple[EnergyReading, list[Any]] | None = None,
) -> ExchangeFacts:
    """Every fact an HTTP exchange gives of its call, read once: the one parsing step between bytes and a row.

    The headers are httpx's, or anything with ``raw`` (name, value) byte pairs. ``request`` is the request body's
    fields when read already (else ``request_body`` is read); ``body`` the response body's bytes kept (all of it, or a
    tail), ``decoded`` whether its ``Content-Encoding`` is undone; ``scanned`` what
    :func:`~joule_otel._headers.read_response` made of these headers already (on the app's thread, for the span).
    """
    reading, found = scanned if scanned is not None else read_response(response_headers, request_headers)
    fields = request if request is not None else request_fields(request_body)
    content_type = found[SCANNED_CONTENT_TYPE]
    is_sse = content_type is not None and content_type.startswith(b"text/event-stream")
    if body:
        encoding = None if decoded else found[SCANNED_CONTENT_ENCODING]
        facts = parse_body(
            body,
            is_sse=is_sse,
            status_code=status,
            content_encoding=encoding.decode("latin-1") if encoding else "",
        )
    else:
        facts = _NO_BODY
    energy, carbon = reading.energy_j, reading.carbon_mg
    if facts.stream_energy_j is not None:
        energy = facts.stream_energy_j
        if facts.stream_carbon_mg is not None:
            carbon = facts.stream_carbon_mg
    joule = reading.receipt_id is not None or reading.energy_j is not None
    return _new(
        ExchangeFacts,
        (
            reading,
            energy,
            carbon,
            fields.model,
            is_sse if fields.stream is None else fields.stream or is_sse,
            facts.input_tokens,
            facts.output_tokens,
            facts.error_code,
            JOULE_PROVIDER if joule else provider_of_scanned(host, found),
            is_sse,
        ),
    )
