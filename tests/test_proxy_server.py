"""The proxy's own HTTP/1.1 server, spoken to over raw sockets: what HTTP asks of a server, each case on the wire."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from joule_otel.proxy import HttpServer
from joule_otel.proxy._server import Reply, Request

LIMIT = 1000


async def echo(request: Request, reply: Reply) -> None:
    """What the server read, as JSON; ``/stream`` sends three chunks; ``/boom`` fails; ``/wait`` waits a while."""
    if request.path == b"/boom":
        raise RuntimeError("the handler failed")
    if request.path == b"/stream":
        await reply.start(200, [(b"content-type", b"text/event-stream")], None)
        for i in range(3):
            await reply.send(b"data: %d\n\n" % i)
            await asyncio.sleep(0.01)
        await reply.end()
        return
    if request.path == b"/wait":
        await asyncio.sleep(0.5)
    seen = {
        "method": request.method,
        "path": request.path.decode(),
        "query": request.query.decode(),
        "headers": [[k.decode(), v.decode()] for k, v in request.headers],
        "body": request.body.decode(),
    }
    await reply.respond(200, json.dumps(seen).encode())


class Served:
    def __init__(self, server: HttpServer, loop: asyncio.AbstractEventLoop, port: int) -> None:
        self.server, self.loop, self.port = server, loop, port

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        return sock

    def shutdown(self, grace_s: float = 5.0) -> None:
        asyncio.run_coroutine_threadsafe(self.server.shutdown(grace_s), self.loop).result(timeout=30)


@pytest.fixture
def served() -> Iterator[Served]:
    server = HttpServer(echo, max_body_bytes=LIMIT, request_timeout_s=0.5, idle_timeout_s=0.5)
    loop = asyncio.new_event_loop()
    port = loop.run_until_complete(server.start("127.0.0.1", 0))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield Served(server, loop, port)
    if not server.closing:
        asyncio.run_coroutine_threadsafe(server.shutdown(1), loop).result(timeout=30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)
    loop.close()


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def read_one(sock: socket.socket) -> bytes:
    """One response with a Content-Length, read whole, the connection left open."""
    data = b""
    while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < int(
        answers(data.partition(b"\r\n\r\n")[0] + b"\r\n\r\n")[0][1]["content-length"]
    ):
        data += sock.recv(65536)
    return data


def answers(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """The responses in a byte stream, de-chunked: (status, headers, body) each."""
    found = []
    while data:
        head, _, data = data.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        if "content-length" in headers:
            size = int(headers["content-length"])
            body, data = data[:size], data[size:]
        elif headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                size_line, _, data = data.partition(b"\r\n")
                size = int(size_line, 16)
                body, data = body + data[:size], data[size + 2 :]
                if size == 0:
                    break
        else:
            body, data = (b"", data) if status in (100, 204, 304) else (data, b"")
        found.append((status, headers, body))
    return found


POST = b"POST /v1/x?a=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello"


def test_pipelined_requests_are_answered_in_order_on_one_connection(served):
    with served.connect() as sock:
        sock.sendall(
            b"GET /wait HTTP/1.1\r\nHost: h\r\n\r\n"  # the slowest first: the others wait their turn
            + POST
            + b"GET /stream HTTP/1.1\r\nHost: h\r\n\r\n"
            + b"GET /last HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
        )
        got = answers(read_all(sock))
    assert [status for status, _, _ in got] == [200, 200, 200, 200]
    assert json.loads(got[0][2])["path"] == "/wait"
    second = json.loads(got[1][2])
    assert (second["method"], second["path"], second["query"], second["body"]) == ("POST", "/v1/x", "a=1", "hello")
    assert got[2][1]["transfer-encoding"] == "chunked" and got[2][2] == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
    assert json.loads(got[3][2])["path"] == "/last" and got[3][1]["connection"] == "close"


def test_expect_100_continue_is_answered_before_the_body_is_sent(served):
    with served.connect() as sock:
        sock.sendall(b"POST /v1/x HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"hello")
        sock.sendall(b"GET /end HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        got = answers(read_all(sock))
    assert json.loads(got[0][2])["body"] == "hello" and got[0][0] == 200


def test_a_body_over_the_limit_is_a_413_before_it_is_read_and_a_chunked_one_as_it_grows(served):
    with served.connect() as sock:
        sock.sendall(b"POST /v1/x HTTP/1.1\r\nHost: h\r\nContent-Length: 100000\r\nExpect: 100-continue\r\n\r\n")
        (status, headers, body), *_ = answers(read_all(sock))  # no 100 Continue: the answer, then the close
    assert status == 413 and headers["connection"] == "close"
    assert json.loads(body)["error"]["code"] == "too_large"
    with served.connect() as sock:
        sock.sendall(b"POST /v1/x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(5):
            sock.sendall(b"%x\r\n%s\r\n" % (300, b"a" * 300))
        (status, _, body), *_ = answers(read_all(sock))
    assert status == 413
    with served.connect() as sock:  # within the limit, chunks are read whole
        sock.sendall(b"POST /v1/x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        sock.sendall(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
        (status, _, body), *_ = answers(read_all(sock))
    assert status == 200 and json.loads(body)["body"] == "abcde"


def test_a_client_still_sending_a_refused_body_reads_the_413_not_a_reset(served):
    """Closing with unread bytes makes the kernel answer them with a reset, which discards the 413 the client has
    not read yet: the server half-closes and drops what still arrives (a lingering close)."""
    for _ in range(5):
        with served.connect() as sock:
            sock.sendall(b"POST /v1/x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
            chunk = b"%x\r\n%s\r\n" % (4096, b"a" * 4096)
            for _ in range(64):  # 256 KiB, far past the limit, sent as fast as the socket takes it
                sock.sendall(chunk)
            (status, headers, body), *_ = answers(read_all(sock))
        assert status == 413 and headers["connection"] == "close"
        assert json.loads(body)["error"]["code"] == "too_large"


def test_what_is_not_http_is_a_400_and_a_handler_that_fails_a_500(served):
    with served.connect() as sock:
        sock.sendall(b"\x16\x03\x01\x02\x00 this is TLS, not HTTP\r\n\r\n")
        (status, headers, body), *_ = answers(read_all(sock))
    assert status == 400 and headers["connection"] == "close" and json.loads(body)["error"]["code"] == "bad_request"
    with served.connect() as sock:
        sock.sendall(b"GET /boom HTTP/1.1\r\nHost: h\r\n\r\n")
        (status, _, body), *_ = answers(read_all(sock))
    assert status == 500 and json.loads(body)["error"]["type"] == "proxy_error"


def test_an_http_10_client_gets_no_chunks_and_a_stream_ends_with_the_connection(served):
    with served.connect() as sock:
        sock.sendall(b"GET /stream HTTP/1.0\r\n\r\n")
        data = read_all(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head.lower() and b"connection: close" in head.lower()
    assert body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
    with served.connect() as sock:  # HTTP/1.0 keep-alive, with a length: the connection stays for the next
        sock.sendall(b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /b HTTP/1.0\r\n\r\n")
        got = answers(read_all(sock))
    assert [json.loads(b)["path"] for _, _, b in got] == ["/a", "/b"]
    assert got[0][1]["connection"] == "keep-alive"


def test_a_head_has_no_body_and_an_upgrade_is_answered_over_http_11_then_closed(served):
    with served.connect() as sock:
        sock.sendall(
            b"HEAD /stream HTTP/1.1\r\nHost: h\r\n\r\nGET /after HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
        )
        data = read_all(sock)
    assert data.startswith(b"HTTP/1.1 200 OK\r\n") and data.count(b"HTTP/1.1 200") == 2 and b"data: 0" not in data
    with served.connect() as sock:  # what curl --http2 sends to an http:// URL
        sock.sendall(
            b"GET /v1/models HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
            b"HTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
        )
        (status, headers, body), *rest = answers(read_all(sock))
    assert (
        status == 200 and rest == [] and headers["connection"] == "close" and json.loads(body)["path"] == "/v1/models"
    )


def test_a_request_that_never_finishes_is_a_408_and_an_idle_connection_is_closed(served):
    with served.connect() as sock:
        sock.sendall(b"POST /v1/x HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nhal")  # 7 bytes short, forever
        started = time.monotonic()
        (status, _, body), *_ = answers(read_all(sock))
    assert status == 408 and json.loads(body)["error"]["code"] == "timeout"
    assert time.monotonic() - started < 5
    with served.connect() as sock:
        sock.sendall(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n")
        (status, _, _), *_ = answers(read_all(sock))  # answered, then closed once idle past the keep-alive time
    assert status == 200


def test_shutdown_lets_the_request_under_way_finish_then_closes(served):
    with served.connect() as busy, served.connect() as idle:
        idle.sendall(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n")
        answers_idle = read_one(idle)
        busy.sendall(b"GET /wait HTTP/1.1\r\nHost: h\r\n\r\n")
        time.sleep(0.1)
        stopping = threading.Thread(target=served.shutdown)
        stopping.start()
        (status, headers, body), *_ = answers(read_all(busy))
        assert idle.recv(100) == b""  # the idle connection was closed at once
        stopping.join(timeout=30)
    assert answers_idle.startswith(b"HTTP/1.1 200")
    assert status == 200 and headers["connection"] == "close" and json.loads(body)["path"] == "/wait"
    with pytest.raises(OSError):
        served.connect()


def test_a_client_that_leaves_is_told_to_the_handler(served):
    left = threading.Event()

    async def watching(request: Request, reply: Reply) -> None:
        await reply.start(200, [], None)
        reply.on_gone(left.set)
        while not reply.gone:
            await reply.send(b"x")
            await asyncio.sleep(0.01)

    served.server.handler = watching
    with served.connect() as sock:
        sock.sendall(b"GET /s HTTP/1.1\r\nHost: h\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 200")
    assert left.wait(timeout=10)


def test_a_handler_answering_later_by_callbacks_keeps_pipelined_answers_in_order(served):
    def later(request: Request, reply: Reply) -> None:
        def answer() -> None:
            reply.head(200, [(b"content-type", b"text/plain")], None)
            reply.write(request.path)
            reply.finish()

        if request.path == b"/slow":  # held, then answered from a timer: the next request waits its turn
            asyncio.get_running_loop().call_later(0.05, answer)
        else:
            answer()

    served.server.handler = later
    with served.connect() as sock:
        sock.sendall(
            b"GET /slow HTTP/1.1\r\nHost: h\r\n\r\nGET /fast HTTP/1.1\r\nHost: h\r\n\r\n"
            b"GET /last HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
        )
        found = answers(read_all(sock))
    assert [(status, body) for status, _, body in found] == [(200, b"/slow"), (200, b"/fast"), (200, b"/last")]
