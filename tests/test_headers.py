"""Header parsing: invalid values are missing (never 0, never an exception)."""

from __future__ import annotations

import math

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from joule_otel._headers import (
    MAX_CARBON_MG,
    MAX_ENERGY_J,
    MAX_STRING,
    MAX_TOKENS,
    SCANNED,
    clean_receipt,
    clean_string,
    header_map,
    header_value,
    parse_carbon,
    parse_energy,
    parse_quantity,
    parse_token_count,
    read_energy,
    read_energy_map,
    read_response,
    scan_headers,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("12.5", 12.5),
        (" 1.25e1 ", 12.5),
        ("0", 0.0),
        ("-0", 0.0),
        ("\t7\n", 7.0),
        (b"3.5", 3.5),
        ("abc", None),
        ("NaN", None),
        ("nan", None),
        ("inf", None),
        ("-inf", None),
        ("-5", None),
        ("1e400", None),
        ("", None),
        ("  ", None),
        (None, None),
        ("0x10", None),
        ("1,5", None),
        # what float() takes but a decimal in HTTP never is
        ("1_000", None),
        ("１２", None),  # fullwidth digits
        ("١٢", None),  # Arabic-Indic digits
        ("infinity", None),
        ("\u20037", None),  # a non-ASCII space
        (b"1_0", None),
        (".5", 0.5),
        ("+4", 4.0),
    ],
)
def test_parse_quantity(raw, expected):
    assert parse_quantity(raw) == expected


@given(st.text())
def test_parse_quantity_never_raises_and_is_finite_nonnegative_or_none(raw):
    value = parse_quantity(raw)
    assert value is None or (math.isfinite(value) and value >= 0)


@given(st.floats(min_value=0, max_value=MAX_ENERGY_J, allow_nan=False))
def test_any_valid_float_round_trips(value):
    assert parse_quantity(repr(value)) == value


@given(st.floats(min_value=MAX_ENERGY_J, exclude_min=True))
def test_figures_beyond_the_ceiling_are_missing_like_abc(value):
    assert parse_energy(repr(value)) is None
    assert parse_energy(value) is None


@pytest.mark.parametrize(
    ("raw", "energy", "carbon"),
    [
        ("1" * 300, None, None),  # finite: 1.1e299, and no call costs that
        ("1e7", 1e7, 1e7),
        ("10000000.5", None, None),
        ("2e7", None, None),
        (True, None, None),  # a JSON boolean in a stream's final event
        (12, 12.0, 12.0),
        ("12", 12.0, 12.0),
    ],
)
def test_energy_and_carbon_ceilings(raw, energy, carbon):
    assert MAX_CARBON_MG >= MAX_ENERGY_J * 1.5 / 3.6  # the worst grid (1.5 kg/kWh) at the energy ceiling
    assert parse_energy(raw) == energy
    assert parse_carbon(raw) == carbon


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (0, 0),
        (7, 7),
        (MAX_TOKENS, MAX_TOKENS),
        (MAX_TOKENS + 1, None),
        (10**30, None),
        (-1, None),
        (True, None),
        (False, None),
        (2.0, None),
        ("2", None),
        (None, None),
        ([1], None),
    ],
)
def test_token_counts_are_integers_that_fit_a_bigint(raw, expected):
    assert parse_token_count(raw) == expected


def test_lone_surrogates_are_made_writable():
    cleaned = clean_string("llama\ud800-70b")
    assert cleaned is not None
    cleaned.encode("utf-8")  # would raise on a lone surrogate
    assert cleaned.startswith("llama") and cleaned.endswith("-70b")


@given(st.text())
def test_clean_string_is_always_encodable(raw):
    value = clean_string(raw)
    assert value is None or value.encode("utf-8")


@given(st.binary())
def test_clean_string_never_raises_and_strips_control_characters(raw):
    value = clean_string(raw)
    assert value is None or (0 < len(value) <= MAX_STRING and not any(ord(c) < 32 for c in value))


@given(
    energy=st.one_of(st.none(), st.text(max_size=30), st.floats().map(repr)),
    carbon=st.one_of(st.none(), st.text(max_size=30)),
    routed=st.one_of(st.none(), st.text(max_size=400)),
)
def test_read_energy_is_total_over_garbage(energy, carbon, routed):
    headers = {}
    for name, value in (("X-Energy-Joules", energy), ("X-Carbon-mg", carbon), ("X-Routed-To", routed)):
        if value is not None and value.isprintable() and value.isascii():
            headers[name] = value
    reading = read_energy(httpx.Headers(headers).get)
    for number in (reading.energy_j, reading.carbon_mg):
        assert number is None or (math.isfinite(number) and number >= 0)
    invalid = {"x-energy-joules": reading.energy_j, "x-carbon-mg": reading.carbon_mg}
    for name in reading.invalid:
        assert invalid[name] is None


def test_read_energy_case_insensitive_and_region_fallback():
    headers = httpx.Headers({"x-ENERGY-joules": "1.5E2", "X-TIER": " Batch ", "x-receipt-id": "r1\x00\x1b"})
    reading = read_energy(headers.get, request_region="EU-FI")
    assert reading.energy_j == 150.0
    assert reading.tier == "batch"
    assert reading.region == "eu-fi"
    assert reading.receipt_id is None, "a receipt with control characters is refused, never cleaned into r1"
    assert "x-receipt-id" in reading.invalid
    assert read_energy(httpx.Headers({"x-receipt-id": " r1 "}).get).receipt_id == "r1"
    assert read_energy(httpx.Headers({"x-region": "ap-in"}).get, "eu-fi").region == "ap-in"
    assert read_energy(httpx.Headers({"x-routed-to": "m" * 1000}).get).routed_to == "m" * MAX_STRING


class RawOnly:
    """Headers that show only the public ``raw`` list (not httpx's internal layout)."""

    def __init__(self, headers: httpx.Headers) -> None:
        self.raw = headers.raw


@given(
    st.lists(
        st.tuples(
            st.sampled_from(
                ["X-Energy-Joules", "x-tier", "X-REGION", "Content-Type", "x-receipt-id", "OpenAI-Version", "x-other"]
            ),
            st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=20),
        ),
        max_size=8,
    )
)
def test_header_map_and_value_agree_with_httpx_whatever_the_layout(pairs):
    headers = httpx.Headers(pairs)
    for view in (headers, RawOnly(headers)):
        mapped = header_map(view)
        for name, _ in pairs:
            key = name.lower().encode()
            last = [value for n, value in pairs if n.lower() == name.lower()][-1]
            assert mapped[key] == last.encode()  # the last one sent, as a dict keeps it
            assert header_value(view, key) == last.encode()
        assert read_energy_map(mapped) == read_energy(lambda name, m=mapped: m.get(name.encode()))
        # the single pass capture makes finds what the map holds, and reads the same
        assert scan_headers(view) == [mapped.get(name) for name in SCANNED]
        assert read_response(view, None) == (read_energy_map(mapped), scan_headers(view))
    assert header_map(None) == {} and header_value(None, b"x-region") is None
    assert scan_headers(None) == [None] * len(SCANNED)


@given(
    st.lists(
        st.one_of(st.binary(max_size=300), st.sampled_from([b"rcpt_01", b" Eu-Fi ", b"\x7fx", b"a" * 300])), max_size=6
    )
)
def test_string_headers_read_as_clean_string_says_every_time(values):
    # labels (model, tier, region) are remembered: they must say what clean_string says every time; a receipt is
    # what was received, or nothing
    for raw in values + values:
        reading = read_energy_map({b"x-receipt-id": raw, b"x-routed-to": raw, b"x-tier": raw, b"x-region": raw})
        cleaned = clean_string(raw)
        assert reading.receipt_id is None or reading.receipt_id == raw.decode().strip(" \t")
        assert reading.routed_to == cleaned
        assert reading.tier == reading.region == (cleaned.lower() if cleaned else None)


def test_the_requests_region_stands_when_the_response_does_not_say():
    request = httpx.Headers({"X-Region": " EU-FI "})
    unsaid = httpx.Headers({"x-energy-joules": "2.5"})
    said = httpx.Headers({"x-energy-joules": "2.5", "X-Region": "us-west"})
    assert read_response(unsaid, request)[0].region == "eu-fi"
    assert read_response(said, request)[0].region == "us-west"
    assert read_response(unsaid, None)[0].region is None


@pytest.mark.parametrize(
    ("one", "other"),
    [("r" * 300, "r" * 256 + "X"), ("a\x00b", "ab"), ("rcpt\n1", "rcpt1"), (b"r\xff1", b"r\xfe1"), ("r\u200b1", "r1")],
)
def test_distinct_receipts_never_merge_into_one_id(one, other):
    """Receipts are the ledger's dedupe key: an id is kept as received or refused whole, never cleaned into
    another id (which would drop a billed call as a duplicate)."""
    first, second = clean_receipt(one), clean_receipt(other)
    assert first is None or second is None or first != second
    for raw in (one, other):
        found = clean_receipt(raw)
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        assert found is None or found == text


@given(st.text(max_size=300), st.text(max_size=300))
def test_receipts_that_differ_stay_apart(one, other):
    if one.strip(" \t") != other.strip(" \t"):
        first, second = clean_receipt(one), clean_receipt(other)
        assert first is None or first != second
