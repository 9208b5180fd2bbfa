"""The recording gateway: forward, stream back, hand each call to capture.

Every request under ``/v1/`` goes to the upstream through the proxy's own HTTP/1.1 client (:mod:`._upstream`). The
process runs ``joule_otel.instrument()``; each call that client makes goes to the same capture as an app's (the same
call record, parsing, row builder, dedupe, metrics and ledger writer), opened when the answer's head arrives and
finished when its body ends. The proxy itself only forwards: method, path, query, body and end-to-end headers go
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

from joule_otel._capture import Capture, operation_of
from joule_otel._genai import redact_url
from joule_otel._headers import clean_string
from joule_otel._instrument import active_capture
from joule_otel._record import ForwardedCall, RawHeaders
from joule_otel._tags import clean_key
from joule_otel._workload import baggage_workload
from joule_otel.proxy._server import Reply, Request, error_body
from joule_otel.proxy._upstream import Answer, Upstream, UpstreamError, UpstreamTimeout

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

    async def handle(self, request: Request, reply: Reply) -> None:
        """Answer one request: ``/healthz``, a refusal, or the upstream's answer to it."""
        raw_path = request.path
        path = unquote(raw_path.decode("latin-1"))
        if path == "/healthz":
            await reply.respond(200, json.dumps({"status": "ok", "in_flight": self.in_flight}).encode())
            return
        if not (path == "/v1" or path.startswith("/v1/")) or _climbs(path):
            self.refused += 1
            await reply.respond(*error_body(404, f"joule-otel proxy forwards /v1/… only, not {path!r}", "not_found"))
            return
        if self.config.token is not None and not _token_ok(request.headers, self.config.token):
            self.refused += 1
            await reply.respond(*error_body(401, "X-Joule-Proxy-Token is missing or wrong", "proxy_token"))
            return
        self.in_flight += 1
        try:
            await self._forward(request, path, reply)
        finally:
            self.in_flight -= 1

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

    async def _forward(self, request: Request, path: str, reply: Reply) -> None:
        """Forward one request and stream its answer back, handing the call to capture on the way."""
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
        body = request.body
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
        capture = active_capture()
        workload = self._workload_of(named, auth, context)
        t0, started_ns = perf_counter_ns(), time_ns()
        try:
            answer = await self.upstream.request(method, target, outgoing, body)
        except UpstreamError as exc:
            timed_out = isinstance(exc, UpstreamTimeout)
            status = 504 if timed_out else 502
            operation = operation_of(raw_path, None)
            if capture is not None and operation is not None:
                failed = ForwardedCall(
                    self.upstream.host, outgoing, body, operation, t0, started_ns, context, workload, tagged
                )
                failed.error = "TimeoutException" if timed_out else "ConnectError"
                capture.open(failed)
                capture.finish(failed)
            _end(client, status, type(exc).__name__)
            message = (
                f"the upstream {self.upstream_url} did not answer in time"
                if timed_out
                else f"the upstream {self.upstream_url} cannot be reached: {exc}"
            )
            await reply.respond(*error_body(status, message, "timeout" if timed_out else "unreachable"))
            _end(served, status)
            return
        self.forwarded += 1
        call = None
        if capture is not None:
            call = _open(
                capture,
                answer,
                raw_path,
                ForwardedCall(self.upstream.host, outgoing, body, "", t0, started_ns, context, workload, tagged),
                client,
            )
        _end(client, answer.status)
        try:
            back = _headers_back(answer.headers)
            length = _length(answer.headers)
            await reply.start(answer.status, back, length)
            if length is None:  # a stream: a client that goes away stops the upstream request at once
                reply.on_gone(answer.close)
            await _stream(answer, call, reply)
        finally:
            answer.close()
            if call is not None:
                if not call.t_end:
                    call.t_end = perf_counter_ns()
                capture.finish(call)  # type: ignore[union-attr]
            _end(served, answer.status)


async def _stream(answer: Answer, call: ForwardedCall | None, reply: Reply) -> None:
    """Each chunk to the client as the upstream sends it, a copy kept for capture."""
    try:
        async for chunk in answer.body():
            if call is not None:
                if not call.t_first:
                    call.t_first = perf_counter_ns()
                if call.kept >= 0:
                    call.keep(chunk)
            if reply.gone:
                return
            await reply.send(chunk)
        if call is not None:
            call.t_end = perf_counter_ns()
        await reply.end()
    except UpstreamError:
        if not reply.gone:  # the upstream broke off mid-body: the client's answer ends short, as the upstream's did
            _log.info("joule-otel proxy: the upstream broke off a response", exc_info=True)


def _connection_options(headers: list[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """The headers a ``Connection`` header names: this hop's alone, never forwarded (RFC 9110 7.6.1)."""
    named = [v for k, v in headers if k == b"connection"]
    if not named:
        return frozenset()
    return frozenset(t.strip().lower() for v in named for t in v.split(b",")) - {b"close", b"keep-alive", b""}


def _climbs(path: str) -> bool:
    """A path with a ``.`` or ``..`` segment: the upstream would resolve it outside ``/v1/``."""
    return any(segment in (".", "..") for segment in path.split("/"))


def _open(capture: Capture, answer: Answer, raw_path: bytes, call: ForwardedCall, span: Any) -> ForwardedCall | None:
    """The call of an answer whose head arrived, opened in capture as a wrapped transport's is; None if not a row."""
    try:
        headers = RawHeaders(answer.headers)
        operation = operation_of(raw_path, headers)
        if operation is None:
            return None
        call.operation = operation
        capture.open(call, answer.status, headers, span)
        return call
    except Exception:
        capture.internal_error("the proxy's call")
        return None


def _end(span: Any, status: int, error: str | None = None) -> None:
    if span is None:
        return
    span.set_attribute("http.response.status_code", status)
    if status >= 500 or error is not None:
        span.set_attribute("error.type", error or str(status))
        span.set_status(Status(StatusCode.ERROR))
    span.end()


_UNSENDABLE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
"""What HTTP forbids in a header value: control characters other than tab."""


def _headers_back(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The upstream's headers that go on to the client: end-to-end ones whose values can be sent again."""
    if _UNSENDABLE.search(b"\t".join(value for _, value in headers)) is None:  # the usual case: every value is fine
        return [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP]
    return [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP and _UNSENDABLE.search(v) is None]


def _length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The upstream's Content-Length when the body is forwarded as it came (raw bytes, so the length holds)."""
    for name, value in headers:
        if name.lower() == b"content-length" and value.strip().isdigit():
            return int(value)
    return None


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    found = None
    for key, value in headers:
        if key == name:
            found = value
    return found


def _token_ok(headers: list[tuple[bytes, bytes]], token: str) -> bool:
    sent = _header(headers, TOKEN_HEADER) or b""
    return hmac.compare_digest(sent.strip(), token.encode())
