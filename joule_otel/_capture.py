"""The transport wrappers: what runs on the app's thread for every HTTP call through httpx/httpx2 (and so aiohttp).

Only what must happen on the request path happens here: two clock reads, a route check, the
workload lookup, span attributes while the HTTP client span is still open, and wrapping the
response byte stream so its end is seen. Parsing, metrics and the ledger happen in the background
(:mod:`joule_otel._pipeline`). Nothing in this module raises into the app: every failure is
swallowed, logged once and counted.

The wrapper is placed *inside* any OpenTelemetry httpx wrapper (whichever was installed first), so
that the HTTP client span is the current span when the response headers arrive.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import json
import logging
import threading
import types
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from time import perf_counter_ns, time_ns
from typing import Any
from weakref import ref

import wrapt
from opentelemetry import trace
from opentelemetry.context import get_current as get_current_context
from opentelemetry.trace import SpanKind

from joule_otel import _attributes as attr
from joule_otel._genai import (
    INFERENCE_OPERATIONS,
    OTHER_OPERATION,
    SEMCONV_OPERATIONS,
    error_type_for,
    parse_request_body,
    provider_of_scanned,
    request_fields,
    route_operation,
)
from joule_otel._headers import RESPONSE_HEADERS, read_response
from joule_otel._record import BODY_CAP_BYTES, CallRecord, has_header
from joule_otel._tags import TAG_PREFIX, baggage_tags, merged
from joule_otel._workload import baggage_workload

_log = logging.getLogger("joule_otel")

_claim: contextvars.ContextVar[list[bool] | None] = contextvars.ContextVar("joule_otel_claim", default=None)
"""Set by the client-level wrapper around one request: the transport-level wrapper beneath it marks the call as
captured, so a call is captured exactly once, by the innermost wrapper that sees it (where the HTTP span is open)."""


def _nowhere(call: CallRecord) -> None:
    """The sink of a capture no pipeline stands behind yet: its calls are dropped."""


class Capture:
    """The wrappers installed on the transports, and the calls whose bodies are still streaming."""

    def __init__(self, *, capture_content: bool = False) -> None:
        self.sink: Callable[[CallRecord], None] = _nowhere
        """Where finished calls go: the pipeline's ``submit``, set once the pipeline behind this capture exists."""
        self.capture_content = capture_content
        self.stopped = False
        """Set by :func:`uninstall`: a wrapper it could not take out (another patch laid on top of it, as
        ``mock.patch`` and vcrpy do) passes every call straight through from then on."""
        self.inflight: dict[CallRecord, CallRecord] = {}
        self.errors = 0
        self.invalid_headers = 0
        self.tags_dropped = 0
        """Tags past the 16 a call keeps (its highest-precedence ones are kept)."""
        self.default_tags: dict[str, str] = {}
        """The process's tags, set by ``instrument()``: on the span with the call's own."""
        self._logged: set[str] = set()
        self._stream_classes: dict[Any, tuple[type, type]] = {}
        self._lock = threading.Lock()
        self.covered_transports: set[type] = set()
        """httpx's and httpx2's own transport classes, wrapped where the HTTP span is open: a client using exactly
        one of them (and no mounts) needs nothing of the client-level wrapper."""

    # -- failure handling -------------------------------------------------------------------
    def internal_error(self, where: str) -> None:
        """Count a capture failure and log it once per place; never raise."""
        self.errors += 1
        if where not in self._logged:
            self._logged.add(where)
            _log.warning("joule_otel: capture failed in %s; the call went through untouched", where, exc_info=True)

    # -- lifecycle of a call ----------------------------------------------------------------
    def finish(self, call: CallRecord, response: ref[Any] | None = None) -> None:
        """Hand a call to the background exactly once (close, exhaustion, GC and exit may all try).

        ``response``: a closed stream's response (weakly), whose decoded body the background reads.
        """
        if self.inflight.pop(call, None) is None:  # finished already (a close, then the GC)
            return
        if response is not None:
            call.response = response()
        if not call.t_end:
            call.t_end = perf_counter_ns()
        self.sink(call)

    def finish_all(self) -> None:
        """Finish every call still streaming (at exit): its row is written with what arrived so far."""
        for call in list(self.inflight):
            self.finish(call)

    def _begin(self, request: Any, response: Any, t0: int, started_ns: int) -> CallRecord | None:
        headers = response.headers
        operation = operation_of(request.url.raw_path, headers)
        if operation is None:
            return None
        claim = _claim.get()
        if claim is not None:
            claim[0] = True
        context = get_current_context() or None  # an app without spans or baggage: an empty context, nothing to read
        call = CallRecord(request, operation, t0, started_ns, context)
        span = trace.get_current_span(context) if context is not None else None
        self.open(
            call, response.status_code, headers, span if span is not None and _is_http_client_span(span) else None
        )
        return call

    def open(self, call: CallRecord, status: int | None = None, headers: Any = None, span: Any = None) -> None:
        """Note a call whose answer began (``status``, ``headers``), or that failed before one (its ``error`` set).

        The wrappers above call it, and so does the proxy for the calls its own client makes. ``span``: the call's
        HTTP client span, still open, which gets the call's attributes. The call is in flight until :meth:`finish`.
        """
        call.status_code = status
        call.response_headers = headers
        if span is not None and headers is not None and span.is_recording():
            self._annotate(span, call)
        self.inflight[call] = call

    def _annotate(self, span: Any, call: CallRecord) -> None:
        """Span attributes, while the HTTP client span is open (it ends when the headers arrive)."""
        reading, found = read_response(call.response_headers, call.request_headers)
        call.reading, call.found = reading, found
        ctx = span.get_span_context()
        call.trace_id, call.span_id = ctx.trace_id, ctx.span_id
        # the background reuses the reading and these two fields
        call.request_fields = fields = request_fields(call.request_body)
        call.provider = provider_of_scanned(call.server_address, found)
        if call.workload is None:
            call.workload = baggage_workload(call.context)
        values: dict[str, Any] = {
            attr.GEN_AI_PROVIDER_NAME: call.provider,
            attr.GEN_AI_OPERATION_NAME: SEMCONV_OPERATIONS.get(call.operation),
            attr.GEN_AI_REQUEST_MODEL: fields.model,
            attr.GEN_AI_RESPONSE_MODEL: reading.routed_to,
            attr.JOULE_ENERGY: reading.energy_j,
            attr.JOULE_CARBON: reading.carbon_mg,
            attr.JOULE_TIER: reading.tier,
            attr.JOULE_REGION: reading.region,
            attr.JOULE_RECEIPT_ID: reading.receipt_id,
            attr.JOULE_ENERGY_SOURCE: "header" if reading.energy_j is not None else "absent",
        }
        if call.workload is not None:
            values[attr.JOULE_WORKLOAD] = call.workload
        tags = merged(self.default_tags, baggage_tags(call.context), call.tags)[0]
        if tags:
            values.update((TAG_PREFIX + key, value) for key, value in tags.items())
        error_type = error_type_for(call.status_code, None)
        if error_type is not None:
            values[attr.ERROR_TYPE] = error_type
        if self.capture_content:
            request = parse_request_body(call.request_body)
            if "messages" in request:
                values[attr.GEN_AI_INPUT_MESSAGES] = json.dumps(request["messages"], default=str)[:65536]
        if None in values.values():  # a scan in C: a successful Joule call has every value
            values = {k: v for k, v in values.items() if v is not None}
        span.set_attributes(values)

    def _transport_error(self, request: Any, exc: BaseException, t0: int, started_ns: int) -> None:
        operation = route_operation(request.url.raw_path)
        if operation not in INFERENCE_OPERATIONS:
            return
        claim = _claim.get()
        if claim is not None:
            claim[0] = True
        call = CallRecord(request, operation, t0, started_ns, get_current_context() or None)
        call.error = type(exc).__qualname__
        self.open(call)
        self.finish(call)

    # -- the wrappers -----------------------------------------------------------------------
    def sync_wrapper(
        self, wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """Wraps ``HTTPTransport.handle_request`` of httpx and httpx2."""
        if self.stopped:
            return wrapped(instance, *args, **kwargs)
        t0, started_ns = perf_counter_ns(), time_ns()
        try:
            response = wrapped(instance, *args, **kwargs)
        except Exception as exc:
            self._failed(args[0] if args else kwargs["request"], exc, t0, started_ns)
            raise
        self._answered(args[0] if args else kwargs["request"], response, t0, started_ns, sync=True)
        return response

    async def async_wrapper(
        self, wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """Wraps ``AsyncHTTPTransport.handle_async_request`` of httpx and httpx2."""
        if self.stopped:
            return await wrapped(instance, *args, **kwargs)
        t0, started_ns = perf_counter_ns(), time_ns()
        try:
            response = await wrapped(instance, *args, **kwargs)
        except Exception as exc:
            self._failed(args[0] if args else kwargs["request"], exc, t0, started_ns)
            raise
        self._answered(args[0] if args else kwargs["request"], response, t0, started_ns, sync=False)
        return response

    def sync_client_wrapper(
        self, wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """Wraps ``Client._send_single_request``: captures calls whose transport is not ``HTTPTransport``.

        Custom and third-party transports (a WSGI or mock transport, say) are seen here; a call the transport
        wrapper beneath already captured is left to it. A client whose every call goes through a transport patched
        below never gets here (see :func:`_patched`).
        """
        if self.stopped:
            return wrapped(instance, *args, **kwargs)
        claim = [False]
        token = _claim.set(claim)
        t0, started_ns = perf_counter_ns(), time_ns()
        try:
            response = wrapped(instance, *args, **kwargs)
        except Exception as exc:
            _claim.reset(token)
            if not claim[0]:
                self._failed(args[0] if args else kwargs["request"], exc, t0, started_ns)
            raise
        _claim.reset(token)
        if not claim[0]:
            self._answered(args[0] if args else kwargs["request"], response, t0, started_ns, sync=True)
        return response

    async def async_client_wrapper(
        self, wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """Wraps ``AsyncClient._send_single_request``: the transports that are not ``AsyncHTTPTransport``.

        openai's ``DefaultAioHttpClient`` and litellm's (so DSPy's) async calls run on aiohttp through such a
        transport.
        """
        if self.stopped:
            return await wrapped(instance, *args, **kwargs)
        claim = [False]
        token = _claim.set(claim)
        t0, started_ns = perf_counter_ns(), time_ns()
        try:
            response = await wrapped(instance, *args, **kwargs)
        except Exception as exc:
            _claim.reset(token)
            if not claim[0]:
                self._failed(args[0] if args else kwargs["request"], exc, t0, started_ns)
            raise
        _claim.reset(token)
        if not claim[0]:
            self._answered(args[0] if args else kwargs["request"], response, t0, started_ns, sync=False)
        return response

    def _failed(self, request: Any, exc: BaseException, t0: int, started_ns: int) -> None:
        """The request raised (a connection error, a timeout): an inference call is still a row."""
        try:
            self._transport_error(request, exc, t0, started_ns)
        except Exception:
            self.internal_error("transport error handling")

    def _answered(self, request: Any, response: Any, t0: int, started_ns: int, *, sync: bool) -> None:
        """The headers arrived: note the call and wrap the body's byte stream to see its end."""
        try:
            call = self._begin(request, response, t0, started_ns)
            if call is not None:
                if hasattr(response, "_content"):  # never vars(): it would give the response a real dict
                    # read before the transport returned it (httpx's MockTransport, respx): its body is all here, and
                    # no stream will ever close to say so; waiting would time the call until garbage collection
                    self.finish(call, ref(response))
                    return
                sync_cls, async_cls = self._streams_for(type(response))
                response.stream = (sync_cls if sync else async_cls)(response.stream, call, self, ref(response))
        except Exception:
            self.internal_error("response handling")

    def _streams_for(self, response_type: type) -> tuple[type, type]:
        classes = self._stream_classes.get(response_type)
        if classes is None:
            import importlib

            module = importlib.import_module(response_type.__module__.split(".")[0])
            classes = _make_stream_classes(module.SyncByteStream, module.AsyncByteStream)
            self._stream_classes[response_type] = classes
        return classes


_RESPONSE_HEADER_KEYS = tuple(name.lower().encode() for name in RESPONSE_HEADERS)


def operation_of(raw_path: bytes, headers: Any) -> str | None:
    """The operation of a call to ``raw_path`` answered with ``headers``, or None when it is not a row.

    Known inference routes are rows, other known routes (models, moderations, files) never are; an unknown route is
    one when its answer carries Joule's headers.
    """
    operation = route_operation(raw_path)
    if operation is None:
        return OTHER_OPERATION if has_header(headers, *_RESPONSE_HEADER_KEYS) else None
    return operation if operation in INFERENCE_OPERATIONS else None


_moment_offset_ns: contextvars.ContextVar[int] = contextvars.ContextVar("joule_otel_moment_offset_ns", default=0)


def _offset_time_ns() -> int:
    return _wall_clock_ns() + _moment_offset_ns.get()


_wall_clock_ns = time_ns


@contextmanager
def replayed_at(moment_ns: int) -> Iterator[None]:
    """Calls made inside start at ``moment_ns`` (epoch ns) as far as the ledger can tell, plus the time they take.

    For ``joule-otel demo``'s history only: weeks of calls go through the real SDK, simulator and capture,
    each dated to its day. Swaps this module's clock for the duration (the hot path never pays for it);
    the offset is per context, so concurrent tasks each keep their own moment. The swapped clock stays
    (reading a zero offset) for the rest of the process: tasks on other threads may still be replaying.
    """
    global time_ns
    token = _moment_offset_ns.set(moment_ns - _wall_clock_ns())
    time_ns = _offset_time_ns
    try:
        yield
    finally:
        _moment_offset_ns.reset(token)


def _is_http_client_span(span: Any) -> bool:
    scope = getattr(span, "instrumentation_scope", None)
    return (
        getattr(span, "kind", None) is SpanKind.CLIENT
        and scope is not None
        and scope.name.startswith("opentelemetry.instrumentation.httpx")
    )


def _make_stream_classes(sync_base: type, async_base: type) -> tuple[type, type]:
    """Byte-stream wrappers subclassing the module's own stream bases (httpx checks isinstance)."""

    class SyncCaptureStream(sync_base):  # type: ignore[misc]
        def __init__(self, inner: Any, call: CallRecord, capture: Capture, response: ref[Any]) -> None:
            self._inner, self._call, self._capture, self._response = inner, call, capture, response

        def __iter__(self) -> Iterator[bytes]:
            call = self._call
            for chunk in self._inner:
                if not call.t_first and chunk:
                    call.t_first = perf_counter_ns()
                kept = call.kept
                if kept >= 0:  # call.keep(chunk), inline: once a chunk
                    call.chunks.append(chunk)
                    call.kept = kept = kept + len(chunk)
                    if kept > BODY_CAP_BYTES:
                        call.trim()
                yield chunk
            call.t_end = perf_counter_ns()

        def close(self) -> None:
            try:
                close = getattr(self._inner, "close", None)
                if close is not None:
                    close()
            finally:
                self._capture.finish(self._call, self._response)

        def __del__(self) -> None:
            self._capture.finish(self._call)

    class AsyncCaptureStream(async_base):  # type: ignore[misc]
        def __init__(self, inner: Any, call: CallRecord, capture: Capture, response: ref[Any]) -> None:
            self._inner, self._call, self._capture, self._response = inner, call, capture, response

        async def __aiter__(self) -> AsyncIterator[bytes]:
            call = self._call
            async for chunk in self._inner:
                if not call.t_first and chunk:
                    call.t_first = perf_counter_ns()
                kept = call.kept
                if kept >= 0:  # call.keep(chunk), inline: once a chunk
                    call.chunks.append(chunk)
                    call.kept = kept = kept + len(chunk)
                    if kept > BODY_CAP_BYTES:
                        call.trim()
                yield chunk
            call.t_end = perf_counter_ns()

        async def aclose(self) -> None:
            try:
                aclose = getattr(self._inner, "aclose", None)
                if aclose is not None:
                    await aclose()
            finally:
                self._capture.finish(self._call, self._response)

        def __del__(self) -> None:
            self._capture.finish(self._call)

    return SyncCaptureStream, AsyncCaptureStream


# -- installing the wrappers ----------------------------------------------------------------

_PATCHES = (
    ("HTTPTransport", "handle_request", "sync_wrapper"),
    ("AsyncHTTPTransport", "handle_async_request", "async_wrapper"),
    ("Client", "_send_single_request", "sync_client_wrapper"),
    ("AsyncClient", "_send_single_request", "async_client_wrapper"),
)
"""(class, method, Capture's wrapper): the transports httpx and httpx2 ship, and the clients' one request hop, which
sees every other transport (aiohttp-backed, custom, mock)."""


def install(capture: Capture, module: Any) -> None:
    """Wrap the module's transports innermost, below any wrapper another instrumentation put there."""
    for class_name in ("HTTPTransport", "AsyncHTTPTransport"):
        if isinstance(getattr(module, class_name, None), type):
            capture.covered_transports.add(getattr(module, class_name))
    for class_name, method, wrapper_name in _PATCHES:
        cls = getattr(module, class_name, None)
        if cls is None or method not in cls.__dict__:
            _log.debug("joule_otel: %s.%s.%s not found; not wrapped", module.__name__, class_name, method)
            continue
        current = cls.__dict__[method]
        if not isinstance(current, wrapt.FunctionWrapper):
            setattr(cls, method, _patched(current, capture, wrapper_name))
            continue
        holder = current
        while isinstance(holder.__wrapped__, wrapt.FunctionWrapper):
            holder = holder.__wrapped__
        holder.__wrapped__ = _patched(holder.__wrapped__, capture, wrapper_name)


def uninstall(capture: Capture, module: Any) -> None:
    """Remove this capture's wrappers, wherever they stand in the chain; one that cannot be reached passes through."""
    capture.stopped = True
    for class_name, method, _ in _PATCHES:
        cls = getattr(module, class_name, None)
        if cls is None or method not in cls.__dict__:
            continue
        current = cls.__dict__[method]
        if _is_patch_of(current, capture):
            setattr(cls, method, current.__wrapped__)
            continue
        holder = current
        while isinstance(holder, wrapt.FunctionWrapper):
            inner: Any = holder.__wrapped__
            if _is_patch_of(inner, capture):
                holder.__wrapped__ = inner.__wrapped__
                break
            holder = inner


def _is_patch_of(method: Any, capture: Capture) -> bool:
    """Whether ``method`` is one of ``capture``'s patches (its real type checked: a wrapt proxy forwards attributes)."""
    return type(method) is types.FunctionType and method.__dict__.get("_joule_otel_capture") is capture


def _patched(original: Any, capture: Capture, wrapper_name: str) -> Any:
    """``original`` (a plain function of the class) calling the capture's wrapper around it.

    A plain function, not a ``wrapt.FunctionWrapper``: binding and calling one costs more than the wrapper's own work,
    paid twice a call (the client's hop and the transport) on the app's thread. Another instrumentation's wrapt
    wrapper around it binds it as it would the original. A client's hop (``_send_single_request``) goes straight on
    when the client's every call goes through a transport patched below (its own ``HTTPTransport``, no mounts): the
    common case costs one frame.
    """
    wrapper = getattr(capture, wrapper_name)
    covered = capture.covered_transports
    client_hop = wrapper_name.endswith("client_wrapper")
    if inspect.iscoroutinefunction(original):
        if client_hop:

            async def patched_client_async(self: Any, *args: Any, **kwargs: Any) -> Any:
                if not getattr(self, "_mounts", True) and type(getattr(self, "_transport", None)) in covered:
                    return await original(self, *args, **kwargs)  # the transport's patch sees this call
                return await wrapper(original, self, args, kwargs)

            patched: Any = patched_client_async
        else:

            async def patched_async(self: Any, *args: Any, **kwargs: Any) -> Any:
                return await wrapper(original, self, args, kwargs)

            patched = patched_async
    elif client_hop:

        def patched_client_sync(self: Any, *args: Any, **kwargs: Any) -> Any:
            if not getattr(self, "_mounts", True) and type(getattr(self, "_transport", None)) in covered:
                return original(self, *args, **kwargs)  # the transport's patch sees this call
            return wrapper(original, self, args, kwargs)

        patched = patched_client_sync
    else:

        def patched_sync(self: Any, *args: Any, **kwargs: Any) -> Any:
            return wrapper(original, self, args, kwargs)

        patched = patched_sync
    functools.update_wrapper(patched, original)
    patched._joule_otel_capture = capture
    return patched
