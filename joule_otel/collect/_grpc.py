"""OTLP/gRPC for ``joule-otel collect`` (port 4317), when grpcio is installed (the ``otlp`` extra brings it).

The same sink as OTLP/HTTP: a call is answered once its rows are in the spool. gRPC decodes the request itself;
the message size is bounded like an HTTP body, and the bearer token is checked in the metadata.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from joule_otel.collect import _otlp
from joule_otel.collect._server import RowSink, authorized, protobuf_answer, submit

_log = logging.getLogger("joule_otel.collect")

WAIT_S = 60.0
"""How long a gRPC call waits for its rows to reach the spool before it is answered UNAVAILABLE (to retry)."""


def start_grpc(sink: RowSink, *, host: str, port: int, token: str | None) -> Any | None:
    """Serve OTLP/gRPC traces and logs; returns the server (``.stop(grace)``), or None if it cannot listen."""
    import grpc

    class TokenFirst(grpc.ServerInterceptor):  # type: ignore[misc]
        """Checks the token in the metadata before the message is decoded (a stranger's 13 MB costs nothing)."""

        def intercept_service(self, continuation: Any, details: Any) -> Any:
            if authorized(dict(details.invocation_metadata).get("authorization"), token):
                return continuation(details)
            return grpc.unary_unary_rpc_method_handler(refuse)  # no deserializer: the bytes stay unread

    def refuse(request: bytes, context: Any) -> None:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "a bearer token is required (JOULE_OTEL_COLLECT_TOKEN)")

    def export(signal: str, decoded: _otlp.Decoded, context: Any) -> int:
        if not submit(sink, signal, decoded).result(timeout=WAIT_S):
            context.abort(grpc.StatusCode.UNAVAILABLE, "the ledger's disk refused the rows; retry later")
        return decoded.rejected

    def handler(signal: str, reader: Any) -> Any:
        def export_message(body: bytes, context: Any) -> bytes:
            try:
                decoded: _otlp.Decoded = reader(body)
            except _otlp.PayloadError as exc:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            rejected = export(signal, decoded, context)
            return protobuf_answer(signal, rejected, "; ".join(dict.fromkeys(decoded.errors))[:512])

        return grpc.unary_unary_rpc_method_handler(export_message)  # bytes in, bytes out: no (de)serializer

    # the messages arrive as bytes and are read as OTLP/HTTP's are: an export nested past the protobuf runtime's
    # depth limit is then read record by record, not refused whole by the gRPC runtime
    handlers = [
        grpc.method_handlers_generic_handler(
            f"opentelemetry.proto.collector.{service}", {"Export": handler(signal, reader)}
        )
        for service, signal, reader in (
            ("trace.v1.TraceService", "traces", _otlp.traces_from_protobuf),
            ("logs.v1.LogsService", "logs", _otlp.logs_from_protobuf),
        )
    ]

    limit = _otlp.MAX_BODY_BYTES
    server = grpc.server(
        ThreadPoolExecutor(max_workers=4, thread_name_prefix="joule-otel-collect-grpc"),
        interceptors=[TokenFirst()],
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            # gRPC shares a port by default (SO_REUSEPORT): a second receiver would bind it too, and the kernel
            # would split the senders between two ledgers
            ("grpc.so_reuseport", 0),
        ],
    )
    server.add_generic_rpc_handlers(handlers)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:
        bound = 0
    if not bound:  # grpcio raises or returns 0, by version
        raise ValueError(f"port {port} on {host} is already in use; pass another with --grpc-port (0: no gRPC)")
    server.start()
    return server
