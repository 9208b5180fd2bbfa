"""Call events: one OTLP log record per captured call, carrying its whole ledger row, and back.

``JOULE_OTEL_CALL_EVENTS=true`` makes an app send them to the OTLP logs endpoint; ``joule-otel collect``
turns each back into exactly the row the app would have written locally. GenAI semantic-convention names
where they exist, ``joule.*`` for the rest; never content.
"""

from __future__ import annotations

from typing import Any

from joule_otel import _attributes as attr
from joule_otel._calls import call_row
from joule_otel._headers import clean_receipt, clean_string, parse_carbon, parse_energy, parse_token_count
from joule_otel._tags import TAG_PREFIX, from_attributes, merged
from joule_otel.ledger._row import LedgerRow, start_problem

EVENT_NAME = "joule.inference.call"

FIELDS: dict[str, str] = {
    "receipt_id": attr.JOULE_RECEIPT_ID,
    "duration_ms": "joule.duration_ms",
    "ttft_ms": "joule.ttft_ms",
    "workload": attr.JOULE_WORKLOAD,
    "operation": "joule.operation",
    "server_address": attr.SERVER_ADDRESS,
    "status_code": "http.response.status_code",
    "error_type": attr.ERROR_TYPE,
    "requested_model": attr.GEN_AI_REQUEST_MODEL,
    "routed_to": attr.GEN_AI_RESPONSE_MODEL,
    "tier": attr.JOULE_TIER,
    "region": attr.JOULE_REGION,
    "energy_j": attr.JOULE_ENERGY,
    "carbon_mg": attr.JOULE_CARBON,
    "input_tokens": "gen_ai.usage.input_tokens",
    "output_tokens": "gen_ai.usage.output_tokens",
    "stream": "joule.stream",
    "provider": attr.GEN_AI_PROVIDER_NAME,
    "service": "service.name",
}
"""Ledger column → event attribute. ``started_at`` is the record's time; trace and span ids are its own."""


def event_attributes(row: LedgerRow) -> dict[str, Any]:
    """The attributes of the call event of ``row`` (None values left out, as OTLP has no null)."""
    values = row._asdict()
    found = {key: values[name] for name, key in FIELDS.items() if values[name] is not None}
    if row.tags:
        found.update((TAG_PREFIX + key, value) for key, value in row.tags.items())
    return found


def _text(value: Any) -> str | None:
    return clean_string(value) if isinstance(value, str) else None


def row_from_event(attributes: dict[str, Any], *, time_ns: int, trace_id: str, span_id: str, service: Any) -> LedgerRow:
    """The ledger row a call event carries, every value checked as if it came from a header.

    Raises:
        ValueError: a start time no call could have (the record is refused, and counted by the receiver).
    """
    get = attributes.get
    stream = get(FIELDS["stream"])
    tier, region = _text(get(FIELDS["tier"])), _text(get(FIELDS["region"]))
    started_at_us = int(time_ns) // 1000
    refused = start_problem(started_at_us)
    if refused:
        raise ValueError(refused)
    return call_row(
        receipt_id=clean_receipt(get(FIELDS["receipt_id"])),
        started_us=started_at_us,
        duration_ms=get(FIELDS["duration_ms"]),
        ttft_ms=get(FIELDS["ttft_ms"]),
        service=_text(get(FIELDS["service"])) or _text(service),
        workload=_text(get(FIELDS["workload"])),
        operation=_text(get(FIELDS["operation"])),
        server_address=_text(get(FIELDS["server_address"])),
        status=get(FIELDS["status_code"]),
        error=_text(get(FIELDS["error_type"])),
        requested_model=_text(get(FIELDS["requested_model"])),
        routed_to=_text(get(FIELDS["routed_to"])),
        tier=tier.lower() if tier else None,
        region=region.lower() if region else None,
        energy_j=parse_energy(get(FIELDS["energy_j"])),
        carbon_mg=parse_carbon(get(FIELDS["carbon_mg"])),
        input_tokens=parse_token_count(get(FIELDS["input_tokens"])),
        output_tokens=parse_token_count(get(FIELDS["output_tokens"])),
        stream=stream if isinstance(stream, bool) else None,
        trace_id=trace_id,
        span_id=span_id,
        provider=_text(get(FIELDS["provider"])),
        tags=merged(from_attributes(attributes))[0],
    )
