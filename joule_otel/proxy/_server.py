"""The proxy's HTTP/1.1 server: asyncio protocols on httptools' request parser, with nothing between them and the proxy.

A framework's server (uvicorn, with its ASGI messages, a task per request and a scope built for any app) was most of
what the proxy added to a call once its client was its own (``benchmarks/run.py --only proxy``). The proxy serves one
kind of request: read whole, forwarded, answered whole or chunk by chunk. This server does that, and what HTTP/1.1
asks of a server: kept-alive connections, pipelined requests answered in order, ``Expect: 100-continue``, bodies of
known length, chunked or (for HTTP/1.0 clients) ended by the close, ``HEAD`` without a body, a bounded request body
(413, before it is read), a 400 for what is not HTTP, timeouts for clients that send slowly, stop reading or sit idle,
back-pressure both ways, and a drain on shutdown that lets every request under way finish.

A handler answers in one of two ways: as a coroutine (awaiting :meth:`Reply.start`, :meth:`Reply.send`,
:meth:`Reply.end`), run as a task; or at once, returning None, having finished its reply or holding it to finish
from callbacks later (:meth:`Reply.head`, :meth:`Reply.write`, :meth:`Reply.finish`). The proxy's forwarding is the
second kind: a call costs no task.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus

import httptools

_log = logging.getLogger("joule_otel.proxy")

MAX_PIPELINED = 16
"""Complete requests queued on one connection before it is read no further (until they are answered)."""

LINGER_S = 2.0
"""How long a connection that refused a request still reads and drops what the client sends before closing."""

Handler = Callable[["Request", "Reply"], "Awaitable[None] | None"]


class Request:
    """One request, read whole."""

    __slots__ = ("body", "headers", "http10", "keep_alive", "method", "path", "query", "refusal")

    def __init__(
        self,
        method: str,
        path: bytes,
        query: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        keep_alive: bool,
        http10: bool = False,
        refusal: tuple[int, str, str] | None = None,
    ) -> None:
        self.method = method
        self.path = path
        """The path as sent (percent-encoded), without the query."""
        self.query = query
        self.headers = headers
        """Names in lower case, values as sent, in order."""
        self.body = body
        self.keep_alive = keep_alive
        self.http10 = http10
        """An HTTP/1.0 client: no chunks; a body of unknown length ends with the connection."""
        self.refusal = refusal
        """(status, message, code) when the server answers this request itself: too large, not HTTP, too slow."""


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


_STATUS_LINES = {status: b"HTTP/1.1 %d %s\r\n" % (status, _reason(status)) for status in range(100, 600)}
_CHUNKED = b"transfer-encoding: chunked\r\n"
_CLOSE = b"connection: close\r\n"
_KEEP_ALIVE = b"connection: keep-alive\r\n"
_LAST_CHUNK = b"0\r\n\r\n"


class Reply:
    """What a handler writes back for one request: a head, then the body whole or piece by piece."""

    __slots__ = (
        "_chunked",
        "_connection",
        "_head",
        "_head_only",
        "_http10",
        "_no_body",
        "_on_gone",
        "_on_resume",
        "detached",
        "finished",
        "keep_alive",
        "started",
    )

    def __init__(self, connection: _Connection, request: Request) -> None:
        self._connection = connection
        self._head_only = request.method == "HEAD"
        self._http10 = request.http10
        self._chunked = False
        self._head = b""
        """The head of an answer of known length, held to go out with its body."""
        self._no_body = False
        self._on_gone: Callable[[], object] | None = None
        self._on_resume: Callable[[], object] | None = None
        self.keep_alive = request.keep_alive
        self.started = False
        self.finished = False
        self.detached = False
        """Finished later by callbacks (the handler returned without a coroutine): :meth:`finish` moves on."""

    @property
    def gone(self) -> bool:
        """The client closed its connection: nothing more it is sent arrives."""
        return self._connection.gone

    @property
    def paused(self) -> bool:
        """The client reads slower than it is sent: write no more until the ``on_resume`` callback."""
        return self._connection.write_paused

    def on_gone(self, callback: Callable[[], object]) -> None:
        """Call ``callback`` once if the client goes away before this reply is finished (now, if it has)."""
        if self._connection.gone:
            callback()
        else:
            self._on_gone = callback

    def on_resume(self, callback: Callable[[], object]) -> None:
        """Call ``callback`` each time a client that was sent more than it read has caught up."""
        self._on_resume = callback

    def _lost(self) -> None:
        callback, self._on_gone = self._on_gone, None
        if callback is not None and not self.finished:
            try:
                callback()
            except Exception:
                _log.warning("joule-otel proxy: a disconnect callback failed", exc_info=True)

    def _resumed(self) -> None:
        if self._on_resume is not None:
            self._on_resume()

    def head(self, status: int, headers: list[tuple[bytes, bytes]], length: int | None) -> None:
        """The status line and headers; the body follows with :meth:`write` and :meth:`finish`.

        ``headers`` must not frame the body: ``length`` is its ``Content-Length``, or None for a body sent as it
        comes (chunked; ended by closing the connection for an HTTP/1.0 client).
        """
        self.started = True
        if self._connection.server.closing:  # shutting down: this answer is the connection's last
            self.keep_alive = False
        no_body = status in (204, 304) or status < 200
        self._no_body = self._head_only or no_body
        parts = [_STATUS_LINES.get(status) or b"HTTP/1.1 %d \r\n" % status]
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        if length is not None:
            parts += (b"content-length: ", str(length).encode(), b"\r\n")
        elif not no_body:
            if self._http10:
                self.keep_alive = False  # the close ends the body
            elif not self._head_only:
                self._chunked = True
                parts.append(_CHUNKED)
        if not self.keep_alive:
            parts.append(_CLOSE)
        elif self._http10:
            parts.append(_KEEP_ALIVE)
        parts.append(b"\r\n")
        if length and not self._no_body:  # a whole body follows: the head goes with it, in one write
            self._head = b"".join(parts)
        else:  # a stream's head goes now: a client sees the answer begin before the first event
            self._connection.write(b"".join(parts))

    def write(self, chunk: bytes) -> None:
        """A piece of the body, written now (see :attr:`paused`)."""
        if not chunk or self._no_body:
            return
        if self._head:
            chunk, self._head = self._head + chunk, b""
        if self._chunked:
            self._connection.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        else:
            self._connection.write(chunk)

    def finish(self) -> None:
        """The body is complete; the connection goes on to its next request."""
        if self.finished:
            return
        if self._head:  # the body promised was not sent: the head alone, and the connection cannot be reused
            self._connection.write(self._head)
            self._head = b""
            self.keep_alive = False
        elif self._chunked:
            self._connection.write(_LAST_CHUNK)
        self.finished = True
        if self.detached:
            self._connection.replied(self)

    def cut(self) -> None:
        """The answer ends short (what was sent is all there is): the connection closes."""
        self.keep_alive = False
        if self.detached:
            self._connection.replied(self)

    def respond_now(self, status: int, body: bytes, content_type: bytes = b"application/json") -> None:
        """A whole answer of the server's own, written at once."""
        self.head(status, [(b"content-type", content_type)], len(body))
        self.write(body)
        self.finish()

    async def start(self, status: int, headers: list[tuple[bytes, bytes]], length: int | None) -> None:
        """:meth:`head`, for a handler that is a coroutine."""
        self.head(status, headers, length)

    async def send(self, chunk: bytes) -> None:
        """:meth:`write`, then wait while the client is slower than what it is sent."""
        self.write(chunk)
        if self._connection.write_paused:
            await self._connection.drain()

    async def end(self) -> None:
        """:meth:`finish`, for a handler that is a coroutine."""
        self.finish()

    async def respond(self, status: int, body: bytes, content_type: bytes = b"application/json") -> None:
        """:meth:`respond_now`, for a handler that is a coroutine."""
        self.respond_now(status, body, content_type)


class _Connection(asyncio.Protocol):
    """One client connection: the parser's callbacks build requests, answered one at a time in the order they came."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.pending: collections.deque[Request] = collections.deque()
        self.task: asyncio.Task[None] | None = None
        self.reply: Reply | None = None
        self.gone = False
        self.write_paused = False
        self.read_paused = False
        self._drained: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._deadline: float | None = None
        self._stall: asyncio.TimerHandle | None = None
        self._answering = False
        self._refused = False
        self._parsing = False
        self._continue = False
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._size = 0
        self._keep_alive = True
        self._http10 = False

    # -- asyncio.Protocol -----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)
        self._arm(self.server.request_timeout_s)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # Upgrade (h2c, websocket) is not taken: the request is answered over HTTP/1.1, then the connection ends,
            # since what follows it on the wire is not HTTP/1.1
            self._stop_reading()
        except httptools.HttpParserError as exc:
            self._refuse(400, f"not an HTTP/1.1 request ({exc})", "bad_request")

    def pause_writing(self) -> None:
        self.write_paused = True
        if self._stall is None:  # a client that stops reading is let go after a while
            self._stall = self.loop.call_later(self.server.request_timeout_s, self._stalled)

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        self._wake()
        if self.reply is not None:
            self.reply._resumed()

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        self.server.connections.discard(self)
        self._disarm()
        if self._stall is not None:
            self._stall.cancel()
        self.pending.clear()  # requests after the one under way: nobody is there to read their answers
        self._wake()
        reply = self.reply
        if reply is not None:
            reply._lost()
            if reply.detached:  # answered by callbacks: nothing more to wait for
                self.replied(reply)

    # -- httptools callbacks --------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._parsing = True
        self._url = b""
        self._headers = []
        self._body = []
        self._size = 0
        self._continue = False
        self._arm(self.server.request_timeout_s)

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        # the parser says so only until the message is complete; an upgrade's answer is the connection's last
        self._keep_alive = self.parser.should_keep_alive() and not self.parser.should_upgrade()
        self._http10 = self.parser.get_http_version() == "1.0"
        limit = self.server.max_body_bytes
        for name, value in self._headers:
            if name == b"content-length" and value.strip().isdigit() and int(value) > limit:
                self._refuse(413, f"the body is larger than {limit} bytes", "too_large")
                return
            if name == b"expect" and value.strip().lower() == b"100-continue":
                self._continue = True
        if self._continue and self.reply is None and not self.pending:
            self._write_continue()

    def on_body(self, body: bytes) -> None:
        if self._refused:
            return
        self._size += len(body)
        if self._size > self.server.max_body_bytes:
            self._refuse(413, f"the body is larger than {self.server.max_body_bytes} bytes", "too_large")
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._parsing = False
        self._disarm()
        url = self._url
        if url[:1] == b"/":  # origin form, what clients send (the parser has checked its characters)
            path, _, query = url.partition(b"?")
        else:  # absolute form, what a client sends to a proxy it was told of
            try:
                parsed = httptools.parse_url(url)
                path, query = parsed.path or b"/", parsed.query or b""
            except httptools.HttpParserInvalidURLError:
                self._refuse(400, "the request's target is not a URL", "bad_request")
                return
        method = self.parser.get_method().decode("ascii", "replace")
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        self._queue(Request(method, path, query, self._headers, body, self._keep_alive, self._http10))

    # -- answering ------------------------------------------------------------------------------
    def _queue(self, request: Request) -> None:
        self.pending.append(request)
        if len(self.pending) >= MAX_PIPELINED:
            self._stop_reading()
        if self.reply is None:
            self._answer()

    def _answer(self) -> None:
        """Answer the queued requests in the order they came, while each is answered at once."""
        if self._answering:  # a reply finished inside the loop below: the loop goes on
            return
        self._answering = True
        try:
            while self.reply is None and self.pending and not self.gone:
                request = self.pending.popleft()
                if self.read_paused and not self._refused and len(self.pending) < MAX_PIPELINED // 2:
                    self._resume_reading()
                reply = self.reply = Reply(self, request)
                self.server.busy.add(self)
                if request.refusal is not None:
                    reply.keep_alive = False
                    reply.respond_now(*error_body(*request.refusal))
                else:
                    try:
                        answering = self.server.handler(request, reply)
                    except Exception:
                        self._failed(reply)  # answered with a 500, or cut short if its answer had begun
                    else:
                        if answering is not None:  # a coroutine: the connection waits for its task
                            self.task = self.loop.create_task(self._run(answering, reply))
                            return
                        if not reply.finished and not self.gone:
                            reply.detached = True  # finished later, by callbacks
                            return
                self._done(reply)
        finally:
            self._answering = False
        if self.reply is None:
            self._settle()

    async def _run(self, answering: Awaitable[None], reply: Reply) -> None:
        try:
            await answering
        except Exception:
            self._failed(reply)
        finally:
            self.task = None
            self._done(reply)
            self._answer()

    def replied(self, reply: Reply) -> None:
        """A reply answered by callbacks is finished, cut short, or its client gone: on to the next request."""
        if reply is not self.reply:
            return
        self._done(reply)
        self._answer()

    def _done(self, reply: Reply) -> None:
        self.reply = None
        self.server.idle(self)
        if self.gone:
            return
        if not reply.finished or not reply.keep_alive:
            self.close()
        elif self._continue and self._parsing:  # a request waiting on 100-continue: its turn now
            self._write_continue()

    def _settle(self) -> None:
        """Nothing under way: time what comes next."""
        if self.gone or self.transport is None or self.transport.is_closing():
            return
        if self._parsing:  # the next request's arrival is timed from here
            self._arm(self.server.request_timeout_s)
        elif self.server.closing:
            self.close()
        elif not self.pending:
            self._arm(self.server.idle_timeout_s)

    def _failed(self, reply: Reply) -> None:
        _log.exception("joule-otel proxy: a request failed")
        if not reply.started and not self.gone:
            reply.keep_alive = False
            reply.respond_now(*error_body(500, "the proxy failed on this request", "proxy_failure"))

    def _refuse(self, status: int, message: str, code: str) -> None:
        """Answer with an error of the server's own after the requests before it, read nothing more, then close."""
        self._refused = True
        self._parsing = False
        self._stop_reading()
        self._queue(Request("", b"", b"", [], b"", False, self._http10, (status, message, code)))

    def _write_continue(self) -> None:
        self._continue = False
        self.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def write(self, data: bytes) -> None:
        if not self.gone and self.transport is not None:
            self.transport.write(data)

    async def drain(self) -> None:
        """Until the client has read enough of what it was sent (one that stops reading is let go)."""
        if not self.write_paused or self.gone:
            return
        self._drained = self.loop.create_future()
        try:
            await self._drained
        finally:
            self._drained = None

    def _stalled(self) -> None:
        self._stall = None
        _log.info("joule-otel proxy: a client read nothing for %ss; connection closed", self.server.request_timeout_s)
        self.abort()

    def _wake(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def _stop_reading(self) -> None:
        if not self.read_paused and self.transport is not None and not self.gone:
            self.read_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self.read_paused and self.transport is not None and not self.gone:
            self.read_paused = False
            self.transport.resume_reading()

    # -- timers ---------------------------------------------------------------------------------
    # One timer a connection, moved on only when it fires: a request's arrival and an idle wait each set a deadline,
    # and a kept-alive connection's requests cost no timer of their own.
    def _arm(self, seconds: float) -> None:
        deadline = self._deadline = self.loop.time() + seconds
        if self._timer is None or self._timer.when() > deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_at(deadline, self._timed_out)

    def _disarm(self) -> None:
        self._deadline = None

    def _timed_out(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline is None or self.gone:
            return
        if self.loop.time() < deadline:
            self._timer = self.loop.call_at(deadline, self._timed_out)
            return
        self._deadline = None
        if self.reply is not None or self.pending:  # answering: timed again when done
            return
        if self._parsing:  # a request begun and never finished
            self._refuse(408, f"the request did not arrive in {self.server.request_timeout_s}s", "timeout")
        else:  # idle: kept alive long enough
            self.close()

    def close(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self._refused and not self.gone and transport.can_write_eof():
            # a refused request's body may still be arriving: closing with bytes unread makes the kernel reset the
            # connection, and the client would see the reset rather than the answer. Half-close, read and drop what
            # still comes for a while, then close (nginx's lingering close).
            transport.write_eof()
            self._resume_reading()
            self._disarm()
            self.loop.call_later(LINGER_S, transport.close)
            return
        transport.close()  # after what is buffered is written

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


def error_body(status: int, message: str, code: str) -> tuple[int, bytes]:
    """The OpenAI error envelope: ``except openai.APIStatusError`` reads it as it reads the API's own."""
    body = {"error": {"message": message, "type": "proxy_error", "param": None, "code": code}}
    return status, json.dumps(body).encode()


class HttpServer:
    """Serve ``handler`` on ``host:port`` until :meth:`shutdown`."""

    def __init__(
        self,
        handler: Handler,
        *,
        max_body_bytes: int,
        request_timeout_s: float = 60.0,
        idle_timeout_s: float = 75.0,
    ) -> None:
        self.handler = handler
        self.max_body_bytes = max_body_bytes
        self.request_timeout_s = request_timeout_s
        """A request's whole arrival, and a stalled client's reading, may take this long."""
        self.idle_timeout_s = idle_timeout_s
        """A kept-alive connection with nothing under way is closed after this long."""
        self.connections: set[_Connection] = set()
        self.busy: set[_Connection] = set()
        """The connections answering a request."""
        self._all_idle: asyncio.Future[None] | None = None
        self.closing = False
        self._server: asyncio.AbstractServer | None = None
        self.loop: asyncio.AbstractEventLoop

    async def start(self, host: str, port: int) -> int:
        """Listen; the port bound (``port`` 0 picks one)."""
        self.loop = asyncio.get_running_loop()
        self._server = await self.loop.create_server(
            lambda: _Connection(self), host, port, reuse_address=True, backlog=2048
        )
        return int(self._server.sockets[0].getsockname()[1])

    def idle(self, connection: _Connection) -> None:
        """``connection`` answered its request."""
        self.busy.discard(connection)
        if not self.busy and self._all_idle is not None and not self._all_idle.done():
            self._all_idle.set_result(None)

    async def shutdown(self, grace_s: float = 30.0) -> None:
        """Stop listening, close idle connections, let each request under way finish (at most ``grace_s``)."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            if connection.reply is None and not connection._parsing:
                connection.close()
        if self.busy:
            self._all_idle = self.loop.create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self._all_idle), grace_s)
            except asyncio.TimeoutError:
                # past the grace: a coroutine's task is cancelled and every connection cut, so what their handlers
                # do on the way out (a forwarded call's row) still runs
                late = [c.task for c in self.busy if c.task is not None]
                for task in late:
                    task.cancel()
                for connection in list(self.busy):
                    connection.abort()
                await asyncio.gather(*late, return_exceptions=True)
        for connection in list(self.connections):
            connection.abort()
        await asyncio.sleep(0)  # each connection's loss is told (a forwarded call cut short is written)
        if self._server is not None:
            await self._server.wait_closed()
