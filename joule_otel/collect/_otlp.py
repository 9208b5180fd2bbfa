"""OTLP/HTTP request bodies (protobuf or JSON, any compression) → plain spans and log records.

Protobuf is decoded with ``opentelemetry-proto``. JSON is read by hand: OTLP/JSON carries trace and span ids
as hex (protobuf's ``json_format`` would read them as base64) and 64-bit integers as strings. A record that
cannot be read is counted and skipped; only a payload that cannot be read at all is an error.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

MAX_BODY_BYTES = 16 << 20
"""A request body larger than this, as sent or once decompressed, is refused with 413."""


class PayloadError(Exception):
    """The payload cannot be read at all (400), or is too large (413 when ``too_large``)."""

    def __init__(self, message: str, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large

    def __reduce__(self) -> tuple[type[PayloadError], tuple[str, bool]]:
        # raised in a decoding worker process, re-raised here: keep ``too_large`` across the pickle
        return type(self), (str(self), self.too_large)


@dataclass
class Span:
    """One span, with its resource's attributes."""

    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: int
    """OTLP's SpanKind: 3 is CLIENT."""
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    resource: dict[str, Any]


@dataclass
class LogRecord:
    """One log record, with its resource's attributes."""

    time_ns: int
    event_name: str
    trace_id: str
    span_id: str
    attributes: dict[str, Any]
    resource: dict[str, Any]


@dataclass
class Decoded:
    """What a request held, and how many of its items could not be read."""

    spans: list[Span] = field(default_factory=list)
    logs: list[LogRecord] = field(default_factory=list)
    rejected: int = 0
    errors: list[str] = field(default_factory=list)


SPAN_KIND_CLIENT = 3


def decompress(body: bytes, encoding: str) -> bytes:
    """``body`` decoded per ``Content-Encoding`` (identity, gzip, deflate), never past :data:`MAX_BODY_BYTES`."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate", "x-gzip"):
        raise PayloadError(f"unsupported Content-Encoding {encoding!r}; use gzip or none")
    inflater = zlib.decompressobj(47 if encoding != "deflate" else 15)
    try:
        out = inflater.decompress(body, MAX_BODY_BYTES + 1)
    except zlib.error as exc:
        raise PayloadError(f"the {encoding} body cannot be decompressed: {exc}") from None
    if len(out) > MAX_BODY_BYTES or inflater.unconsumed_tail:
        raise PayloadError(f"the body is larger than {MAX_BODY_BYTES} bytes once decompressed", too_large=True)
    return out


# -- protobuf -----------------------------------------------------------------------------------------------------


def _pb_value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_pb_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _pb_value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind)


RELEVANT = frozenset(
    {
        "url.full",
        "http.url",
        "url.path",
        "http.target",
        "server.address",
        "net.peer.name",
        "http.host",
        "http.response.status_code",
        "http.status_code",
        "error.type",
        "joule.workload",
        "service.name",
        "gen_ai.usage.input_tokens",
        "gen_ai.usage.output_tokens",
        "gen_ai.request.model",
        "gen_ai.agent.name",
        "ai.usage.inputTokens",
        "ai.usage.outputTokens",
        "ai.usage.promptTokens",
        "ai.usage.completionTokens",
        "ai.model.id",
        "ai.response.msToFirstChunk",
        "ai.telemetry.functionId",
    }
)
"""The span attributes a ledger row is made of; captured headers (``http.*.header.*``) are read too, the rest never:
an HTTP span carries a dozen more (user agent, peer address…) that would only cost decoding."""
HEADER_PREFIXES = ("http.response.header.", "http.request.header.")
TAG_PREFIX = "joule.tag."
"""Chargeback tags (``joule.tag.team``) are read too."""


def _pb_attributes(items: Any) -> dict[str, Any]:
    return {kv.key: _pb_value(kv.value) for kv in items}


def _pb_span_attributes(items: Any) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for kv in items:
        key = kv.key
        if key in RELEVANT or key.startswith(TAG_PREFIX):
            found[key] = _pb_value(kv.value)
        elif key.startswith(HEADER_PREFIXES):
            # a captured header: a string array (the last value counts) or one string (Node's http joins them)
            values = kv.value.array_value.values
            found[key] = values[-1].string_value if values else kv.value.string_value
    return found


def traces_from_protobuf(body: bytes) -> Decoded:
    """Spans of an ``ExportTraceServiceRequest``."""
    from google.protobuf.message import DecodeError
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    try:
        request = ExportTraceServiceRequest.FromString(body)
    except (DecodeError, RuntimeError, ValueError) as exc:
        return _item_by_item(body, "traces", exc)
    return traces_from_message(request)


def traces_from_message(request: Any) -> Decoded:
    """Spans of a decoded ``ExportTraceServiceRequest`` (OTLP/gRPC hands it over decoded)."""
    found = Decoded()
    for resource_spans in request.resource_spans:
        resource = _pb_attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                try:
                    found.spans.append(
                        Span(
                            span.trace_id.hex(),
                            span.span_id.hex(),
                            span.parent_span_id.hex(),
                            span.name,
                            span.kind,
                            span.start_time_unix_nano,
                            span.end_time_unix_nano,
                            _pb_span_attributes(span.attributes),
                            resource,
                        )
                    )
                except Exception as exc:  # a span this code cannot read: skipped, counted
                    found.rejected += 1
                    found.errors.append(str(exc))
    return found


def logs_from_protobuf(body: bytes) -> Decoded:
    """Log records of an ``ExportLogsServiceRequest``."""
    from google.protobuf.message import DecodeError
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

    try:
        request = ExportLogsServiceRequest.FromString(body)
    except (DecodeError, RuntimeError, ValueError) as exc:
        return _item_by_item(body, "logs", exc)
    return logs_from_message(request)


def _item_by_item(body: bytes, signal: str, failure: Exception) -> Decoded:
    """An export the protobuf runtime refused whole, read span by span (or record by record).

    The runtime refuses a message nested deeper than 100 levels: one attribute nested ~33 levels deep (a value
    in a list in a map, and so on) would lose every record of the export. Walked at the wire level down to the
    records, each is decoded on its own: the one that cannot be is counted and skipped, the rest land. A body
    that is not protobuf at all is still a :class:`PayloadError` (400).
    """
    from google.protobuf.message import DecodeError

    if signal == "traces":
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest as Request
        from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans as Block
        from opentelemetry.proto.trace.v1.trace_pb2 import Span as Item
    else:
        from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (  # type: ignore[assignment]
            ExportLogsServiceRequest as Request,
        )
        from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord as Item  # type: ignore[assignment]
        from opentelemetry.proto.logs.v1.logs_pb2 import ResourceLogs as Block  # type: ignore[assignment]
    from opentelemetry.proto.resource.v1.resource_pb2 import Resource

    request, skipped, errors = Request(), 0, []
    try:
        for _, block_bytes in _wire_fields(body, 1):  # resource_spans / resource_logs
            block = Block()
            for number, value in _wire_fields(block_bytes):
                if number == 1:  # resource
                    try:
                        block.resource.CopyFrom(Resource.FromString(value))
                    except DecodeError as exc:
                        errors.append(f"resource skipped: {exc}")
                elif number == 2:  # scope_spans / scope_logs
                    scope = block.scope_spans.add() if signal == "traces" else block.scope_logs.add()
                    items = scope.spans if signal == "traces" else scope.log_records
                    for _, item_bytes in _wire_fields(value, 2):  # spans / log_records
                        try:
                            items.append(Item.FromString(item_bytes))
                        except DecodeError as exc:
                            skipped += 1
                            errors.append(f"a record that cannot be decoded was skipped: {exc}")
            (request.resource_spans if signal == "traces" else request.resource_logs).append(block)
    except (ValueError, IndexError):
        raise PayloadError(f"not an OTLP export: {failure}") from None
    found = traces_from_message(request) if signal == "traces" else logs_from_message(request)
    found.rejected += skipped
    found.errors += errors
    return found


def _wire_fields(buffer: bytes, only: int | None = None) -> Iterator[tuple[int, bytes]]:
    """(field number, bytes) of the length-delimited fields of a protobuf message (``only`` one number)."""
    at, end = 0, len(buffer)
    while at < end:
        key, at = _varint(buffer, at)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, at = _varint(buffer, at)
            continue
        if wire_type in (1, 5):
            at += 8 if wire_type == 1 else 4
            continue
        if wire_type != 2:
            raise ValueError(f"wire type {wire_type}")
        size, at = _varint(buffer, at)
        if at + size > end:
            raise ValueError("truncated")
        if only is None or number == only:
            yield number, buffer[at : at + size]
        at += size
    if at != end:
        raise ValueError("truncated")


def _varint(buffer: bytes, at: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = buffer[at]  # IndexError past the end: truncated
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def logs_from_message(request: Any) -> Decoded:
    """Log records of a decoded ``ExportLogsServiceRequest``."""
    found = Decoded()
    for resource_logs in request.resource_logs:
        resource = _pb_attributes(resource_logs.resource.attributes)
        for scope_logs in resource_logs.scope_logs:
            for record in scope_logs.log_records:
                try:
                    found.logs.append(
                        LogRecord(
                            time_ns=int(record.time_unix_nano or record.observed_time_unix_nano),
                            event_name=record.event_name,
                            trace_id=record.trace_id.hex(),
                            span_id=record.span_id.hex(),
                            attributes=_pb_attributes(record.attributes),
                            resource=resource,
                        )
                    )
                except Exception as exc:
                    found.rejected += 1
                    found.errors.append(str(exc))
    return found


# -- JSON -----------------------------------------------------------------------------------------------------------


def _json_value(value: Any) -> Any:
    if not isinstance(value, dict) or not value:
        return None
    kind, inner = next(iter(value.items()))
    if kind == "stringValue":
        return str(inner)
    if kind == "intValue":
        return int(inner)  # a string in OTLP/JSON (64 bits), or a number
    if kind == "doubleValue":
        return float(inner)
    if kind == "boolValue":
        return bool(inner)
    if kind == "arrayValue":
        return [_json_value(v) for v in (inner or {}).get("values", [])]
    if kind == "kvlistValue":
        return {kv["key"]: _json_value(kv.get("value")) for kv in (inner or {}).get("values", [])}
    if kind == "bytesValue":
        return str(inner)
    return None


def _json_attributes(items: Any, errors: list[str] | None = None) -> dict[str, Any]:
    """Attributes of OTLP/JSON; with ``errors``, one that cannot be read is skipped and said there, not raised."""
    if not isinstance(items, list):
        return {}
    found: dict[str, Any] = {}
    for kv in items:
        if not isinstance(kv, dict) or not isinstance(kv.get("key"), str):
            continue
        try:
            found[kv["key"]] = _json_value(kv.get("value"))
        except (ValueError, TypeError, AttributeError, KeyError, RecursionError) as exc:
            if errors is None:
                raise
            errors.append(f"attribute {kv['key'][:64]!r} skipped: {exc}"[:256])
    return found


_HEX = frozenset("0123456789abcdefABCDEF")


def _hex_id(value: Any, length: int, name: str) -> str:
    """An OTLP/JSON id: hex of ``length`` characters, or empty. Base64 (protobuf's JSON mapping) is refused."""
    if value in (None, ""):
        return ""
    if not isinstance(value, str) or len(value) != length or not set(value) <= _HEX:
        raise ValueError(f"{name} {value!r} is not {length} hex characters (OTLP/JSON ids are hex, not base64)")
    return value.lower()


def _json_body(body: bytes) -> dict[str, Any]:
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise PayloadError(f"not JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise PayloadError("an OTLP/JSON request is an object")
    return parsed


def _items(parsed: dict[str, Any], errors: list[str], *keys: str) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(resource attributes, item) for every item under resource → scope → item lists.

    A resource's attributes are read leniently (a bad one is skipped and said in ``errors``): they are shared by
    every record below, which are checked one by one where they are made.
    """
    outer, middle, inner = keys
    for resource_block in _list(parsed.get(outer)):
        if not isinstance(resource_block, dict):
            continue
        described = resource_block.get("resource")
        resource = _json_attributes(described.get("attributes"), errors) if isinstance(described, dict) else {}
        for scope_block in _list(resource_block.get(middle)):
            if not isinstance(scope_block, dict):
                continue
            for item in _list(scope_block.get(inner)):
                yield resource, item


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def traces_from_json(body: bytes) -> Decoded:
    """Spans of an OTLP/JSON trace export."""
    found = Decoded()
    for resource, span in _items(_json_body(body), found.errors, "resourceSpans", "scopeSpans", "spans"):
        try:
            found.spans.append(
                Span(
                    trace_id=_hex_id(span.get("traceId"), 32, "traceId"),
                    span_id=_hex_id(span.get("spanId"), 16, "spanId"),
                    parent_span_id=_hex_id(span.get("parentSpanId"), 16, "parentSpanId"),
                    name=str(span.get("name", "")),
                    kind=_span_kind(span.get("kind", 0)),
                    start_ns=int(span.get("startTimeUnixNano", 0)),
                    end_ns=int(span.get("endTimeUnixNano", 0)),
                    attributes=_json_attributes(span.get("attributes")),
                    resource=resource,
                )
            )
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            found.rejected += 1
            found.errors.append(str(exc))
    return found


_KIND_NAMES = {"SPAN_KIND_INTERNAL": 1, "SPAN_KIND_SERVER": 2, "SPAN_KIND_CLIENT": 3, "SPAN_KIND_PRODUCER": 4}


def _span_kind(value: Any) -> int:
    return _KIND_NAMES.get(value, 0) if isinstance(value, str) else int(value)


def logs_from_json(body: bytes) -> Decoded:
    """Log records of an OTLP/JSON logs export."""
    found = Decoded()
    for resource, record in _items(_json_body(body), found.errors, "resourceLogs", "scopeLogs", "logRecords"):
        try:
            found.logs.append(
                LogRecord(
                    time_ns=int(record.get("timeUnixNano") or record.get("observedTimeUnixNano") or 0),
                    event_name=str(record.get("eventName", "")),
                    trace_id=_hex_id(record.get("traceId"), 32, "traceId"),
                    span_id=_hex_id(record.get("spanId"), 16, "spanId"),
                    attributes=_json_attributes(record.get("attributes")),
                    resource=resource,
                )
            )
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            found.rejected += 1
            found.errors.append(str(exc))
    return found
