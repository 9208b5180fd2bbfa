"""Where telemetry goes: reuse the app's providers, or set up OTLP / Prometheus when asked.

Never replaces a provider the app (or ``opentelemetry-instrument``) already set. When none is set:
OTLP export is configured from the standard ``OTEL_EXPORTER_OTLP_*`` variables (or
``instrument(otlp_endpoint=...)``), and a Prometheus scrape endpoint from ``prometheus_port``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import weakref
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider

from joule_otel._config import Settings

_log = logging.getLogger("joule_otel")

_OTLP_HINT = "install the exporter with: pip install 'joule-otel[otlp]'"


@dataclass
class Providers:
    """The providers capture uses, and what this module started (to stop on uninstrument)."""

    tracer_provider: Any | None
    meter_provider: Any
    service_name: str
    created: list[Any] = field(default_factory=list)
    prometheus_server: Any | None = None
    logger_provider: Any | None = None
    """Where call events go (``JOULE_OTEL_CALL_EVENTS``); None when they are off."""


def signal_configured(signal: str, settings: Settings) -> bool:
    exporter = os.environ.get(f"OTEL_{signal.upper()}_EXPORTER", "").strip().lower()
    if exporter and "otlp" not in exporter.split(","):
        return False
    return bool(
        settings.otlp_endpoint
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or os.environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT")
    )


def _protocol(signal: str) -> str:
    return (
        (
            os.environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL")
            or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or "http/protobuf"
        )
        .strip()
        .lower()
    )


_SESSIONS: weakref.WeakSet[Any] = weakref.WeakSet()
"""The HTTP sessions of the OTLP/HTTP exporters joule-otel made (their keep-alive connections)."""


def _own_session() -> dict[str, Any]:
    """``session=`` for an OTLP/HTTP exporter: one joule-otel can start afresh in a forked child.

    Left to the exporter (``{}``) when a credential provider is configured, which brings a session of its own.
    """
    if any("CREDENTIAL_PROVIDER" in name for name in os.environ):
        return {}
    try:
        import requests
    except ImportError:
        return {}
    session = requests.Session()
    _SESSIONS.add(session)
    return {"session": session}


def fresh_connections_after_fork() -> None:
    """In a forked child: let go of the keep-alive connections inherited from the parent's exporters.

    Parent and child would otherwise write their requests on one socket (the receiver sees garbage, answers 400,
    and a batch is lost while both processes think it was sent). Closing the child's copies leaves the parent's
    connections open; the child's next export opens its own.
    """
    for session in list(_SESSIONS):
        with contextlib.suppress(Exception):
            session.close()


def otlp_exporter(signal: str, settings: Settings) -> Any | None:
    """An OTLP span or metric exporter configured by the standard env vars (or ``otlp_endpoint``)."""
    kind = "trace" if signal == "traces" else "metric"
    cls_name = "OTLPSpanExporter" if signal == "traces" else "OTLPMetricExporter"
    kwargs: dict[str, Any] = {}
    try:
        if _protocol(signal) == "grpc":
            module = __import__(f"opentelemetry.exporter.otlp.proto.grpc.{kind}_exporter", fromlist=[cls_name])
            if settings.otlp_endpoint:
                kwargs["endpoint"] = settings.otlp_endpoint
        else:
            module = __import__(f"opentelemetry.exporter.otlp.proto.http.{kind}_exporter", fromlist=[cls_name])
            if settings.otlp_endpoint:
                kwargs["endpoint"] = settings.otlp_endpoint.rstrip("/") + f"/v1/{signal}"
            kwargs.update(_own_session())
    except ImportError:
        _log.warning("joule_otel: OTLP %s export is configured but its exporter is missing; %s", signal, _OTLP_HINT)
        return None
    return getattr(module, cls_name)(**kwargs)


def _service_name(*providers: Any) -> str:
    for provider in providers:
        resource = getattr(provider, "resource", None) or getattr(provider, "_sdk_config", None)
        resource = getattr(resource, "resource", resource)
        name = getattr(resource, "attributes", {}).get(SERVICE_NAME) if resource is not None else None
        if name:
            return str(name)
    return str(Resource.create().attributes.get(SERVICE_NAME, "unknown_service"))


def resolve_providers(settings: Settings, tracer_provider: Any | None, meter_provider: Any | None) -> Providers:
    """Reuse what the app configured; create (and set globally) only what is missing and asked for."""
    created: list[Any] = []
    global_tp = trace.get_tracer_provider()
    tp = tracer_provider
    # "the app has a provider" is judged by what the API says, not by the SDK's class: Logfire's proxy provider, a
    # vendor's or a wrapper around the SDK's are the app's as much as the SDK's own is
    app_set_tp = not isinstance(global_tp, trace.ProxyTracerProvider)
    if tp is None and app_set_tp and not isinstance(global_tp, trace.NoOpTracerProvider):
        tp = global_tp
    if tp is None and not app_set_tp and signal_configured("traces", settings):
        exporter = otlp_exporter("traces", settings)
        if exporter is not None:
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            tp = SdkTracerProvider(resource=Resource.create())
            tp.add_span_processor(BatchSpanProcessor(exporter))
            trace.set_tracer_provider(tp)
            created.append(tp)

    global_mp = metrics.get_meter_provider()
    mp = meter_provider
    if mp is None and type(global_mp).__name__ != "_ProxyMeterProvider":  # the app set one (a no-op one included)
        mp = global_mp
        if settings.prometheus_port is not None:
            _log.warning(
                "joule_otel: the app already set a MeterProvider; add a PrometheusMetricReader to it "
                "yourself (prometheus_port is ignored)"
            )
    prometheus_server = None
    if mp is None:
        readers: list[Any] = []
        if signal_configured("metrics", settings):
            exporter = otlp_exporter("metrics", settings)
            if exporter is not None:
                from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

                readers.append(PeriodicExportingMetricReader(exporter))
        if settings.prometheus_port is not None:
            reader, prometheus_server = _prometheus(settings)
            if reader is not None:
                readers.append(reader)
        if readers:
            mp = SdkMeterProvider(metric_readers=readers, resource=Resource.create())
            metrics.set_meter_provider(mp)
            created.append(mp)
        else:
            mp = global_mp  # a proxy: recording is nearly free, and starts counting once the app sets one
    logger_provider = _logger_provider(settings, created) if settings.call_events else None
    return Providers(tp, mp, _service_name(tp, mp), created, prometheus_server, logger_provider)


def _logger_provider(settings: Settings, created: list[Any]) -> Any | None:
    """The app's LoggerProvider, else one exporting OTLP logs (to the standard endpoint) that joule-otel sets up."""
    from opentelemetry import _logs

    current = _logs.get_logger_provider()
    if type(current).__name__ not in ("ProxyLoggerProvider", "NoOpLoggerProvider"):
        return current
    if not signal_configured("logs", settings):
        _log.warning(
            "joule_otel: call events are on but no OTLP logs endpoint is configured "
            "(OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_LOGS_ENDPOINT or otlp_endpoint): they go nowhere"
        )
        return None
    try:
        from opentelemetry.sdk._logs import LoggerProvider
        from opentelemetry.sdk._logs.export import BatchLogRecordProcessor

        if _protocol("logs") == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
        else:
            from opentelemetry.exporter.otlp.proto.http._log_exporter import (  # type: ignore[assignment]
                OTLPLogExporter,
            )
    except ImportError:
        _log.warning("joule_otel: call events need the OTLP log exporter; %s", _OTLP_HINT)
        return None
    kwargs: dict[str, Any] = {}
    grpc = _protocol("logs") == "grpc"
    if settings.otlp_endpoint:
        kwargs["endpoint"] = settings.otlp_endpoint if grpc else settings.otlp_endpoint.rstrip("/") + "/v1/logs"
    if not grpc:
        kwargs.update(_own_session())
    provider = LoggerProvider(resource=Resource.create())
    provider.add_log_record_processor(BatchLogRecordProcessor(OTLPLogExporter(**kwargs)))
    _logs.set_logger_provider(provider)
    created.append(provider)
    return provider


def _prometheus(settings: Settings) -> tuple[Any | None, Any | None]:
    try:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import start_http_server
    except ImportError:
        _log.warning("joule_otel: prometheus_port is set but the Prometheus exporter is missing; %s", _OTLP_HINT)
        return None, None
    reader = PrometheusMetricReader()
    try:
        started = start_http_server(settings.prometheus_port or 0, addr=settings.prometheus_host)
    except OSError as exc:
        _log.error(
            "joule_otel: cannot serve Prometheus metrics on %s:%s (%s); with several worker processes "
            "give each its own port or use OTLP",
            settings.prometheus_host,
            settings.prometheus_port,
            exc,
        )
        return reader, None
    return reader, started


def _is_pull_reader(reader: Any) -> bool:
    """A reader that is collected when scraped (Prometheus): collecting it on a flush would add its data twice."""
    return any(cls.__name__ == "PrometheusMetricReader" for cls in type(reader).__mro__)


def flush_provider(provider: Any, timeout_s: float) -> None:
    """Export what ``provider`` (a MeterProvider or TracerProvider) holds now, without disturbing scrape endpoints.

    ``MeterProvider.force_flush`` collects every reader, and a Prometheus reader queues each collection for the next
    scrape, which then shows every series once per flush: push readers are flushed one by one instead.
    """
    timeout_ms = int(timeout_s * 1000)
    readers = getattr(provider, "_metric_readers", None)  # the SDK's MeterProvider; a TracerProvider has none
    if readers is None:
        readers = getattr(getattr(provider, "_sdk_config", None), "metric_readers", None)  # older SDKs
    try:
        if readers is not None:
            for reader in readers:
                if not _is_pull_reader(reader):
                    reader.force_flush(timeout_millis=timeout_ms)
            return
        force_flush = getattr(provider, "force_flush", None)
        if force_flush is not None:
            force_flush(timeout_ms)
    except Exception:
        _log.debug("joule_otel: flushing %s failed", type(provider).__name__, exc_info=True)


def shutdown_created(providers: Providers) -> None:
    """Shut down what joule-otel set up itself (exporting what they hold); the app's own providers are the app's."""
    for provider in providers.created:
        try:
            provider.shutdown()
        except Exception:
            _log.debug("joule_otel: shutting down %s failed", type(provider).__name__, exc_info=True)
    server = providers.prometheus_server
    if server is not None:
        server = server[0] if isinstance(server, tuple) else server
        try:
            getattr(server, "shutdown", lambda: None)()
        except Exception:
            _log.debug("joule_otel: stopping the Prometheus endpoint failed", exc_info=True)
    providers.created = []
    providers.prometheus_server = None
