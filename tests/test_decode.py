"""Body decoding on the background thread: the fast paths (msgspec) read exactly what the standard library would."""

from __future__ import annotations

import gzip
import json
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from joule_otel._decode import WHOLE_BODY_BYTES, parse_body, top_level_object
from joule_otel._genai import BODY_CAP_BYTES, RequestFields, request_fields
from joule_otel._headers import clean_string

JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(["model", "stream", "x"]), inner),
    max_leaves=12,
)
"""JSON values, with ``model`` and ``stream`` keys nested inside too (only the top-level ones count)."""


def reference_fields(body: bytes) -> RequestFields:
    """What the request's model and stream flag are, read with the standard library's decoder."""
    if not body or body[:1] != b"{" or len(body) > BODY_CAP_BYTES:
        return RequestFields(None, None)
    try:
        parsed = json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError):
        return RequestFields(None, None)
    if not isinstance(parsed, dict):
        return RequestFields(None, None)
    model, stream = parsed.get("model"), parsed.get("stream")
    return RequestFields(
        clean_string(model) if isinstance(model, str) else None,
        stream if isinstance(stream, bool) else bool(stream),
    )


@given(st.dictionaries(st.sampled_from(["model", "stream", "messages", "max_tokens"]), JSON_VALUES))
def test_request_fields_read_what_the_standard_library_reads(request: dict[str, Any]) -> None:
    body = json.dumps(request).encode()
    assert request_fields(body) == reference_fields(body)


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "\\ud800gpt", "stream": true}',  # a lone surrogate escape: msgspec refuses it, json reads it
        b'{"model": 1e999, "stream": 1}',  # a number beyond a float: json reads inf
        b'{"model": NaN}',
        b'{"model": "a", "model": "b"}',  # the last of duplicate keys, as json
        b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b', "model": "m"}',  # deeper than the interpreter's limit
        b'{"model": "caf\xc3\xa9 \xff"}',  # not UTF-8
        b'["model", "auto"]',
        b'  {"model": "auto"}',
        b'{"model": "auto"} trailing',
        b'{"model": "auto",}',
        b"",
        b"{}",
        b'{"model": "  auto\\n\\u0000 ", "stream": "yes"}',
    ],
)
def test_request_fields_of_odd_bodies(body: bytes) -> None:
    assert request_fields(body) == reference_fields(body)


def test_request_fields_skip_a_long_conversation() -> None:
    messages = [{"role": "user", "content": "word " * 2000}] * 50
    body = json.dumps({"messages": messages, "model": "auto", "stream": True}).encode()
    assert request_fields(body) == RequestFields("auto", True)
    assert request_fields(b'{"model": "auto", "x": "' + b"a" * BODY_CAP_BYTES + b'"}') == RequestFields(None, None)


USAGES = st.fixed_dictionaries(
    {"prompt_tokens": st.integers(0, 10**6), "completion_tokens": st.integers(0, 10**6)},
)


@given(
    usage=USAGES,
    nested=st.none() | USAGES,
    padding=st.integers(0, 3 * WHOLE_BODY_BYTES // 2),
    encoding=st.sampled_from(["", "gzip"]),
)
@example(usage={"prompt_tokens": 1, "completion_tokens": 2}, nested=None, padding=WHOLE_BODY_BYTES, encoding="")
def test_usage_is_the_top_level_one_small_body_or_large(
    usage: dict[str, int], nested: dict[str, int] | None, padding: int, encoding: str
) -> None:
    """A chat completion's usage, whatever its size (decoded whole, or searched from its end past the limit)."""
    choice: dict[str, Any] = {"message": {"content": "x" * padding, "role": "assistant"}}
    if nested is not None:
        choice["usage"] = nested  # an object named usage inside the body is not the call's
    body = json.dumps({"id": "c", "choices": [choice], "usage": usage}).encode()
    data = gzip.compress(body) if encoding else body
    facts = parse_body(data, is_sse=False, status_code=200, content_encoding=encoding)
    assert (facts.input_tokens, facts.output_tokens) == (usage["prompt_tokens"], usage["completion_tokens"])


TOKEN_VALUES = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5) | st.lists(st.integers())


@given(
    st.dictionaries(
        st.sampled_from(["prompt_tokens", "completion_tokens", "input_tokens", "output_tokens", "x"]), TOKEN_VALUES
    )
    | TOKEN_VALUES
)
@example({"prompt_tokens": None, "input_tokens": 5, "completion_tokens": 1 << 63, "output_tokens": 2})
@example({"prompt_tokens": True, "completion_tokens": 2.0})
def test_usage_tokens_read_what_the_standard_library_reads(usage: Any) -> None:
    """Whatever ``usage`` holds, the token counts are what the standard library's reading gives, or missing."""
    body = json.dumps({"id": "c", "usage": usage, "choices": []}).encode()
    facts = parse_body(body, is_sse=False, status_code=200)
    expected: tuple[int | None, int | None] = (None, None)
    if isinstance(usage, dict):
        expected = tuple(  # type: ignore[assignment]
            value if type(value) is int and 0 <= value < 1 << 63 else None
            for value in (
                usage.get("prompt_tokens", usage.get("input_tokens")),
                usage.get("completion_tokens", usage.get("output_tokens")),
            )
        )
    assert (facts.input_tokens, facts.output_tokens) == expected


def test_usage_found_below_the_top_level_when_it_is_only_there() -> None:
    body = json.dumps({"response": {"usage": {"input_tokens": 3, "output_tokens": 4}}}).encode()
    assert top_level_object(body, b'"usage"') == {"input_tokens": 3, "output_tokens": 4}
    facts = parse_body(body, is_sse=False, status_code=200)
    assert (facts.input_tokens, facts.output_tokens) == (3, 4)


@pytest.mark.parametrize(
    "body",
    [b'{"error": {"code": "insufficient_balance"}}', b'{"error": {"type": "insufficient_balance"}, "x": NaN}'],
)
def test_error_code_of_small_bodies_fast_or_not(body: bytes) -> None:
    assert parse_body(body, is_sse=False, status_code=402).error_code == "insufficient_balance"
