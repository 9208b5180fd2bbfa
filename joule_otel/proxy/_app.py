"""The recording gateway as a bare ASGI application: forward, stream back, let capture make the row.

Every request under ``/v1/`` goes to the upstream through one ``httpx.AsyncClient``; the process runs
``joule_otel.instrument()``, so that client's calls are captured exactly as an app's are (the same wrappers, the
same parsing, the same row builder and ledger writer). The proxy itself only forwards: method, path, query, body and
end-to-end headers go upstream unchanged, status, headers and body come back unchanged, a stream chunk by chunk as
it arrives. It never adds energy of its own: every row's figures are the upstream's.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import httpx
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind

from joule_otel._workload import workload

_log = logging.getLogger("joule_otel.proxy")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

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
    }
)
"""Headers of one connection (RFC 9110 7.6.1), and those the next hop sets for itself (host, length)."""
WORKLOAD_HEADER = b"x-joule-workload"
TAG_PREFIX = b"x-joule-tag-"
TOKEN_HEADER = b"x-joule-proxy-token"
OWN_HEADERS = (WORKLOAD_HEADER, TOKEN_HEADER)
"""Request headers for the proxy itself: read here, never forwarded."""
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


def _error(status: int, message: str, code: str) -> tuple[int, bytes]:
    body = {"error": {"message": message, "type": "proxy_error", "param": None, "code": code}}
    return status, json.dumps(body).encode()


class Proxy:
    """The ASGI application."""

    def __init__(
        self, config: ProxyConfig, client: httpx.AsyncClient | None = None, tracer_provider: Any = None
    ) -> None:
        self.config = config
        self.tracer = trace.get_tracer("joule_otel.proxy", tracer_provider=tracer_provider)
        """The server spans' tracer: the provider capture uses (the global one, unless given)."""
        self.upstream = config.upstream.rstrip("/")
        self.client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(config.read_timeout_s, connect=config.connect_timeout_s),
            limits=httpx.Limits(max_connections=512, max_keepalive_connections=128),
            follow_redirects=False,
        )
        self.in_flight = 0
        self.forwarded = 0
        self.refused = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        if path == "/healthz":
            await _respond(send, 200, json.dumps({"status": "ok", "in_flight": self.in_flight}).encode())
            return
        if not (path == "/v1" or path.startswith("/v1/")):
            self.refused += 1
            await _respond(send, *_error(404, f"joule-otel proxy forwards /v1/… only, not {path!r}", "not_found"))
            return
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        if self.config.token is not None and not _token_ok(headers, self.config.token):
            self.refused += 1
            await _respond(send, *_error(401, "X-Joule-Proxy-Token is missing or wrong", "proxy_token"))
            return
        body = await _read_body(receive, self.config.max_body_bytes)
        if body is None:
            self.refused += 1
            await _respond(
                send, *_error(413, f"the body is larger than {self.config.max_body_bytes} bytes", "too_large")
            )
            return
        self.in_flight += 1
        carrier = {name.decode("latin-1"): value.decode("latin-1") for name, value in headers}
        # a server span for the call, continuing the caller's trace; the upstream client span is its child
        with self.tracer.start_as_current_span(
            f"{scope['method']} {path}",
            context=propagate.extract(carrier),
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": scope["method"],
                "url.path": path,
                "joule.proxy.upstream": self.upstream,
            },
        ) as span:
            try:
                status = await self._forward(scope, headers, body, receive, send)
                span.set_attribute("http.response.status_code", status)
            finally:
                self.in_flight -= 1

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _workload_of(self, headers: list[tuple[bytes, bytes]]) -> str:
        named = _header(headers, WORKLOAD_HEADER)
        if named:
            return named.decode("utf-8", "replace")
        if self.config.key_workloads:
            auth = _header(headers, b"authorization")
            if auth:
                scheme, _, key = auth.decode("latin-1").partition(" ")
                found = self.config.key_workloads.get(key_hash(key.strip())) if scheme.lower() == "bearer" else None
                if found:
                    return found
        return self.config.workload

    async def _forward(
        self, scope: Scope, headers: list[tuple[bytes, bytes]], body: bytes, receive: Receive, send: Send
    ) -> int:
        """Forward one request and stream its answer back; the status the client got."""
        outgoing = [
            (name, value)
            for name, value in headers
            if name not in HOP_BY_HOP and name not in OWN_HEADERS and not name.startswith(TAG_PREFIX)
        ]
        if self.config.api_key and _header(headers, b"authorization") is None:
            outgoing.append((b"authorization", f"Bearer {self.config.api_key}".encode()))
        query = scope.get("query_string") or b""
        url = self.upstream + scope["path"] + ("?" + query.decode("latin-1") if query else "")
        with workload(self._workload_of(headers)):
            # a request of its own, not the client's build_request: that adds the client's default headers
            # (Accept-Encoding among them), and the upstream must see exactly what the app sent
            request = httpx.Request(scope["method"], url, headers=outgoing, content=body)
            try:
                response = await self.client.send(request, stream=True)
            except httpx.TimeoutException:
                await _respond(send, *_error(504, f"the upstream {self.upstream} did not answer in time", "timeout"))
                return 504
            except httpx.HTTPError as exc:
                message = f"the upstream {self.upstream} cannot be reached: {type(exc).__name__}"
                await _respond(send, *_error(502, message, "unreachable"))
                return 502
        self.forwarded += 1
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": [(k, v) for k, v in response.headers.raw if k.lower() not in HOP_BY_HOP and _sendable(v)]
                    + _length(response),
                }
            )
            await self._stream(response, receive, send)
        finally:
            await response.aclose()  # capture finishes the call here: its row is written with what arrived
        return response.status_code

    async def _stream(self, response: httpx.Response, receive: Receive, send: Send) -> None:
        """Each chunk to the client as the upstream sends it; a client that goes away stops the upstream request."""
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            async for chunk in response.aiter_raw():
                if gone.done():
                    return
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if not gone.done():
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except httpx.HTTPError:
            # the upstream broke off mid-body: the client's connection ends short, as the upstream's did
            _log.info("joule-otel proxy: the upstream broke off a response", exc_info=True)
        finally:
            gone.cancel()


def _sendable(value: bytes) -> bool:
    """Whether a header value can go out again: HTTP forbids control characters other than tab in one."""
    return not any((byte < 0x20 and byte != 0x09) or byte == 0x7F for byte in value)


def _length(response: httpx.Response) -> list[tuple[bytes, bytes]]:
    """The upstream's Content-Length when the body is forwarded as it came (raw bytes, so the length holds)."""
    length = response.headers.get("content-length")
    return [(b"content-length", length.encode())] if length and length.isdigit() else []


async def _disconnected(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    found = None
    for key, value in headers:
        if key == name:
            found = value
    return found


def _token_ok(headers: list[tuple[bytes, bytes]], token: str) -> bool:
    sent = _header(headers, TOKEN_HEADER) or b""
    return hmac.compare_digest(sent.strip(), token.encode())


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The request body, or None past ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"".join(chunks)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


async def _respond(send: Send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
