"""``instrument()`` / ``uninstrument()`` / ``flush()``.

Two rooms, as Logfire separates ``configure()`` from ``instrument_*()``: the SDK set-up (which providers
telemetry goes to, created only when the app has none: :mod:`joule_otel._exporters`) and the
instrumentation (the wrappers, the background pipeline, the HTTP spans). Then the process's ends:
exit, SIGTERM, fork and ``multiprocessing`` children, each of which must write the last rows.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import importlib.util
import logging
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import TracerProvider

from joule_otel import _attributes as attr
from joule_otel._budget_watch import BudgetWatch
from joule_otel._capture import Capture, install, uninstall
from joule_otel._config import Settings
from joule_otel._direct_record import path_in_use
from joule_otel._exporters import (
    Providers,
    flush_provider,
    fresh_connections_after_fork,
    resolve_providers,
    shutdown_created,
)
from joule_otel._genai import redact_url
from joule_otel._instruments import create_instruments
from joule_otel._metrics import METRICS_NONE, MetricRecorder
from joule_otel._pipeline import Pipeline
from joule_otel._threads import app_signals_blocked, guard_forks
from joule_otel._version import __version__
from joule_otel.ledger._spool import forget_inherited_locks
from joule_otel.ledger._writer import LedgerWriter

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
    provisional: bool = False
    """Made by the pytest plugin for a suite that had not instrumented: the suite's own ``instrument()`` replaces it."""


_state: _Instrumentation | None = None
_row_listeners: list[Callable[[list[Any], list[Any]], None]] = []
"""Who hears each cycle's rows (see :func:`listen_to_rows`): every capture's pipeline shares this one list."""
_lock = threading.RLock()
_hooks_registered = False


def instrument(
    *,
    db: str | os.PathLike[str] | None = None,
    workload: str | None = None,
    flush_interval: float | None = None,
    metrics: str | None = None,
    prometheus_port: int | None = None,
    prometheus_host: str | None = None,
    max_workloads: int | None = None,
    otlp_endpoint: str | None = None,
    capture_content: bool | None = None,
    call_events: bool | None = None,
    budgets: str | os.PathLike[str] | dict[str, float] | None = None,
    budget_thresholds: tuple[float, ...] | None = None,
    tags: dict[str, str] | None = None,
    metric_tags: list[str] | tuple[str, ...] | None = None,
    tracer_provider: TracerProvider | None = None,
    meter_provider: MeterProvider | None = None,
    **other: Any,
) -> None:
    """Capture every Joule Cloud call made through httpx/httpx2 (the openai SDK, LangChain, litellm, plain httpx).

    Idempotent. With no arguments it is configured from the environment; each option mirrors an environment
    variable, and an option wins over it.

    Args:
        db: ledger path, or ``"off"`` (``JOULE_OTEL_DB``; default: the per-user data folder).
        workload: default workload tag (``JOULE_OTEL_WORKLOAD``).
        flush_interval: seconds between ledger flushes, in (0, 60] (``JOULE_OTEL_FLUSH_INTERVAL``; default 1).
        metrics: ``all``, ``energy`` (the ``joule.*`` metrics only) or ``none`` (``JOULE_OTEL_METRICS``).
        prometheus_port: serve a Prometheus scrape endpoint (``JOULE_OTEL_PROMETHEUS_PORT``).
        prometheus_host: the address it binds (``JOULE_OTEL_PROMETHEUS_HOST``; default 127.0.0.1).
        max_workloads: distinct workloads metrics carry before the rest are ``other`` (``JOULE_OTEL_MAX_WORKLOADS``).
        otlp_endpoint: OTLP base URL, e.g. ``http://127.0.0.1:4318`` (else ``OTEL_EXPORTER_OTLP_*``).
        capture_content: put prompts on spans (``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT``).
        call_events: send one OTLP log record per call, for ``joule-otel collect`` (``JOULE_OTEL_CALL_EVENTS``).
        budgets: monthly energy budgets: a JSON/TOML/CSV file or ``{workload: joules}`` (``JOULE_OTEL_BUDGETS``):
            a warning as each threshold is crossed, and ``joule.budget.*`` gauges.
        budget_thresholds: shares of a budget that warn, default ``(0.8, 1.0)`` (``JOULE_OTEL_BUDGET_THRESHOLDS``).
        tags: chargeback tags on every call, e.g. ``{"team": "search"}`` (``JOULE_OTEL_TAGS``); ``tags()`` blocks
            and baggage win a key they also set.
        metric_tags: tag keys that are also metric attributes, each capped like workloads
            (``JOULE_OTEL_METRIC_TAGS``); by default tags are in the ledger and on spans only.
        tracer_provider: use this TracerProvider instead of the global one.
        meter_provider: use this MeterProvider instead of the global one.
        **other: ``flush_interval_s`` (the older name of ``flush_interval``); anything else is an error.

    Raises:
        ValueError: an option is unknown or invalid. Nothing raises later, while capturing.
    """
    global _state
    settings = Settings.resolve(
        db=db,
        workload=workload,
        flush_interval=flush_interval,
        metrics=metrics,
        prometheus_port=prometheus_port,
        prometheus_host=prometheus_host,
        max_workloads=max_workloads,
        otlp_endpoint=otlp_endpoint,
        capture_content=capture_content,
        call_events=call_events,
        budgets=budgets,
        budget_thresholds=budget_thresholds,
        tags=tags,
        metric_tags=metric_tags,
        **other,
    )
    with _lock:
        if _state is not None:
            if not _state.provisional:
                return
            uninstrument()  # the pytest plugin's stand-in gives way: the suite's own settings (ledger, metrics) hold
        with app_signals_blocked():  # the SDK's export threads are born here: the app's signals are not theirs
            providers = resolve_providers(settings, tracer_provider, meter_provider)
        if providers.created:
            guard_forks()  # ... and born again in forked children by the fork hooks of the providers made here
        state = _instrument_clients(settings, providers)
        state.pipeline.row_listeners = _row_listeners
        state.pipeline.start()
        _install_exit_hooks(state)
        _state = state


def _instrument_clients(settings: Settings, providers: Providers) -> _Instrumentation:
    """The wrappers on httpx/httpx2, the pipeline behind them, and the HTTP spans when traces go somewhere."""
    meter = metrics.get_meter("joule_otel", __version__, meter_provider=providers.meter_provider)
    recorder = MetricRecorder(
        create_instruments(meter),
        providers.meter_provider,
        mode=settings.metrics,
        max_workloads=settings.max_workloads,
        metric_tags=settings.metric_tags,
    )
    capture = Capture(capture_content=settings.capture_content)
    capture.default_tags = dict(settings.tags)
    watch = _budget_watch(settings, meter, recorder)
    pipeline = Pipeline(
        service_name=providers.service_name,
        default_workload=settings.workload,
        default_tags=dict(settings.tags),
        flush_interval_s=settings.flush_interval_s,
        recorder=recorder,
        writer=LedgerWriter(settings.db_path) if settings.db_path is not None else None,
        capture_stats=capture,
        events_logger=providers.logger_provider.get_logger("joule_otel", __version__)
        if providers.logger_provider is not None
        else None,
        watch=watch,
    )
    capture.sink = pipeline.submit
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
    return state


def listen_to_rows(listener: Callable[[list[Any], list[Any]], None]) -> Callable[[], None]:
    """Call ``listener(rows, contexts)`` on the background thread with each cycle's rows; returns how to stop it.

    ``contexts`` holds the OpenTelemetry context each row's call started in (None for an empty one). For joule-otel's
    own consumers in the same process (the pytest plugin). It hears every capture of the process
    from now on, whenever ``instrument()`` runs: one already running, or one started later.
    """
    _row_listeners.append(listener)

    def stop() -> None:
        if listener in _row_listeners:
            _row_listeners.remove(listener)

    return stop


def active_capture() -> Capture | None:
    """This process's capture while it is on: for the proxy, whose own HTTP client hands it its calls."""
    state = _state
    return state.capture if state is not None else None


def is_instrumented() -> bool:
    """Whether capture is on in this process."""
    return _state is not None


def instrument_provisionally(**options: Any) -> None:
    """Capture for the pytest plugin when the suite has not instrumented: the suite's ``instrument()`` replaces it."""
    with _lock:
        if _state is not None:
            return
        instrument(**options)
        if _state is not None:
            _state.provisional = True


def _budget_watch(settings: Settings, meter: Any, recorder: MetricRecorder) -> BudgetWatch:
    """The budget watch, with its refusals counter and gauges on joule-otel's meter unless metrics are off."""
    from opentelemetry.metrics import Observation

    from joule_otel._budget_watch import budget_attributes
    from joule_otel._instruments import create_budget_gauges, create_refusals_counter

    if settings.metrics == METRICS_NONE:
        return BudgetWatch(list(settings.budgets), settings.budget_thresholds, settings.db_path)
    refusals = create_refusals_counter(meter)
    watch = BudgetWatch(
        list(settings.budgets),
        settings.budget_thresholds,
        settings.db_path,
        count_refusal=lambda workload: refusals.add(1, {attr.JOULE_WORKLOAD: recorder.metric_workload(workload)}),
    )
    for workload in {b.workload for b in watch.budgets}:  # a series from 0: the first 402 is an increase
        refusals.add(0, {attr.JOULE_WORKLOAD: recorder.metric_workload(workload)})

    def observe(value: Callable[[Any, float], float]) -> Callable[[Any], list[Any]]:
        def callback(options: Any) -> list[Any]:
            return [Observation(value(b, spent), budget_attributes(b)) for b, spent in watch.observations()]

        return callback

    create_budget_gauges(
        meter,
        limit=observe(lambda b, spent: b.joules),
        spent=observe(lambda b, spent: spent),
        remaining=observe(lambda b, spent: max(b.joules - spent, 0.0)),
    )
    return watch


def _redact_span_url(span: Any, request: Any) -> None:
    """Request hook of the HTTP spans joule-otel turns on: credentials in a URL's query never reach a span."""
    try:
        url = str(request.url)
        redacted = redact_url(url)
        if redacted == url or not span.is_recording():
            return
        present = getattr(span, "attributes", None) or {}
        keys = [key for key in ("url.full", "http.url") if key in present] or ["url.full"]
        span.set_attributes(dict.fromkeys(keys, redacted))
    except Exception:
        _log.debug("joule_otel: redacting a span's URL failed", exc_info=True)


async def _redact_span_url_async(span: Any, request: Any) -> None:
    _redact_span_url(span, request)


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
        instrumentor.instrument(
            tracer_provider=tracer_provider,
            request_hook=_redact_span_url,
            async_request_hook=_redact_span_url_async,
        )
        enabled.append(instrumentor)
    return enabled


# -- the ends of a process ------------------------------------------------------------------------


def _install_exit_hooks(state: _Instrumentation) -> None:
    global _hooks_registered
    if not _hooks_registered:
        atexit.register(_at_exit)
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(
                before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child
            )
        _register_multiprocessing_hook()
        _hooks_registered = True
    if threading.current_thread() is threading.main_thread():
        try:
            state.previous_sigterm = signal.getsignal(signal.SIGTERM)
            signal.signal(signal.SIGTERM, _on_sigterm)
            state.sigterm_installed = True
        except (ValueError, OSError):
            state.sigterm_installed = False


class _MultiprocessingHook:
    """Owner of the ``multiprocessing`` after-fork registration (its registry keys weakly on an object)."""


_MP_HOOK = _MultiprocessingHook()


def _register_multiprocessing_hook() -> None:
    """A ``multiprocessing`` child ends with ``os._exit``: ``atexit`` never runs there, its own finalizers do.

    In each child (fork and forkserver contexts, ``Process`` and ``Pool`` workers) register a finalizer that writes
    the child's last rows when it returns; a ``Pool`` worker that is terminated gets SIGTERM, handled below.
    """
    import multiprocessing.util as mp_util

    def in_child(_: object) -> None:
        mp_util.Finalize(None, _at_child_exit, exitpriority=100)

    mp_util.register_after_fork(_MP_HOOK, in_child)


def _at_child_exit() -> None:
    """A ``multiprocessing`` child returns: its rows reach the spool; the parent or the next writer compacts them."""
    global _exiting
    state = _state
    if state is None:
        return
    _exiting = True
    try:
        state.capture.finish_all()
        state.pipeline.shutdown(EXIT_FLUSH_TIMEOUT_S, compact=False)
        for provider in _providers_of(state):
            flush_provider(provider, EXIT_FLUSH_TIMEOUT_S)
    except Exception:
        _log.exception("joule_otel: flushing the ledger as a multiprocessing child returned failed")


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    """Write the ledger and export the last telemetry, then hand SIGTERM to whoever had it before.

    The pipeline is flushed, not stopped: a previous handler (uvicorn's, gunicorn's) may keep the process running
    for a graceful shutdown, and calls made meanwhile are captured too. Only when the default action is about to end
    the process is everything shut down first.
    """
    global _deferred_sigterm
    state = _state
    previous = state.previous_sigterm if state is not None else signal.SIG_DFL
    dies = not callable(previous) and previous != signal.SIG_IGN
    if state is not None and dies and _exiting:
        return  # the process is already ending (an exit flush was interrupted): let that flush finish, then it ends
    if state is not None and state.pipeline.cycling_on_this_thread():
        _deferred_sigterm = (signum, frame)  # handled once this thread's own cycle is done (see flush())
        return
    if state is not None:
        try:
            if dies:
                _shutdown(state)
            else:
                state.capture.finish_all()
                state.pipeline.flush(EXIT_FLUSH_TIMEOUT_S)
                for provider in _providers_of(state):
                    flush_provider(provider, EXIT_FLUSH_TIMEOUT_S)
        except Exception:
            _log.exception("joule_otel: flushing the ledger on SIGTERM failed")
    if callable(previous):
        previous(signum, frame)
    elif dies:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


_exiting = False
"""An exit flush is running: a SIGTERM that interrupts it lets it finish rather than starting another."""
_deferred_sigterm: tuple[int, FrameType | None] | None = None
"""A SIGTERM that arrived while this thread was inside a ledger cycle, handled once the cycle is done."""


def _handle_deferred_sigterm() -> None:
    global _deferred_sigterm
    deferred, _deferred_sigterm = _deferred_sigterm, None
    if deferred is not None:
        _on_sigterm(*deferred)


def _providers_of(state: _Instrumentation) -> tuple[Any, ...]:
    """The providers whose pending telemetry a flush exports: metrics, spans, call events."""
    found = state.providers
    return (found.meter_provider, found.tracer_provider, found.logger_provider)


def _shutdown(state: _Instrumentation) -> None:
    """The process ends: every call still streaming, every row, the last metrics and spans go out."""
    global _exiting
    _exiting = True
    state.capture.finish_all()
    state.pipeline.shutdown(EXIT_FLUSH_TIMEOUT_S)
    for provider in _providers_of(state):
        if provider not in state.providers.created:
            flush_provider(provider, EXIT_FLUSH_TIMEOUT_S)
    shutdown_created(state.providers)


def _at_exit() -> None:
    state = _state
    if state is None:
        return
    try:
        _shutdown(state)
    except Exception:
        _log.exception("joule_otel: flushing the ledger at exit failed")


def _before_fork() -> None:
    state = _state
    if state is not None:
        state.pipeline.before_fork()


def _after_fork_in_parent() -> None:
    state = _state
    if state is not None:
        state.pipeline.after_fork_in_parent()


def _after_fork_in_child() -> None:
    forget_inherited_locks()
    fresh_connections_after_fork()
    state = _state
    if state is not None:
        state.capture.inflight.clear()
        state.pipeline.after_fork_in_child()


def flush(timeout_s: float = 5.0) -> bool:
    """Write every call captured so far to the ledger's spool and export pending telemetry.

    Flushed rows are on disk and visible to every reader (``read_ledger``, the dashboard, ``joule-otel ledger``);
    they reach the DuckDB file itself at the next compaction (every 30 s, and at exit). Calls whose response body is
    still being read are written when it ends.

    Returns:
        True if every row reached disk within ``timeout_s``; False if rows wait (the disk refused them, the writer
        was busy) or were dropped: ``stats()`` says which.
    """
    state = _state
    if state is None:
        return True
    try:
        done = state.pipeline.flush(timeout_s)
        for provider in _providers_of(state):
            flush_provider(provider, timeout_s)
    except Exception:
        state.capture.internal_error("flush")
        return False
    finally:
        _handle_deferred_sigterm()
    return bool(done)


def uninstrument() -> None:
    """Stop capturing: remove the wrappers, flush the ledger, restore the SIGTERM handler. Never raises."""
    global _state
    with _lock:
        state = _state
        if state is None:
            return
        _state = None
        try:
            for module in state.modules:
                uninstall(state.capture, module)
            for instrumentor in state.span_instrumentors:
                instrumentor.uninstrument()
            state.capture.finish_all()
            state.pipeline.shutdown(EXIT_FLUSH_TIMEOUT_S)
            for provider in _providers_of(state):
                flush_provider(provider, EXIT_FLUSH_TIMEOUT_S)
            if state.sigterm_installed and signal.getsignal(signal.SIGTERM) is _on_sigterm:
                with contextlib.suppress(ValueError, OSError, TypeError):
                    signal.signal(signal.SIGTERM, state.previous_sigterm)
            server = state.providers.prometheus_server
            if server is not None:
                server = server[0] if isinstance(server, tuple) else server
                getattr(server, "shutdown", lambda: None)()
        except Exception:
            _log.exception("joule_otel: uninstrument() did not finish cleanly; capture is off")
    global _deferred_sigterm
    if _deferred_sigterm is not None:  # a SIGTERM came during the last cycle: the restored handler gets it now
        _deferred_sigterm = None
        signal.raise_signal(signal.SIGTERM)


def stats() -> dict[str, Any]:
    """Counters of this process's capture: calls, rows spooled and compacted, drops and errors."""
    state = _state
    if state is None:
        return {"instrumented": False}
    writer = state.pipeline.writer
    result: dict[str, Any] = {
        "instrumented": True,
        "db_path": str(writer.db_path) if writer else None,
        "metrics": state.settings.metrics,
        "calls_captured": state.pipeline.calls_seen,
        "calls_in_flight": len(state.capture.inflight),
        "calls_dropped": state.pipeline.calls_dropped,
        "duplicate_receipts": state.pipeline.recent.repeats,
        "capture_errors": state.capture.errors,
        "invalid_headers": state.capture.invalid_headers,
        "tags_dropped": state.capture.tags_dropped,
        "histogram_path": path_in_use(),
    }
    if writer is not None:
        result.update(vars(writer.stats))
        result["pending_segments"] = len(writer.spool.segments())
    return result
