"""OpenAI-compatible routes, GenAI semantic-convention values, request parsing and providers.

A leaf module: what capture, the background pipeline and the OTLP receiver all need, importing
none of them. Pure functions; nothing here raises on what a server or caller sends.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import msgspec

from joule_otel._headers import RESPONSE_HEADERS, SCANNED, SCANNED_OPENAI, clean_label, clean_string

BODY_CAP_BYTES = 4 << 20
"""Request bodies larger than this are not parsed (an upload, not a prompt worth reading a model from)."""

_ROUTES: dict[str, str] = {
    "chat/completions": "chat",
    "completions": "text_completion",
    "embeddings": "embeddings",
    "responses": "responses",
    "images": "images",
    "audio": "audio",
    "models": "models",
    "moderations": "moderations",
    "files": "files",
    "batches": "batches",
    "uploads": "uploads",
    "fine_tuning": "fine_tuning",
    "vector_stores": "vector_stores",
    "assistants": "assistants",
    "threads": "threads",
}
"""OpenAI-compatible routes under ``/v1/`` and their names; longest prefixes first where they nest."""

INFERENCE_OPERATIONS = frozenset({"chat", "text_completion", "embeddings", "responses", "images", "audio"})
"""Routes that bill an inference: a call to one is a ledger row even without a Joule header (a 402, say)."""

OTHER_OPERATION = "other"
"""The operation of a call to a path that is not a known route but whose response carried Joule headers."""

SEMCONV_OPERATIONS = {
    "chat": "chat",
    "text_completion": "text_completion",
    "embeddings": "embeddings",
    "responses": "chat",
}
"""Route name → ``gen_ai.operation.name``; only values the semantic conventions define."""

JOULE_PROVIDER = "joule_cloud"
"""``gen_ai.provider.name`` and the ledger's ``provider`` for Joule Cloud."""
OPENAI_PROVIDER = "openai"
JOULE_DOMAIN = "greenjoules.cloud"
"""Joule Cloud's hosts are this domain and its subdomains (``api.greenjoules.cloud``)."""
OPENAI_HOST = "api.openai.com"
OPENAI_RESPONSE_HEADERS = (b"openai-version", b"openai-processing-ms")
"""Headers OpenAI's API (and Azure OpenAI) sends on every response: the API is OpenAI's, whatever the host."""

assert SCANNED[SCANNED_OPENAI:] == OPENAI_RESPONSE_HEADERS  # what provider_of_scanned reads
_route_cache: dict[bytes, str | None] = {}
_JSON_DECODER = json.JSONDecoder()


def route_operation(raw_path: bytes | str) -> str | None:
    """The name of an OpenAI-compatible route (``/v1/chat/completions`` → ``chat``), else None."""
    key = raw_path if isinstance(raw_path, bytes) else raw_path.encode("utf-8", "replace")
    cached = _route_cache.get(key, "")
    if cached != "":
        return cached
    path = key.split(b"?", 1)[0].decode("latin-1").rstrip("/")
    operation = None
    marker = path.rfind("/v1/")
    if marker >= 0:
        rest = path[marker + 4 :]
        for prefix, name in _ROUTES.items():
            if rest == prefix or rest.startswith(prefix + "/"):
                operation = name
                break
    if len(_route_cache) < 4096:
        _route_cache[key] = operation
    return operation


def provider_for(host: str | None, joule_headers: bool, openai_headers: bool = False) -> str:
    """``joule_cloud`` for a response with Joule headers or a Joule host, ``openai`` for OpenAI's API, else the host.

    Another provider's call is never recorded as Joule's: only what Joule sends (or Joule's own host) makes it so.
    OpenAI's API is recognised by its host or by the headers it sends (a proxy or gateway in front of it).
    """
    if joule_headers:
        return JOULE_PROVIDER
    name = (host or "").strip().lower().rstrip(".")
    if name == JOULE_DOMAIN or name.endswith("." + JOULE_DOMAIN):
        return JOULE_PROVIDER
    if name == OPENAI_HOST or openai_headers:
        return OPENAI_PROVIDER
    return clean_string(name) or "unknown"


_NO_JOULE_HEADER: list[Any] = [None] * len(RESPONSE_HEADERS)
_NO_OPENAI_HEADER: list[Any] = [None] * len(OPENAI_RESPONSE_HEADERS)


def provider_of_scanned(host: str | None, found: list[Any]) -> str:
    """:func:`provider_for` of a response, from what :func:`joule_otel._headers.scan_headers` found."""
    joule = found[: len(RESPONSE_HEADERS)] != _NO_JOULE_HEADER  # SCANNED begins with the Joule response headers
    return provider_for(host, joule, not joule and found[SCANNED_OPENAI:] != _NO_OPENAI_HEADER)


def parse_request_body(body: bytes | None) -> dict[str, Any]:
    """The JSON object of a request body, or ``{}`` (never raises)."""
    if not body or body[:1] != b"{" or len(body) > BODY_CAP_BYTES:
        return {}
    try:
        parsed = _JSON_DECODER.decode(body.decode("utf-8"))  # what json.loads does, less its encoding sniffing
    except (ValueError, RecursionError):  # UnicodeDecodeError included; a deeply nested body
        return {}
    return parsed if isinstance(parsed, dict) else {}


class RequestFields(NamedTuple):
    """What capture reads of a request body: the model asked for and whether a stream was."""

    model: str | None
    """``model``, cleaned like a header string; None when absent or not a string."""
    stream: bool | None
    """``stream`` as a bool (absent is False); None when the body is not a JSON object (nothing was read)."""


class _Fields(msgspec.Struct):
    model: Any = None
    stream: Any = None


_FIELDS_DECODER = msgspec.json.Decoder(_Fields)
_new_tuple = tuple.__new__  # a named tuple made once a call, without its keyword-taking ``__new__``
_NOTHING_READ = RequestFields(None, None)


def request_fields(body: bytes | None) -> RequestFields:
    """The model and stream flag of a JSON request body (never raises).

    Only those two fields are decoded: a long conversation's messages are skipped in C, not built as Python objects
    (msgspec; several times faster than the standard library's decoder on chat requests). JSON msgspec is stricter
    about than the standard library (a lone surrogate escape, a number beyond a float) is read the standard library's
    way.
    """
    if not body or body[:1] != b"{" or len(body) > BODY_CAP_BYTES:
        return _NOTHING_READ
    try:
        found = _FIELDS_DECODER.decode(body)
        model, stream = found.model, found.stream
    except msgspec.MsgspecError:
        request = parse_request_body(body)
        if not request:
            return _NOTHING_READ
        model, stream = request.get("model"), request.get("stream")
    except (ValueError, RecursionError):  # not UTF-8; nested deeper than the interpreter's limit
        return _NOTHING_READ
    return _new_tuple(
        RequestFields,
        (clean_label(model) if type(model) is str else None, stream if type(stream) is bool else bool(stream)),
    )


def requested_model(request: dict[str, Any]) -> str | None:
    """The request's ``model``, cleaned like a header string (trimmed, no control characters, encodable, capped)."""
    model = request.get("model")
    return clean_string(model) if isinstance(model, str) else None


def error_type_for(status_code: int | None, error_code: str | None) -> str | None:
    """``error.type``: None on success, ``insufficient_balance`` for a 402, else the HTTP status."""
    if status_code is None or status_code < 400:
        return None
    if status_code == 402 or error_code == "insufficient_balance":
        return "insufficient_balance"
    return str(status_code)


SECRET_QUERY_PARAMETERS = frozenset(
    {
        "key",
        "api-key",
        "api_key",
        "apikey",
        "x-api-key",
        "access_token",
        "token",
        "auth",
        "authorization",
        "password",
        "secret",
        "client_secret",
        "sig",
        "signature",
        "x-goog-signature",
        "awsaccesskeyid",
        "x-amz-signature",
        "x-amz-credential",
        "x-amz-security-token",
    }
)
"""Query parameters whose value is a credential (Gemini's ``?key=``, Azure's ``?api-key=``, signed URLs): their values
are replaced by ``REDACTED`` on spans, as the semantic conventions ask for ``url.full``."""


def redact_url(url: str) -> str:
    """``url`` with user:password and credential query values replaced by ``REDACTED`` (never raises)."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            netloc = "REDACTED:REDACTED@" + netloc.rpartition("@")[2]
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            if any(name.lower() in SECRET_QUERY_PARAMETERS for name, _ in pairs):
                query = urlencode(
                    [(name, "REDACTED" if name.lower() in SECRET_QUERY_PARAMETERS else value) for name, value in pairs]
                )
        if netloc == parts.netloc and query == parts.query:
            return url
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return url
