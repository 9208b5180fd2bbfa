"""A call captured in the app: what the app's thread keeps of it, and how its body is made ready to parse.

Filled in on the app's thread by :mod:`joule_otel._capture`, finished once, then read on the background thread by
:mod:`joule_otel._pipeline` (which turns it into a row through :mod:`joule_otel._calls`). A leaf module: both sides
import it, it imports neither.
"""

from __future__ import annotations

from typing import Any

from joule_otel._decode import decode
from joule_otel._genai import BODY_CAP_BYTES as REQUEST_CAP_BYTES
from joule_otel._genai import RequestFields
from joule_otel._headers import EnergyReading, header_value
from joule_otel._tags import current_tags
from joule_otel._workload import innermost_workload

BODY_CAP_BYTES = 4 << 20
"""Body bytes kept for parsing usage; past this only a tail is kept (or, if encoded, nothing)."""
TAIL_BYTES = 64 << 10

_CONTENT_ENCODING = b"content-encoding"


class CallRecord:
    """One captured call, filled in on the app's thread and finished once, then parsed in the background.

    A plain class whose fields start as class-level defaults: the app's thread stores only what this call has (seven
    fields when it begins, where a slotted record stored every one of its fields).
    """

    t_first = 0
    t_end = 0
    provider: str | None = None
    status_code: int | None = None
    response: Any = None
    """httpx's response, from the moment its stream is closed (the app read it through, or closed it) until the
    background has read the body the app's client decoded from it (see :meth:`inflate`). Not before: a response
    dropped unclosed must still be freed, and so finish the call. It holds this call through its stream, so the
    background lets go of it."""
    response_headers: Any = None
    reading: EnergyReading | None = None
    found: list[Any] | None = None
    """What :func:`~joule_otel._headers.scan_headers` found, when the reading was made on the app's thread."""
    request_fields: RequestFields | None = None
    trace_id: int | None = None
    span_id: int | None = None
    error: str | None = None
    kept = 0
    """Bytes in ``chunks``; -1 once an encoded body passed the cap (nothing more is kept: see :meth:`trim`)."""
    decoded = False
    """``chunks`` hold the body with its ``Content-Encoding`` undone already (see :meth:`inflate`)."""
    waited = False

    def __init__(self, request: Any, operation: str, t0: int, started_ns: int, context: Any = None) -> None:
        self.t0 = t0
        self.started_ns = started_ns
        self.operation = operation
        self.request = request
        """httpx's request: its host, headers and body are read in the background (the response holds it anyway)."""
        self.workload: str | None = innermost_workload()
        self.tags = current_tags()
        """The ``tags()`` blocks' tags (baggage and the process's are merged in on the background thread)."""
        self.context = context
        """The OpenTelemetry context the call was made in, when not empty: its baggage may name the workload."""
        self.chunks: list[bytes] = []

    @property
    def server_address(self) -> str | None:
        return self.request.url.host  # type: ignore[no-any-return]

    @property
    def request_headers(self) -> Any:
        return self.request.headers

    @property
    def request_body(self) -> bytes | None:
        """The request's body, or None for a streaming upload or one past the cap (an upload, not a prompt)."""
        try:
            body = self.request.content
        except Exception:  # a streaming upload has no content to read
            return None
        return body if len(body) <= REQUEST_CAP_BYTES else None

    def inflate(self) -> None:
        """Undo the body's ``Content-Encoding`` (called on the background thread); a plain body is left as it is.

        When the app's client read the body whole, it inflated it then, and httpx keeps what it decoded on the
        response: that is taken (its tail past :data:`BODY_CAP_BYTES`), and nothing is inflated a second time. The
        raw bytes kept are inflated here only when the app read the body otherwise (raw, or a stream of pieces).
        """
        response, self.response = self.response, None  # the response holds this call through its stream: let go
        if self.decoded:
            return
        content = getattr(response, "_content", None)
        if type(content) is bytes:
            self.chunks = [content if len(content) <= BODY_CAP_BYTES else content[-TAIL_BYTES:]]
            self.decoded = True
        elif self.chunks:
            encoding = header_value(self.response_headers, _CONTENT_ENCODING)
            if encoding:
                self.chunks = [decode(b"".join(self.chunks), encoding.decode("latin-1"))]
            self.decoded = True

    def decoding(self) -> bool:
        """Whether the app's client is still decoding the body (begun, not done): true once, then it is waited.

        A call finishes when its raw stream ends, a moment before the client has the decoded body: caught in that
        moment, the call waits one drain rather than have its body inflated a second time here.
        """
        response = self.response
        if response is None or self.waited or hasattr(response, "_content"):
            return False
        decoder = getattr(response, "_decoder", None)  # made by the client when it starts decoding
        if decoder is None or type(decoder).__name__ == "IdentityDecoder":
            return False
        self.waited = True
        return True

    def keep(self, chunk: bytes) -> None:
        """Keep body bytes for usage parsing, bounded (see :meth:`trim`); the stream wrappers do the same inline."""
        self.chunks.append(chunk)
        self.kept += len(chunk)
        if self.kept > BODY_CAP_BYTES:
            self.trim()

    def trim(self) -> None:
        """Past :data:`BODY_CAP_BYTES`: keep a tail of a plain body, nothing of an encoded one.

        A compressed body cannot be parsed from a tail: ``kept`` becomes -1 and callers keep nothing more.
        """
        if has_header(self.response_headers, _CONTENT_ENCODING):
            self.chunks, self.kept = [], -1
            return
        tail = b"".join(self.chunks)[-TAIL_BYTES:]
        self.chunks, self.kept = [tail], len(tail)


class RawHeaders:
    """Headers as a list of (name, value) byte pairs, read as httpx's are (through ``raw``)."""

    __slots__ = ("raw",)

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self.raw = raw


class ForwardedCall(CallRecord):
    """A call the proxy forwarded with its own client: its request as bytes, not an httpx request."""

    def __init__(
        self,
        host: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        operation: str,
        t0: int,
        started_ns: int,
        context: Any,
        workload: str | None,
        tags: dict[str, str] | None = None,
    ) -> None:
        super().__init__(None, operation, t0, started_ns, context)
        self.workload = workload
        if tags:
            self.tags = tags
        self._host = host
        self._headers = RawHeaders(headers)
        self._body = body

    @property
    def server_address(self) -> str | None:
        return self._host

    @property
    def request_headers(self) -> Any:
        return self._headers

    @property
    def request_body(self) -> bytes | None:
        return self._body if len(self._body) <= REQUEST_CAP_BYTES else None


def has_header(headers: Any, *names: bytes) -> bool:
    """Whether ``headers`` (httpx's) holds any of the lower-cased ``names``.

    One pass over the raw list, where ``name in headers`` decodes every header once per name.
    """
    return headers is not None and any(key.lower() in names for key, _ in headers.raw)
