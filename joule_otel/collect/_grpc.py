"""OTLP/gRPC for ``joule-otel collect`` (port 4317), when grpcio is installed (the ``otlp`` extra brings it).

The same sink as OTLP/HTTP: a call is answered once its rows are in the spool. gRPC decodes the request itself;
the message size is bounded like an HTTP body, and the bearer token is checked in the metadata.
"""

from __future__ import annotations

import hmac
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from joule_otel.collect import _otlp
from joule_otel.collect._server import RowSink, submit

_log = logging.getLogger("joule_otel.collect")

WAIT_S = 60.0
"""How long a gRPC call waits for its rows to reach the spool before it is answered UNAVAILABLE (to retry)."""


def start_grpc(sink: RowSink, *, host: str, port: int, token: str | None) -> Any | None:
    """Serve OTLP/gRPC traces and logs; returns the server (``.stop(grace)``), or None if it cannot listen."""
    import grpc
    from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    expected = f"Bearer {token}".encode() if token else None

    def export(signal: str, decoded: _otlp.Decoded, context: Any) -> int:
        if expected is not None:
            given = dict(context.invocation_metadata()).get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "a bearer token is required (JOULE_OTEL_COLLECT_TOKEN)")
        if not submit(sink, signal, decoded).result(timeout=WAIT_S):
            context.abort(grpc.StatusCode.UNAVAILABLE, "the ledger's disk refused the rows; retry later")
        return decoded.rejected

    class Traces(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request: Any, context: Any) -> Any:
            decoded = _otlp.traces_from_message(request)
            rejected = export("traces", decoded, context)
            partial = trace_service_pb2.ExportTracePartialSuccess(
                rejected_spans=rejected, error_message="; ".join(dict.fromkeys(decoded.errors))[:512]
            )
            return trace_service_pb2.ExportTraceServiceResponse(partial_success=partial)

    class Logs(logs_service_pb2_grpc.LogsServiceServicer):
        def Export(self, request: Any, context: Any) -> Any:
            decoded = _otlp.logs_from_message(request)
            rejected = export("logs", decoded, context)
            partial = logs_service_pb2.ExportLogsPartialSuccess(
                rejected_log_records=rejected, error_message="; ".join(dict.fromkeys(decoded.errors))[:512]
            )
            return logs_service_pb2.ExportLogsServiceResponse(partial_success=partial)

    limit = _otlp.MAX_BODY_BYTES
    server = grpc.server(
        ThreadPoolExecutor(max_workers=4, thread_name_prefix="joule-otel-collect-grpc"),
        options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)],
    )
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), server)  # type: ignore[no-untyped-call]
    logs_service_pb2_grpc.add_LogsServiceServicer_to_server(Logs(), server)  # type: ignore[no-untyped-call]
    try:
        server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as exc:
        _log.warning("joule-otel collect: cannot serve OTLP/gRPC on %s:%s (%s); OTLP/HTTP only", host, port, exc)
        return None
    server.start()
    return server
