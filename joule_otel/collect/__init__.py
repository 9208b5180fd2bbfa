"""``joule-otel collect``: an OTLP/HTTP receiver that writes ledger rows: every language and host in one ledger.

- ``POST /v1/traces``: other languages' HTTP client spans that carry Joule's response headers (Node's undici and
  http instrumentations with ``headersToSpanAttributes``, the Java agent, .NET) become rows; tokens and the
  requested model come from the GenAI span around them (the Vercel AI SDK's), which may come in a later export.
- ``POST /v1/logs``: call events of joule-otel apps (``JOULE_OTEL_CALL_EVENTS=true``) become exactly the rows the
  app would have written locally.
- ``GET /healthz``: for orchestrators.

Protobuf and JSON, gzip, Content-Length or chunked. Loopback by default; any other address requires a bearer
token (``JOULE_OTEL_COLLECT_TOKEN``). It writes through the same spool and compaction as every other writer.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from joule_otel._config import JOULE_OTEL_COLLECT_TOKEN

__all__ = ["DEFAULT_GRPC_PORT", "DEFAULT_PORT", "serve"]

DEFAULT_PORT = 4318
DEFAULT_GRPC_PORT = 4317


def serve(
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    grpc_port: int | None = DEFAULT_GRPC_PORT,
    db: Path | None = None,
) -> None:
    """Serve until SIGTERM or Ctrl-C, then write every row (including those waiting for a parent span) and compact.

    OTLP/gRPC is served on ``grpc_port`` too when grpcio is installed (``None`` or 0: not at all).

    Raises:
        ValueError: listening off loopback without ``JOULE_OTEL_COLLECT_TOKEN``; missing dependencies.
    """
    from joule_otel.collect._server import is_loopback

    token = os.environ.get(JOULE_OTEL_COLLECT_TOKEN, "").strip() or None
    if not is_loopback(host) and token is None:
        raise ValueError(
            f"listening on {host} (not loopback) needs a bearer token: set {JOULE_OTEL_COLLECT_TOKEN} "
            "and give the same to every sender (OTEL_EXPORTER_OTLP_HEADERS=Authorization=Bearer%20<token>)"
        )
    from joule_otel._terminal import port_taken

    for taken, option in ((port, "--port"), (grpc_port, "--grpc-port")):
        if taken and port_taken(host, taken):  # said before anything starts, never a traceback from the server
            raise ValueError(f"port {taken} on {host} is already in use; pass another with {option}")
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError:
        raise ValueError("joule-otel collect needs its server: pip install 'joule-otel[collect]'") from None
    from joule_otel._config import Settings
    from joule_otel._exporters import resolve_providers, shutdown_created, signal_configured
    from joule_otel.collect._metrics import ServiceRecorders
    from joule_otel.collect._server import RowSink, create_app, decoding_workers
    from joule_otel.ledger._writer import LedgerWriter, load_arrow

    settings = Settings.resolve(db=db)
    providers = resolve_providers(settings, None, None)
    per_service = signal_configured("metrics", settings) and providers.meter_provider in providers.created
    recorders = ServiceRecorders(settings, providers, per_service=per_service)
    writer = LedgerWriter(settings.db_path) if settings.db_path is not None else None
    sink = RowSink(writer, recorders, settings.flush_interval_s)
    if writer is not None:
        load_arrow()  # before listening, not while the first exports wait
    decoders = decoding_workers()  # trace exports decoded where the CPU is: a process per core
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(sink, token=token, decoders=decoders),
            host=host,
            port=port,
            log_level="warning",
            access_log=False,
            lifespan="off",
        )
    )
    grpc_server = None
    if grpc_port:
        try:
            from joule_otel.collect._grpc import start_grpc
        except ImportError:
            grpc_server = None  # no grpcio: OTLP/HTTP only
        else:
            try:
                grpc_server = start_grpc(sink, host=host, port=grpc_port, token=token)
            except ValueError:  # taken between the check above and now
                if decoders is not None:
                    decoders.shutdown(wait=True, cancel_futures=True)
                sink.close()
                raise
    where = writer.db_path if writer is not None else "no ledger (JOULE_OTEL_DB=off)"
    also = f" and OTLP/gRPC on {host}:{grpc_port}" if grpc_server is not None else ""
    print(f"joule-otel collect: OTLP/HTTP on http://{host}:{port}{also}  →  {where}  (Ctrl-C stops)", flush=True)
    # uvicorn shuts down gracefully on SIGTERM/SIGINT and then raises the signal again for the handler it found:
    # make that handler a quiet one, so the rows still in memory are written below and the exit status is 0
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)
    try:
        server.run()
    finally:
        if grpc_server is not None:
            grpc_server.stop(grace=5).wait()
        if decoders is not None:
            decoders.shutdown(wait=True, cancel_futures=True)
        sink.close()
        recorders.shutdown()
        shutdown_created(providers)
