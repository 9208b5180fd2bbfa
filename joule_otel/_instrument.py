"""``instrument()`` / ``uninstrument()`` / ``flush()``: wiring capture, the pipeline, providers and exit hooks."""

from __future__ import annotations

import atexit
import contextlib
import importlib
import importlib.util
import logging
import os
import signal
import threading
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from opentelemetry import metrics

from joule_otel._pipeline import Pipeline
from joule_otel._version import __version__
from joule_otel.capture import Capture, install, uninstall
from joule_otel.config import Settings
from joule_otel.exporters import Providers, resolve_providers
from joule_otel.instruments import create_instruments
from joule_otel.ledger.writer import LedgerWriter

_log = logging.getLogger("joule_otel")

HTTP_MODULES = ("httpx", "httpx2")
EXIT_FLUSH_TIMEOUT_S = 5.0


@dataclass
class _Instrumentation:
    settings: Settings
    capture: Capture
    pipeline: Pipeline
    providers: Providers
    modules: list[Any]
    span_instrumentors: list[Any] = field(default_factory=list)
    previous_sigterm: Any = None
    sigterm_installed: bool = False


_state: _Instrumentation | None = None
_lock = threading.RLock()
_hooks_registered = False


def instrument(
    *,
    db: str | os.PathLike[str] | None = None,
    workload: str | None = None,
    flush_interval_s: float | None = None,
    prometheus_port: int | None = None,
    otlp_endpoint: str | None = None,
    capture_content: bool | None = None,
    tracer_provider: Any | None = None,
    meter_provider: Any | None = None,
) -> None:
    """Capture every Joule Cloud call made through httpx/httpx2 (the openai SDK, LangChain, plain httpx).

    Idempotent. With no arguments it is configured from the environment (``JOULE_OTEL_*`` and the
    standard ``OTEL_*`` variables); arguments win over the environment.

    Args:
        db: ledger path, or ``"off"``. Default ``JOULE_OTEL_DB`` or the per-user data folder.
        workload: default workload tag (``JOULE_OTEL_WORKLOAD``).
        flush_interval_s: seconds between ledger flushes, in (0, 60] (``JOULE_OTEL_FLUSH_INTERVAL``).
        prometheus_port: serve a Prometheus scrape endpoint (``JOULE_OTEL_PROMETHEUS_PORT``).
        otlp_endpoint: OTLP base URL, e.g. ``http://127.0.0.1:4318`` (else ``OTEL_EXPORTER_OTLP_*``).
        capture_content: put prompts on spans (``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT``).
        tracer_provider: use this TracerProvider instead of the global one.
        meter_provider: use this MeterProvider instead of the global one.

    Raises:
        ValueError: an argument is invalid. Nothing raises later, while capturing.
    """
    global _state
    settings = Settings.resolve(
        db=db,
        workload=workload,
        flush_interval_s=flush_interval_s,
        prometheus_port=prometheus_port,
        otlp_endpoint=otlp_endpoint,
        capture_content=capture_content,
    )
    with _lock:
        if _state is not None:
            return
        providers = resolve_providers(settings, tracer_provider, meter_provider)
        meter = metrics.get_meter("joule_otel", __version__, meter_provider=providers.meter_provider)
        capture = Capture(lambda call: None, capture_content=settings.capture_content)
        writer = LedgerWriter(settings.db_path) if settings.db_path is not None else None
        pipeline = Pipeline(
            service_name=providers.service_name,
            default_workload=settings.workload,
            flush_interval_s=settings.flush_interval_s,
            max_workloads=settings.max_workloads,
            instruments=create_instruments(meter),
            meter_provider=providers.meter_provider,
            writer=writer,
            capture_stats=capture,
        )
        capture._sink = pipeline.submit
        modules = []
        for name in HTTP_MODULES:
            if importlib.util.find_spec(name) is None:
                continue
            module = importlib.import_module(name)
            install(capture, module)
            modules.append(module)
        state = _Instrumentation(settings, capture, pipeline, providers, modules)
        if providers.tracer_provider is not None:
            state.span_instrumentors = _enable_http_spans(providers.tracer_provider, modules)
        pipeline.start()
        _install_exit_hooks(state)
        _state = state


def _enable_http_spans(tracer_provider: Any, modules: list[Any]) -> list[Any]:
    """Turn on the httpx/httpx2 client spans (traces go somewhere), unless someone already did."""
    try:
        from opentelemetry.instrumentation import httpx as httpx_instrumentation
    except ImportError:
        return []
    enabled = []
    names = {m.__name__ for m in modules}
    for module_name, cls_name in (
        ("httpx", "HTTPXClientInstrumentor"),
        ("httpx2", "HTTPX2ClientInstrumentor"),
    ):
        cls = getattr(httpx_instrumentation, cls_name, None)
        if cls is None or module_name not in names:
            continue
        instrumentor = cls()
        if instrumentor.is_instrumented_by_opentelemetry:
            continue
        instrumentor.instrument(tracer_provider=tracer_provider)
        enabled.append(instrumentor)
    return enabled


def _install_exit_hooks(state: _Instrumentation) -> None:
    global _hooks_registered
    if not _hooks_registered:
        atexit.register(_at_exit)
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=_after_fork_in_child)
        _hooks_registered = True
    if threading.current_thread() is threading.main_thread():
        try:
            state.previous_sigterm = signal.getsignal(signal.SIGTERM)
            signal.signal(signal.SIGTERM, _on_sigterm)
            state.sigterm_installed = True
        except (ValueError, OSError):
            state.sigterm_installed = False


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    """Flush the ledger, then hand SIGTERM to whoever had it before (uvicorn, gunicorn, or the default)."""
    state = _state
    previous = state.previous_sigterm if state is not None else signal.SIG_DFL
    if state is not None:
        try:
            state.capture.finish_all()
            state.pipeline.shutdown(EXIT_FLUSH_TIMEOUT_S)
        except Exception:
            _log.exception("joule_otel: flushing the ledger on SIGTERM failed")
    if callable(previous):
        previous(signum, frame)
    elif previous == signal.SIG_DFL or previous is None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


def _at_exit() -> None:
    state = _state
    if state is None:
        return
    try:
        state.capture.finish_all()
        state.pipeline.shutdown(EXIT_FLUSH_TIMEOUT_S)
        for provider in state.providers.created:
            provider.shutdown()
    except Exception:
        _log.exception("joule_otel: flushing the ledger at exit failed")


def _after_fork_in_child() -> None:
    state = _state
    if state is not None:
        state.capture.inflight.clear()
        state.pipeline.after_fork_in_child()


def flush(timeout_s: float = 5.0) -> bool:
    """Write every call captured so far to the ledger's spool; True if done within ``timeout_s``.

    Flushed rows are on disk and visible to every reader (``read_ledger``, the dashboard,
    ``joule-otel ledger``); they reach the DuckDB file itself at the next compaction (every few
    seconds, and at exit). Calls whose response body is still being read are written when it ends.
    """
    state = _state
    if state is None:
        return True
    done = state.pipeline.flush(timeout_s)
    for provider in (state.providers.meter_provider, state.providers.tracer_provider):
        force_flush = getattr(provider, "force_flush", None)
        if force_flush is not None:
            try:
                force_flush(int(timeout_s * 1000))
            except Exception:
                _log.debug("joule_otel: force_flush failed", exc_info=True)
    return bool(done)


def uninstrument() -> None:
    """Stop capturing: remove the wrappers, flush the ledger, restore the SIGTERM handler."""
    global _state
    with _lock:
        state = _state
        if state is None:
            return
        _state = None
        for module in state.modules:
            uninstall(state.capture, module)
        for instrumentor in state.span_instrumentors:
            instrumentor.uninstrument()
        state.capture.finish_all()
        state.pipeline.shutdown(EXIT_FLUSH_TIMEOUT_S)
        if state.sigterm_installed and signal.getsignal(signal.SIGTERM) is _on_sigterm:
            with contextlib.suppress(ValueError, OSError, TypeError):
                signal.signal(signal.SIGTERM, state.previous_sigterm)
        if state.providers.prometheus_server is not None:
            server = state.providers.prometheus_server
            server = server[0] if isinstance(server, tuple) else server
            getattr(server, "shutdown", lambda: None)()


def stats() -> dict[str, Any]:
    """Counters of this process's capture: calls, rows spooled and compacted, drops and errors."""
    state = _state
    if state is None:
        return {"instrumented": False}
    writer = state.pipeline.writer
    result: dict[str, Any] = {
        "instrumented": True,
        "db_path": str(writer.db_path) if writer else None,
        "calls_captured": state.pipeline.calls_seen,
        "calls_in_flight": len(state.capture.inflight),
        "calls_dropped": state.pipeline.calls_dropped,
        "duplicate_receipts": state.pipeline.duplicate_receipts,
        "capture_errors": state.capture.errors,
        "invalid_headers": state.capture.invalid_headers,
    }
    if writer is not None:
        result.update(vars(writer.stats))
        result["pending_segments"] = len(writer.spool.segments())
    return result
