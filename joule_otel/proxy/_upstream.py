"""The proxy's HTTP/1.1 client to its one upstream: kept-alive connections, httptools' parser, bytes as they arrive.

A general client (httpx) costs a millisecond a call on the proxy's path: its pool, its models and anyio's layers
are built for every kind of use. The proxy needs one kind: forward a request it has read whole to one origin, and
hand the answer on as it arrives. This client does that on asyncio's transports with the C parser uvicorn uses, and
tells an :class:`Exchange` what arrives from inside the transport's own callbacks: a forwarded call costs no task,
no future and no coroutine frame, which matter most at a few calls a second, when every cache is cold
(``benchmarks/run.py --only proxy``). What HTTP requires of it, it does: the ``Host`` and ``Content-Length`` of the
next hop, interim (1xx) answers skipped, bodies framed by length, by chunks or by the connection's end, a connection
reused only when both ends keep it alive, TLS with the system's or certifi's trust store, and
``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY`` honoured as httpx honours them.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import os
import ssl
import urllib.request
from typing import Any
from urllib.parse import unquote, urlsplit

import httptools

IDLE_CONNECTIONS = 128
"""Kept-alive connections held for reuse; more can be open at once, the rest close when done."""


class UpstreamError(Exception):
    """The upstream could not be reached, or broke off before its answer was complete."""


class UpstreamTimeout(UpstreamError):
    """The upstream took longer than the timeout to connect, to answer, or between two pieces of an answer."""


class Exchange:
    """One request's answer, told as it arrives.

    :meth:`on_head`, :meth:`on_data` as often as bytes come, then :meth:`on_end` or :meth:`on_error` (once, before or
    after the head). Subclasses answer them; they run inside the transport's callbacks, so they never block.
    """

    connection: _Connection | None = None
    """The connection carrying the request, once it has one."""
    cancelled = False

    def on_head(self, status: int, headers: list[tuple[bytes, bytes]], length: int | None) -> None:
        """The final answer's status, headers and ``Content-Length`` (interim 1xx answers are never told)."""

    def on_data(self, chunk: bytes) -> None:
        """The body that arrived in one read, de-chunked, never decoded."""

    def on_end(self) -> None:
        """The answer is complete."""

    def on_error(self, error: UpstreamError) -> None:
        """No answer, or one broken off: before :meth:`on_head` nothing was answered."""

    def cancel(self) -> None:
        """Stop the request: its connection closes, and nothing more is told."""
        self.cancelled = True
        connection, self.connection = self.connection, None
        if connection is not None:
            connection.drop()

    def pause(self) -> None:
        """Read no more of the answer until :meth:`resume` (the client reads slower than the upstream sends)."""
        if self.connection is not None:
            self.connection.pause(True)

    def resume(self) -> None:
        if self.connection is not None:
            self.connection.pause(False)


class _Connection(asyncio.Protocol):
    """One connection to the upstream: the parser's callbacks note the answer, each read is told to the exchange."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        # a header value with a control character in it is passed on as httpx passes it (then dropped as unsendable
        # by the proxy, and refused by capture's reading): not a reason to fail the whole answer
        lenient = getattr(self.parser, "set_dangerous_leniencies", None)  # httptools 0.6.2 and later
        if lenient is not None:
            lenient(lenient_headers=True)
        self.lost = False
        self.received = 0
        self.paused = False
        self.exchange: Exchange | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_done = False
        self.head_told = False
        self.complete = False
        self.framed = False
        """The answer's body has a length or chunks (else it runs to the connection's end)."""
        self.length: int | None = None
        """The answer's ``Content-Length``."""
        self.chunks: list[bytes] = []
        self.head_only = False
        self.keep_alive = False
        self.reused = False
        self.message = b""
        self.sent_at = 0
        """``received`` when the request was sent: nothing since means the upstream answered nothing."""
        self.last = 0.0

    def begin(self, exchange: Exchange, message: bytes, head_only: bool, reused: bool) -> None:
        """Send one request; what comes back goes to ``exchange``."""
        assert self.transport is not None
        self.transport.write(message)  # first: the answer is read only once this callback returns
        self._reset()
        self.exchange = exchange
        exchange.connection = self
        self.head_only, self.reused, self.message = head_only, reused, message
        self.sent_at = self.received
        loop = self.upstream.loop
        self.last = loop.time()
        if self._timer is None:
            self._timer = loop.call_at(self.last + self.upstream.read_timeout_s, self._check_timeout)

    # -- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        exchange = self.exchange
        if exchange is None:  # bytes no request asked for: the connection cannot be trusted again
            self.drop()
            return
        self.last = self.upstream.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"the upstream's answer is not HTTP/1.1 ({exc})"))
            return
        # told in order, each only if the exchange is still this connection's (a callback may cancel it)
        if self.head_done and not self.head_told:
            self.head_told = True
            exchange.on_head(self.status, self.headers, self.length)
        if self.chunks and self.exchange is exchange:
            chunks = self.chunks
            # a stream's events come several to a read: told together, they cost the client one write, not one each
            chunk = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            self.chunks = []
            exchange.on_data(chunk)
        if self.complete and self.exchange is exchange:
            self._finish()

    def eof_received(self) -> bool | None:
        return None  # close the transport: an upstream that ends its half is done with the connection

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        exchange = self.exchange
        if exchange is None:
            return
        if self.head_done and not self.framed and not self.complete:
            self.complete = True  # a body that runs to the connection's end has ended
            if not self.head_told:
                self.head_told = True
                exchange.on_head(self.status, self.headers, self.length)
            if self.exchange is exchange:
                self._finish()
        elif self.reused and not self.head_done and self.received == self.sent_at:
            # a kept-alive connection the upstream had closed meanwhile: nothing was answered, so nothing was done;
            # once more on a new connection (what browsers, curl and Go's net/http do)
            self._release()
            self.upstream.send_new(exchange, self.message, self.head_only)
        else:
            self._fail(UpstreamError("the upstream closed the connection before its answer was complete"))

    # -- httptools callbacks --------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # an interim answer (100 Continue, 103 Early Hints): the real one follows
            self.headers = []
            return
        self.status = status
        self.head_done = True
        self.keep_alive = self.parser.should_keep_alive()  # the parser says so only until the message is complete
        framed = status in (204, 304)
        for name, value in self.headers:  # lengths first: lower-casing each of a dozen names costs more
            size = len(name)
            if size == 14 and name.lower() == b"content-length":
                framed = True
                if value.strip().isdigit():
                    self.length = int(value)
            elif size == 17 and name.lower() == b"transfer-encoding" and b"chunked" in value.lower():
                framed = True
        self.framed = framed
        if self.head_only:  # a HEAD's answer has no body, whatever its length says
            self.complete = True

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        if self.head_done:
            self.complete = True

    # -- ending ---------------------------------------------------------------------------------
    def _release(self) -> Exchange | None:
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.connection = None
        return exchange

    def pause(self, paused: bool) -> None:
        if paused != self.paused and self.transport is not None and not self.lost:
            self.paused = paused
            if paused:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def _finish(self) -> None:
        """The answer is whole: the connection back to the pool (when both ends keep it), then the exchange told."""
        exchange = self._release()
        self.pause(False)  # paused for a slow client by the read that completed the answer
        if self.reusable() and len(self.upstream.idle) < IDLE_CONNECTIONS:
            self.upstream.idle.append(self)
        else:
            self.drop()
        if exchange is not None:
            exchange.on_end()

    def _fail(self, error: UpstreamError) -> None:
        exchange = self._release()
        self.drop()
        if exchange is not None:
            exchange.on_error(error)

    def _check_timeout(self) -> None:
        """The read timeout, by the time of the last byte: one timer a connection, moved on only when it fires."""
        self._timer = None
        if self.exchange is None or self.lost:
            return
        loop = self.upstream.loop
        deadline = self.last + self.upstream.read_timeout_s
        if loop.time() < deadline:
            self._timer = loop.call_at(deadline, self._check_timeout)
            return
        self._fail(UpstreamTimeout("the upstream did not answer in time"))

    def reusable(self) -> bool:
        return (
            self.complete
            and self.framed
            and not self.lost
            and not self.head_only
            and self.keep_alive
            and self.transport is not None
            and not self.transport.is_closing()
        )

    def drop(self) -> None:
        """Close the connection; an exchange still on it is told nothing more."""
        self._release()
        self.lost = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None:
            self.transport.close()


class _TunnelOpening(asyncio.Protocol):
    """An egress proxy's answer to CONNECT: its head, before the tunnel carries TLS."""

    def __init__(self) -> None:
        self.head: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._data = b""

    def data_received(self, data: bytes) -> None:
        self._data += data
        if b"\r\n\r\n" in self._data and not self.head.done():
            self.head.set_result(self._data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.head.done():
            self.head.set_exception(OSError("the egress proxy closed the connection"))


class Upstream:
    """Requests to one origin (``scheme://host[:port][/prefix]``) over a pool of kept-alive connections."""

    def __init__(self, base_url: str, *, connect_timeout_s: float = 10.0, read_timeout_s: float = 600.0) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"the upstream must be an http(s) URL, not {base_url!r}")
        self.tls = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.tls else 80)
        default_port = self.port == (443 if self.tls else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.authority = (host if default_port else f"{host}:{self.port}").encode("idna")
        self.prefix = parts.path.rstrip("/").encode()
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.idle: collections.deque[_Connection] = collections.deque()
        self._connecting: set[asyncio.Task[None]] = set()
        self._ssl: ssl.SSLContext | None = _ssl_context() if self.tls else None
        self._via = _egress_proxy(parts.scheme, self.host)
        self._loop: asyncio.AbstractEventLoop | None = None

    def send(
        self, method: str, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes, exchange: Exchange
    ) -> None:
        """Send one request (``target``: path and query as the client sent them); its answer goes to ``exchange``.

        ``headers`` are sent as given, after ``Host`` and before ``Content-Length`` (both this hop's own). On a
        kept-alive connection the request is written before this returns; else once a connection is made.
        """
        path = self.prefix + target
        if self._via is not None and not self.tls:  # a plain-HTTP egress proxy takes the whole URL
            path = b"http://" + self.authority + path
        head = [method.encode() + b" " + path + b" HTTP/1.1\r\nhost: " + self.authority + b"\r\n"]
        head += [name + b": " + value + b"\r\n" for name, value in headers]
        if body or method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
            head.append(b"content-length: %d\r\n" % len(body))
        head += (b"\r\n", body)
        message = b"".join(head)
        connection = self._idle_connection()
        if connection is not None:
            connection.begin(exchange, message, method == "HEAD", reused=True)
        else:
            self.send_new(exchange, message, method == "HEAD")

    def send_new(self, exchange: Exchange, message: bytes, head_only: bool) -> None:
        """Send on a connection of its own, once it is made."""
        task = self.loop.create_task(self._send_new(exchange, message, head_only))
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)

    async def _send_new(self, exchange: Exchange, message: bytes, head_only: bool) -> None:
        try:
            connection = await self._connect()
        except UpstreamError as exc:
            if not exchange.cancelled:
                exchange.on_error(exc)
            return
        if exchange.cancelled:
            connection.drop()
            return
        connection.begin(exchange, message, head_only, reused=False)

    def _idle_connection(self) -> _Connection | None:
        """The most recently used kept-alive connection still open (those the upstream closed are dropped)."""
        idle = self.idle
        while idle:
            connection = idle.pop()
            if not connection.lost and connection.transport is not None and not connection.transport.is_closing():
                return connection
        return None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    async def _connect(self) -> _Connection:
        loop = self.loop
        try:
            if self._via is None:
                _, connection = await asyncio.wait_for(
                    loop.create_connection(
                        lambda: _Connection(self),
                        self.host,
                        self.port,
                        ssl=self._ssl,
                        server_hostname=self.host if self.tls else None,
                    ),
                    self.connect_timeout_s,
                )
            else:
                connection = await asyncio.wait_for(self._connect_via(loop), self.connect_timeout_s)
        except asyncio.TimeoutError:
            raise UpstreamTimeout(f"no connection to {self.host}:{self.port} in {self.connect_timeout_s:g} s") from None
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamError(f"{type(exc).__name__}: {exc}") from None
        return connection

    async def _connect_via(self, loop: asyncio.AbstractEventLoop) -> _Connection:
        """A connection through ``HTTPS_PROXY``/``HTTP_PROXY``: a CONNECT tunnel for TLS, the proxy itself for HTTP."""
        assert self._via is not None
        proxy_host, proxy_port, auth = self._via
        if not self.tls:
            _, connection = await loop.create_connection(lambda: _Connection(self), proxy_host, proxy_port)
            return connection
        transport, opening = await loop.create_connection(_TunnelOpening, proxy_host, proxy_port)
        target = f"{self.host}:{self.port}".encode("idna")
        request = b"CONNECT " + target + b" HTTP/1.1\r\nhost: " + target + b"\r\n"
        if auth:
            request += b"proxy-authorization: Basic " + auth + b"\r\n"
        transport.write(request + b"\r\n")
        head = await opening.head
        status = head.split(b" ", 2)[1] if head.count(b" ") >= 1 else b""
        if not status.startswith(b"2"):
            transport.close()
            raise OSError(f"the egress proxy {proxy_host}:{proxy_port} refused the tunnel: {head.splitlines()[0]!r}")
        connection = _Connection(self)
        tls = await loop.start_tls(transport, connection, self._ssl, server_hostname=self.host)  # type: ignore[arg-type]
        if tls is None:
            raise OSError("TLS through the egress proxy failed")
        connection.connection_made(tls)
        return connection

    def close(self) -> None:
        while self.idle:
            self.idle.pop().drop()


def _ssl_context() -> ssl.SSLContext:
    """The trust httpx uses: ``SSL_CERT_FILE``/``SSL_CERT_DIR`` when set, else certifi's bundle (else the system's)."""
    cafile = os.environ.get("SSL_CERT_FILE") or None
    capath = os.environ.get("SSL_CERT_DIR") or None
    if cafile is None and capath is None:
        try:
            import certifi

            cafile = certifi.where()
        except ImportError:
            pass
    context = ssl.create_default_context(cafile=cafile, capath=capath)
    context.set_alpn_protocols(["http/1.1"])
    return context


def _egress_proxy(scheme: str, host: str) -> tuple[str, int, bytes | None] | None:
    """(host, port, basic credentials) of the environment's proxy for ``scheme://host``, or None (``NO_PROXY``)."""
    found: dict[str, Any] = urllib.request.getproxies()
    url = found.get(scheme)
    if not url or urllib.request.proxy_bypass(host):
        return None
    parts = urlsplit(url if "://" in url else "http://" + url)
    if not parts.hostname:
        return None
    auth = None
    if parts.username is not None:
        credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        auth = base64.b64encode(credentials.encode()).decode().encode()
    return parts.hostname, parts.port or 80, auth
