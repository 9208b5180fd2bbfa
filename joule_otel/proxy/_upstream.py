"""The proxy's HTTP/1.1 client to its one upstream: kept-alive connections, httptools' parser, bytes as they arrive.

A general client (httpx) costs a millisecond a call on the proxy's path: its pool, its models and anyio's layers
are built for every kind of use. The proxy needs one kind: forward a request it has read whole to one origin, and
hand the answer back chunk by chunk. This client does that on asyncio's transports with the C parser uvicorn uses
(``benchmarks/run.py --only proxy`` measures the difference). What HTTP requires of it, it does: the ``Host`` and
``Content-Length`` of the next hop, interim (1xx) answers skipped, bodies framed by length, by chunks or by the
connection's end, a connection reused only when both ends keep it alive, TLS with the system's or certifi's trust
store, and ``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY`` honoured as httpx honours them.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import os
import ssl
import urllib.request
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import unquote, urlsplit

import httptools

IDLE_CONNECTIONS = 128
"""Kept-alive connections held for reuse; more can be open at once, the rest close when done."""
PAUSE_AT_BYTES = 1 << 20
"""Answer bytes buffered for a client that reads slower than the upstream sends before the upstream is paused."""


class UpstreamError(Exception):
    """The upstream could not be reached, or broke off before its answer began."""


class UpstreamTimeout(UpstreamError):
    """The upstream took longer than the timeout to connect, to answer, or between two pieces of an answer."""


class _Connection(asyncio.Protocol):
    """One connection to the upstream: the parser's callbacks fill the answer under way."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        # a header value with a control character in it is passed on as httpx passes it (then dropped as unsendable
        # by the proxy, and refused by capture's reading): not a reason to fail the whole answer
        lenient = getattr(self.parser, "set_dangerous_leniencies", None)  # httptools 0.6.2 and later
        if lenient is not None:
            lenient(lenient_headers=True)
        self.lost = False
        self.received = 0
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_done = False
        self.complete = False
        self.framed = False
        """The answer's body has a length or chunks (else it runs to the connection's end)."""
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.paused = False
        self.head_only = False
        self.keep_alive = False

    # -- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.error = UpstreamError(f"the upstream's answer is not HTTP/1.1 ({exc})")
            self.lost = True
            if self.transport is not None:
                self.transport.close()
        if self.buffered > PAUSE_AT_BYTES and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool | None:
        return None  # close the transport: an upstream that ends its half is done with the connection

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.head_done and not self.framed and not self.complete:
            self.complete = True  # a body that runs to the connection's end has ended
        elif not self.complete and self.error is None:
            self.error = UpstreamError("the upstream closed the connection before its answer was complete")
        self._wake()

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
        self.framed = status in (204, 304) or any(
            name.lower() == b"content-length" or (name.lower() == b"transfer-encoding" and b"chunked" in value.lower())
            for name, value in self.headers
        )
        if self.head_only:  # a HEAD's answer has no body, whatever its length says
            self.complete = True

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)

    def on_message_complete(self) -> None:
        if self.head_done:
            self.complete = True

    # -- waiting ---------------------------------------------------------------------------------
    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, timeout_s: float) -> None:
        """Until something arrives (or the connection ends), at most ``timeout_s``."""
        loop = asyncio.get_running_loop()
        self.waiter = waiter = loop.create_future()
        timer = loop.call_later(timeout_s, _time_out, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self.waiter = None

    def take(self) -> bytes | None:
        """The body that has arrived and not been taken, if any: the pieces of one read, together.

        A stream's events come several to a read; handed on together they cost the client one write, not one each,
        and none waits for anything that has not arrived.
        """
        chunks = self.chunks
        if not chunks:
            return None
        chunk = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered -= len(chunk)
        if self.paused and self.buffered <= PAUSE_AT_BYTES // 2 and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return chunk

    def reusable(self) -> bool:
        return (
            self.complete
            and self.framed
            and not self.lost
            and not self.head_only
            and self.error is None
            and self.keep_alive
            and self.transport is not None
            and not self.transport.is_closing()
        )

    def close(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.close()


def _time_out(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(UpstreamTimeout("the upstream did not answer in time"))


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


class Answer:
    """The upstream's answer: its status and headers now, its body as it arrives (:meth:`body`)."""

    def __init__(self, upstream: Upstream, connection: _Connection) -> None:
        self._upstream = upstream
        self._connection = connection
        self.status = connection.status
        self.headers = connection.headers
        self._closed = False

    async def body(self) -> AsyncIterator[bytes]:
        """Each piece of the body as the upstream sends it (de-chunked, never decoded).

        Raises:
            UpstreamTimeout: no piece in the read timeout.
            UpstreamError: the upstream broke off mid-body.
        """
        connection = self._connection
        timeout_s = self._upstream.read_timeout_s
        while True:
            chunk = connection.take()
            if chunk is not None:
                yield chunk
                continue
            if connection.complete:
                return
            if connection.error is not None:
                raise connection.error
            if connection.lost:
                raise UpstreamError("the upstream closed the connection mid-body")
            await connection.wait(timeout_s)

    def close(self) -> None:
        """Done with the answer: its connection goes back to the pool when whole and kept alive, else it closes."""
        if self._closed:
            return
        self._closed = True
        connection = self._connection
        if connection.reusable() and len(self._upstream.idle) < IDLE_CONNECTIONS:
            self._upstream.idle.append(connection)
        else:
            connection.close()


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
        self._ssl: ssl.SSLContext | None = _ssl_context() if self.tls else None
        self._via = _egress_proxy(parts.scheme, self.host)

    async def request(self, method: str, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> Answer:
        """Send one request (``target``: path and query as the client sent them) and wait for its answer's head.

        ``headers`` are sent as given, after ``Host`` and before ``Content-Length`` (both this hop's own).

        Raises:
            UpstreamTimeout: no connection or no answer in the timeouts.
            UpstreamError: the upstream cannot be reached, or broke off before answering.
        """
        path = self.prefix + target
        if self._via is not None and not self.tls:  # a plain-HTTP egress proxy takes the whole URL
            path = b"http://" + self.authority + path
        head = [method.encode(), b" ", path, b" HTTP/1.1\r\nhost: ", self.authority, b"\r\n"]
        for name, value in headers:
            head += (name, b": ", value, b"\r\n")
        if body or method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
            head += (b"content-length: ", str(len(body)).encode(), b"\r\n")
        head.append(b"\r\n")
        message = b"".join(head) + body
        for attempt in range(2):
            connection = self._idle_connection()
            reused = connection is not None
            if connection is None:
                connection = await self._connect()
            connection._reset()
            connection.head_only = method == "HEAD"
            before = connection.received
            try:
                assert connection.transport is not None
                connection.transport.write(message)
                while not connection.head_done:
                    if connection.error is not None:
                        raise connection.error
                    if connection.lost:
                        raise UpstreamError("the upstream closed the connection before answering")
                    await connection.wait(self.read_timeout_s)
            except UpstreamTimeout:
                connection.close()
                raise
            except (UpstreamError, RuntimeError, OSError) as exc:
                connection.close()
                # a kept-alive connection the upstream had closed meanwhile: nothing was answered, so nothing was done;
                # once more on a new connection (what browsers, curl and Go's net/http do)
                if reused and attempt == 0 and connection.received == before:
                    continue
                raise exc if isinstance(exc, UpstreamError) else UpstreamError(f"{type(exc).__name__}: {exc}") from exc
            return Answer(self, connection)
        raise AssertionError("unreachable")

    def _idle_connection(self) -> _Connection | None:
        """The most recently used kept-alive connection still open (those the upstream closed are dropped)."""
        idle = self.idle
        while idle:
            connection = idle.pop()
            if not connection.lost and connection.transport is not None and not connection.transport.is_closing():
                return connection
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            if self._via is None:
                _, connection = await asyncio.wait_for(
                    loop.create_connection(
                        _Connection,
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
            _, connection = await loop.create_connection(_Connection, proxy_host, proxy_port)
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
        connection = _Connection()
        tls = await loop.start_tls(transport, connection, self._ssl, server_hostname=self.host)  # type: ignore[arg-type]
        if tls is None:
            raise OSError("TLS through the egress proxy failed")
        connection.connection_made(tls)
        return connection

    def close(self) -> None:
        while self.idle:
            self.idle.pop().close()


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
