"""Pure decoding of what a response body says: usage, the stream's final energy figure, the error code.

No OpenTelemetry, no threads, no I/O: bytes in, :class:`BodyFacts` out. Every value is validated as it
is read (token counts that fit a BIGINT, figures under the ceilings of :mod:`joule_otel._headers`), so
nothing a server sends can make a ledger row unwritable.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgspec

from joule_otel._headers import parse_carbon, parse_energy, parse_token_count

WHOLE_BODY_BYTES = 32 << 10
"""A JSON body up to this size is decoded whole for its top-level ``usage`` or ``error`` (only those fields, in C);
a larger one (embeddings of many inputs) is searched from its end, where ``usage`` comes, and only that object
decoded."""
DECODED_CAP = 16 << 20
"""A compressed body is inflated to at most this many bytes."""
SSE_TAIL_BYTES = 64 << 10
"""Only the last events of a stream carry usage and the final figures: only this much of its end is read."""
_JSON_DECODER = json.JSONDecoder()
_COLON_BRACE = re.compile(rb"\s*:\s*\{")


class _TopLevel(msgspec.Struct):
    usage: Any = None
    error: Any = None


_TOP_LEVEL_DECODER = msgspec.json.Decoder(_TopLevel)


class _Usage(msgspec.Struct):
    prompt_tokens: Any = msgspec.UNSET
    completion_tokens: Any = msgspec.UNSET
    input_tokens: Any = msgspec.UNSET
    output_tokens: Any = msgspec.UNSET


class _Answer(msgspec.Struct):
    usage: _Usage | None = None


_ANSWER_DECODER = msgspec.json.Decoder(_Answer)
"""A successful JSON body's token counts, decoded in C without building ``usage``'s other members (the details)."""


def top_level_object(data: bytes, key: bytes) -> Any:
    """The ``usage`` or ``error`` of a JSON body (``key`` quoted, as :func:`object_after` takes it).

    Small bodies are decoded for the top-level field only, in C; when it is not there (or the JSON is some the fast
    decoder refuses), and for large bodies, the last such object anywhere is found with :func:`object_after`.
    """
    if len(data) <= WHOLE_BODY_BYTES:
        try:
            found = _TOP_LEVEL_DECODER.decode(data)
        except (msgspec.MsgspecError, ValueError, RecursionError):
            pass
        else:
            value = found.usage if key == b'"usage"' else found.error
            if value is not None:
                return value
    return object_after(data, key)


@dataclass
class BodyFacts:
    """What the response body said; ``None`` is missing or invalid."""

    input_tokens: int | None = None
    output_tokens: int | None = None
    stream_energy_j: float | None = None
    stream_carbon_mg: float | None = None
    error_code: str | None = None


def decode(data: bytes, content_encoding: str) -> bytes:
    """``data`` decoded per its ``Content-Encoding`` (gzip, deflate, br, zstd), or ``b""`` if it cannot be."""
    encoding = content_encoding.strip().lower()
    if not data or encoding in ("", "identity"):
        return data
    if encoding in ("gzip", "x-gzip", "deflate"):
        wbits = 47 if encoding != "deflate" else 15
        for bits in (wbits, -15):
            try:
                return zlib.decompressobj(bits).decompress(data, DECODED_CAP)
            except zlib.error:
                continue
        return b""
    if encoding == "br":
        try:
            import brotli

            return bytes(brotli.decompress(data))[:DECODED_CAP]
        except Exception:
            return b""
    if encoding == "zstd":
        try:
            import zstandard

            return bytes(zstandard.ZstdDecompressor().decompressobj().decompress(data))[:DECODED_CAP]
        except Exception:
            return b""
    return b""


def usage_tokens(usage: Any) -> tuple[int | None, int | None]:
    """Input and output tokens of an OpenAI ``usage`` object (Chat Completions or Responses shape)."""
    if not isinstance(usage, dict):
        return None, None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens"))
    return parse_token_count(prompt), parse_token_count(completion)


def _joule_extension(joule: Any, facts: BodyFacts) -> None:
    if isinstance(joule, dict):
        facts.stream_energy_j = parse_energy(joule.get("energy_joules"))
        facts.stream_carbon_mg = parse_carbon(joule.get("carbon_mg"))


def object_after(data: bytes, key: bytes) -> Any:
    """The JSON object under the last ``key`` (a quoted name) in ``data``, decoded alone, or None.

    Only that object is decoded, not the event or body around it. The same quoted word can also be a string value
    (``"role": "usage"``); only a key is followed by a colon.
    """
    end = len(data)
    for _ in range(4):
        at = data.rfind(key, 0, end)
        if at < 0:
            return None
        found = _COLON_BRACE.match(data, at + len(key))
        if found is not None:
            try:
                return _JSON_DECODER.raw_decode(data[found.end() - 1 :].decode("utf-8", "replace"))[0]
            except (ValueError, RecursionError):
                return None
        end = at
    return None


def data_lines_backwards(data: bytes) -> Iterator[bytes]:
    """What follows ``data:`` on each line of an SSE body, last line first, within its last :data:`SSE_TAIL_BYTES`.

    Found with ``rfind`` rather than by splitting the body: a stream of a few hundred chunks has as many lines, and
    only the last few are read. A JSON payload cannot hold a raw newline, so a newline and ``data:`` start a line.
    """
    floor = max(len(data) - SSE_TAIL_BYTES, 0)
    end = len(data)
    while end > floor:
        newline = data.rfind(b"\ndata:", floor, end)
        if newline >= 0:
            start = newline + 1
        elif floor == 0 and data.startswith(b"data:"):  # the body's first line
            start = 0
        else:
            return
        line_end = data.find(b"\n", start, end)
        yield data[start + 5 : line_end if line_end >= 0 else end]
        end = newline if newline >= 0 else 0


def parse_body(data: bytes, *, is_sse: bool, status_code: int | None, content_encoding: str = "") -> BodyFacts:
    """Usage, the stream's final energy figure and the error code, from a response body's bytes as received."""
    if content_encoding:
        data = decode(data, content_encoding)
    facts = BodyFacts()
    if not data:
        return facts
    if not is_sse and (status_code is None or status_code < 400) and len(data) <= WHOLE_BODY_BYTES:
        # the usual answer, read in one C call; anything unusual (usage not an object, say) takes the path below
        try:
            usage = _ANSWER_DECODER.decode(data).usage
        except (msgspec.MsgspecError, ValueError, RecursionError):
            usage = None
        if usage is not None:
            prompt, completion = usage.prompt_tokens, usage.completion_tokens
            facts.input_tokens = parse_token_count(usage.input_tokens if prompt is msgspec.UNSET else prompt)
            facts.output_tokens = parse_token_count(usage.output_tokens if completion is msgspec.UNSET else completion)
            return facts
    if is_sse:
        seen = 0
        # the figures come in the last events: walk back from the end, parse only events that carry them
        for line in data_lines_backwards(data):
            if b"[DONE]" in line:
                continue
            seen += 1
            if seen > 8 or (facts.input_tokens is not None and facts.stream_energy_j is not None):
                break
            if facts.input_tokens is None and facts.output_tokens is None and b'"usage"' in line:
                facts.input_tokens, facts.output_tokens = usage_tokens(object_after(line, b'"usage"'))
            if facts.stream_energy_j is None and b'"joule"' in line:
                _joule_extension(object_after(line, b'"joule"'), facts)
        return facts
    if status_code is not None and status_code >= 400:
        error = top_level_object(data, b'"error"')
        if isinstance(error, dict):
            code = error.get("code") or error.get("type")
            if isinstance(code, str) and code.strip():
                facts.error_code = code.strip()[:64]
        return facts
    facts.input_tokens, facts.output_tokens = usage_tokens(top_level_object(data, b'"usage"'))
    return facts
