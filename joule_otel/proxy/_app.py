"""The recording gateway: forward, stream back, hand each call to capture.

Every request under ``/v1/`` goes to the upstream through the proxy's own HTTP/1.1 client (:mod:`._upstream`). The
process runs ``joule_otel.instrument()``; each call that client makes goes to the same capture as an app's (the same
call record, parsing, row builder, dedupe, metrics and ledger writer), opened once the answer's first bytes are on
their way to the client and finished when its body ends: what capture does is never between the upstream's bytes
and the client. The proxy itself only forwards: method, path, query, body and end-to-end headers go
upstream unchanged, status, headers and body come back unchanged, a stream chunk by chunk as it arrives. It never
adds energy of its own: every row's figures are the upstream's.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
from dataclasses import dataclass, field
from time import perf_counter_ns, time_ns
from typing import Any
from urllib.parse import unquote

from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from joule_otel._capture import operation_of
from joule_otel._genai import redact_url
from joule_otel._headers import clean_string
from joule_otel._instrument import active_capture
from joule_otel._record import ForwardedCall, RawHeaders
from joule_otel._tags import clean_key
from joule_otel._workload import baggage_workload
from joule_otel.proxy._server import Reply, Request, error_body
from joule_otel.proxy._upstream import Exchange, Upstream, UpstreamError, UpstreamTimeout

_log = logging.getLogger("joule_otel.proxy")

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
        b"expect",
    }
)
"""Headers of one connection (RFC 9110 7.6.1), those the next hop sets for itself (host, length), and ``Expect``
(the body is read whole before it goes upstream: the client's 100-continue was answered here)."""
WORKLOAD_HEADER = b"x-joule-workload"
TAG_PREFIX = b"x-joule-tag-"
TOKEN_HEADER = b"x-joule-proxy-token"
TRACE_HEADERS = frozenset({b"traceparent", b"tracestate", b"baggage"})
MAX_BODY_BYTES = 32 << 20
"""The largest request body forwarded (a 413 past it): prompts and images fit, an upload belongs elsewhere."""
DEFAULT_WORKLOAD = "proxy"


@dataclass
class ProxyConfig:
    """How the proxy forwards and whom it lets in."""

    upstream: str
    """The upstream's base URL, without ``/v1`` (``https://api.greenjoules.cloud``)."""
    token: str | None = None
    """``JOULE_OTEL_PROXY_TOKEN``: clients must send it in ``X-Joule-Proxy-Token`` (required off loopback)."""
    workload: str = DEFAULT_WORKLOAD
    key_workloads: dict[str, str] = field(default_factory=dict)
    """sha256 hex of an API key → workload (``--workloads FILE``): keys are matched by hash, never kept."""
    api_key: str | None = None
    """Sent as ``Authorization: Bearer …`` when a client sends none (``--api-key-env``; only with a token)."""
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 600.0
    max_body_bytes: int = MAX_BODY_BYTES


def key_hash(api_key: str) -> str:
    """How ``--workloads FILE`` names an API key: the sha256 of the key, in hex."""
    return hashlib.sha256(api_key.encode()).hexdigest()


def load_key_workloads(path: str) -> dict[str, str]:
    """``{"<sha256 hex of a key>": "workload", ...}`` from a JSON file.

    Raises:
        ValueError: not such a file (the message names it; never a key).
    """
    with open(path, encoding="utf-8") as handle:
        try:
            data = json.load(handle)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: want an object of key hash → workload")
    found: dict[str, str] = {}
    for given, name in data.items():
        digest = str(given).strip().lower().removeprefix("sha256:")
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"{path}: {digest[:12]!r}… is not a sha256 hex digest (joule-otel proxy --hash-key)")
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{path}: the workload of {digest[:12]}… must be a non-empty string")
        found[digest] = name.strip()
    return found


class Proxy:
    """The recording gateway: one request in, forwarded, its answer streamed back (:meth:`handle`)."""

    def __init__(self, config: ProxyConfig, tracer_provider: Any = None) -> None:
        self.config = config
        self.tracer = trace.get_tracer("joule_otel.proxy", tracer_provider=tracer_provider)
        """The spans' tracer: the provider capture uses (the global one, unless given)."""
        self._tracer_provider = tracer_provider
        self._tracing: bool | None = None
        self.upstream = Upstream(
            config.upstream, connect_timeout_s=config.connect_timeout_s, read_timeout_s=config.read_timeout_s
        )
        self.upstream_url = config.upstream.rstrip("/")
        self.in_flight = 0
        self.forwarded = 0
        self.refused = 0

    def handle(self, request: Request, reply: Reply) -> None:
        """Answer one request: ``/healthz``, a refusal, or the upstream's answer to it (finished later, as it comes)."""
        raw_path = request.path
        path = unquote(raw_path.decode("latin-1")) if b"%" in raw_path else raw_path.decode("latin-1")
        if path == "/healthz":
            reply.respond_now(200, json.dumps({"status": "ok", "in_flight": self.in_flight}).encode())
            return
        if not (path == "/v1" or path.startswith("/v1/")) or ("/." in path and _climbs(path)):
            self.refused += 1
            reply.respond_now(*error_body(404, f"joule-otel proxy forwards /v1/… only, not {path!r}", "not_found"))
            return
        if self.config.token is not None and not _token_ok(request.headers, self.config.token):
            self.refused += 1
            reply.respond_now(*error_body(401, "X-Joule-Proxy-Token is missing or wrong", "proxy_token"))
            return
        self._forward(request, path, reply)

    def close(self) -> None:
        """Close the upstream's idle connections."""
        self.upstream.close()

    def tracing(self) -> bool:
        """Whether spans go anywhere: decided at the first request (``instrument()`` has set the provider by then)."""
        if self._tracing is None:
            provider = self._tracer_provider or trace.get_tracer_provider()
            self._tracing = not isinstance(provider, (trace.NoOpTracerProvider, trace.ProxyTracerProvider))
        return self._tracing

    def _workload_of(self, named: bytes | None, auth: bytes | None, context: Any) -> str:
        """``X-Joule-Workload``, else the caller's baggage, else its API key's workload, else the proxy's own."""
        if named:
            return named.decode("utf-8", "replace")
        found = baggage_workload(context) if context is not None else None
        if found:
            return found
        if self.config.key_workloads and auth:
            scheme, _, key = auth.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer":
                found = self.config.key_workloads.get(key_hash(key.strip()))
                if found:
                    return found
        return self.config.workload

    def _forward(self, request: Request, path: str, reply: Reply) -> None:
        """Send one request upstream; its answer goes back through a :class:`_Forwarded` as it arrives."""
        outgoing: list[tuple[bytes, bytes]] = []
        named = auth = None
        carried: dict[str, str] = {}
        tagged: dict[str, str] = {}
        listed = _connection_options(request.headers)
        for name, value in request.headers:  # one pass: what goes upstream, and what is for the proxy itself
            if name in HOP_BY_HOP or name == TOKEN_HEADER or name in listed:
                continue
            if name.startswith(TAG_PREFIX):  # X-Joule-Tag-Team: search → the call's tag team=search
                key, text = clean_key(name[len(TAG_PREFIX) :].decode("latin-1")), clean_string(value)
                if key and text:
                    tagged[key] = text
                continue
            if name == WORKLOAD_HEADER:
                named = value
                continue
            if name == b"authorization":
                auth = value
            elif name in TRACE_HEADERS:
                carried[name.decode("latin-1")] = value.decode("latin-1")
            outgoing.append((name, value))
        if self.config.api_key and auth is None:
            outgoing.append((b"authorization", f"Bearer {self.config.api_key}".encode()))
        context = propagate.extract(carried) if carried else None
        method = request.method
        raw_path = request.path
        target = raw_path + b"?" + request.query if request.query else raw_path
        served = client = None
        if self.tracing():
            # a server span for the call, continuing the caller's trace, and the upstream call its child
            served = self.tracer.start_span(
                f"{method} {path}",
                context=context,
                kind=SpanKind.SERVER,
                attributes={
                    "http.request.method": method,
                    "url.path": path,
                    "joule.proxy.upstream": self.upstream_url,
                },
            )
            client = self.tracer.start_span(
                method,
                context=trace.set_span_in_context(served, context),
                kind=SpanKind.CLIENT,
                attributes={
                    "http.request.method": method,
                    "server.address": self.upstream.host,
                    "server.port": self.upstream.port,
                    "url.full": redact_url(self.upstream_url + target.decode("latin-1")),
                },
            )
            context = trace.set_span_in_context(client, context)
            outgoing = [(name, value) for name, value in outgoing if name not in (b"traceparent", b"tracestate")]
            injected: dict[str, str] = {}
            propagate.inject(injected, context=context)
            outgoing += [(name.encode(), value.encode()) for name, value in injected.items() if name != "baggage"]
        t0, started_ns = perf_counter_ns(), time_ns()
        forwarded = _Forwarded(self, reply)
        self.upstream.send(method, target, outgoing, request.body, forwarded)
        # what the call's row needs, noted while the request is on its way (no answer is read before this returns)
        forwarded.note(raw_path, outgoing, request.body, context, served, client, named, auth, tagged, t0, started_ns)
        self.in_flight += 1


class _Forwarded(Exchange):
    """One forwarded request: the upstream's answer to the client as it arrives, then the call to capture.

    Each step writes to the client first and notes the call after, so capture's work is never on the way of a byte.
    """

    # until the answer says otherwise
    status = 0
    t_first = 0
    head_ns: int | None = None
    call: ForwardedCall | None = None
    opened = False
    ended = False

    def __init__(self, proxy: Proxy, reply: Reply) -> None:
        self.proxy = proxy
        self.reply = reply

    def note(
        self,
        raw_path: bytes,
        outgoing: list[tuple[bytes, bytes]],
        body: bytes,
        context: Any,
        served: Any,
        client: Any,
        named: bytes | None,
        auth: bytes | None,
        tagged: dict[str, str],
        t0: int,
        started_ns: int,
    ) -> None:
        """The request as it went, for the call's row and spans."""
        self.raw_path, self.outgoing, self.body, self.context = raw_path, outgoing, body, context
        self.served, self.client = served, client
        self.named, self.auth, self.tagged = named, auth, tagged
        self.t0, self.started_ns = t0, started_ns

    # -- what the upstream sends ---------------------------------------------------------------
    def on_head(self, status: int, headers: list[tuple[bytes, bytes]], length: int | None) -> None:
        self.status, self.headers = status, headers
        self.proxy.forwarded += 1
        reply = self.reply
        reply.head(status, _headers_back(headers), length)
        reply.on_resume(self.resume)
        if length is None:  # a stream: its head is on its way; a client that goes away stops the upstream at once
            reply.on_gone(self._gone)
        if self.client is not None:  # the client span ends here, once capture has given it the call's attributes
            self.head_ns = time_ns()

    def on_data(self, chunk: bytes) -> None:
        arrived = perf_counter_ns()
        reply = self.reply
        if not reply.gone:
            reply.write(chunk)
            if reply.paused:
                self.pause()
        if not self.t_first:
            self.t_first = arrived
        call = self._open()
        if call is not None and call.kept >= 0:
            try:
                call.keep(chunk)
            except Exception:
                _capture_failed()

    def on_end(self) -> None:
        ended = perf_counter_ns()
        self.reply.finish()
        self._end(ended)

    def on_error(self, error: UpstreamError) -> None:
        if self.status:  # the upstream broke off mid-body: the client's answer ends short, as the upstream's did
            if not self.reply.gone:
                _log.info("joule-otel proxy: the upstream broke off a response (%s)", error)
            self.reply.cut()
            self._end(perf_counter_ns())
            return
        timed_out = isinstance(error, UpstreamTimeout)
        status = 504 if timed_out else 502
        self.status = status
        proxy = self.proxy
        capture = active_capture()
        operation = operation_of(self.raw_path, None)
        self.opened = True  # the call is this one, or none
        if capture is not None and operation is not None:
            try:
                failed = self._record(operation)
                failed.error = "TimeoutException" if timed_out else "ConnectError"
                capture.open(failed)
                capture.finish(failed)
            except Exception:
                capture.internal_error("the proxy's call")
        _end(self.client, status, type(error).__name__)
        self.client = None
        message = (
            f"the upstream {proxy.upstream_url} did not answer in time"
            if timed_out
            else f"the upstream {proxy.upstream_url} cannot be reached: {error}"
        )
        self.reply.respond_now(*error_body(status, message, "timeout" if timed_out else "unreachable"))
        self._end(perf_counter_ns())

    def _gone(self) -> None:
        """The client went away mid-answer: the upstream request stops, and the call is written as it stands."""
        self.cancel()
        self._end(perf_counter_ns())

    # -- the call, for capture ------------------------------------------------------------------
    def _record(self, operation: str) -> ForwardedCall:
        workload = self.proxy._workload_of(self.named, self.auth, self.context)
        return ForwardedCall(
            self.proxy.upstream.host,
            self.outgoing,
            self.body,
            operation,
            self.t0,
            self.started_ns,
            self.context,
            workload,
            self.tagged,
        )

    def _open(self) -> ForwardedCall | None:
        """The call, opened in capture as a wrapped transport's is (once); None if not a row."""
        if self.opened:
            return self.call
        self.opened = True
        capture = active_capture()
        if capture is None:
            return None
        try:
            headers = RawHeaders(self.headers)
            operation = operation_of(self.raw_path, headers)
            if operation is None:
                return None
            call = self._record(operation)
            call.t_first = self.t_first
            capture.open(call, self.status, headers, self.client)
            self.call = call
        except Exception:
            capture.internal_error("the proxy's call")
        finally:
            self._client_span_done()
        return self.call

    def _client_span_done(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            _end(client, self.status, end_time=self.head_ns)

    def _end(self, ended: int) -> None:
        if self.ended:
            return
        self.ended = True
        self.proxy.in_flight -= 1
        call = self._open() if self.status else self.call
        self._client_span_done()
        if call is not None:
            if not call.t_first:
                call.t_first = self.t_first
            call.t_end = ended
            try:
                capture = active_capture()
                if capture is not None:
                    capture.finish(call)
            except Exception:
                _capture_failed()
        _end(self.served, self.status)


def _connection_options(headers: list[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """The headers a ``Connection`` header names: this hop's alone, never forwarded (RFC 9110 7.6.1)."""
    named = [v for k, v in headers if k == b"connection"]
    if not named:
        return frozenset()
    return frozenset(t.strip().lower() for v in named for t in v.split(b",")) - {b"close", b"keep-alive", b""}


def _climbs(path: str) -> bool:
    """A path with a ``.`` or ``..`` segment: the upstream would resolve it outside ``/v1/``."""
    return any(segment in (".", "..") for segment in path.split("/"))


def _end(span: Any, status: int, error: str | None = None, end_time: int | None = None) -> None:
    if span is None:
        return
    span.set_attribute("http.response.status_code", status)
    if status >= 500 or error is not None:
        span.set_attribute("error.type", error or str(status))
        span.set_status(Status(StatusCode.ERROR))
    span.end(end_time=end_time)


def _capture_failed() -> None:
    capture = active_capture()
    if capture is not None:
        capture.internal_error("the proxy's call")


_HOP_SIZES = frozenset(len(name) for name in HOP_BY_HOP)
"""Names of other lengths are end-to-end: a dozen headers are sorted without lower-casing each."""
_UNSENDABLE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
"""What HTTP forbids in a header value: control characters other than tab."""


def _headers_back(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The upstream's headers that go on to the client: end-to-end ones whose values can be sent again."""
    if _UNSENDABLE.search(b"\t".join([value for _, value in headers])) is None:  # the usual case: every value is fine
        return [(k, v) for k, v in headers if len(k) not in _HOP_SIZES or k.lower() not in HOP_BY_HOP]
    return [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP and _UNSENDABLE.search(v) is None]


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    found = None
    for key, value in headers:
        if key == name:
            found = value
    return found


def _token_ok(headers: list[tuple[bytes, bytes]], token: str) -> bool:
    sent = _header(headers, TOKEN_HEADER) or b""
    return hmac.compare_digest(sent.strip(), token.encode())
