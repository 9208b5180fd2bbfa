"""One odd response never stops the ledger, and figures no call could have are missing, never 0.

Every test here drives real parts: the simulator or a scripted HTTP server on loopback, a real DuckDB file, real
child processes.
"""

from __future__ import annotations

import json
import logging

import duckdb
import httpx
import openai
import pytest
from support import HI, ROW, Scripted, completion, ledger_rows

import joule_otel
from joule_otel.ledger._row import problem
from joule_otel.ledger._writer import LedgerWriter

# -- one odd response never stops the ledger ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("usage", "model", "expected_tokens"),
    [
        ({"prompt_tokens": 2**70, "completion_tokens": 5}, "m", (None, 5)),  # beyond BIGINT
        ({"prompt_tokens": True, "completion_tokens": False}, "m", (None, None)),  # JSON booleans
        ({"prompt_tokens": 1.5, "completion_tokens": "7"}, "m", (None, None)),
        ({"prompt_tokens": -3, "completion_tokens": 9}, "m", (None, 9)),
    ],
)
def test_odd_usage_is_missing_and_the_rows_around_it_land(scripted, ledger_path, usage, model, expected_tokens):
    joule_otel.instrument(db=ledger_path, flush_interval=0.1)
    try:
        client = openai.OpenAI(base_url=scripted, api_key="k", max_retries=0)
        Scripted.headers_to_send = {"X-Energy-Joules": "3", "X-Receipt-Id": "rcpt_before"}
        client.chat.completions.create(model="auto", messages=HI)
        Scripted.headers_to_send = {"X-Energy-Joules": "4", "X-Receipt-Id": "rcpt_odd"}
        Scripted.body = completion(usage)
        client.chat.completions.with_raw_response.create(model=model, messages=HI)
        Scripted.headers_to_send = {"X-Energy-Joules": "5", "X-Receipt-Id": "rcpt_after"}
        Scripted.body = completion()
        client.chat.completions.create(model="auto", messages=HI)
        assert joule_otel.flush(timeout_s=20) is True
        stats = joule_otel.stats()
    finally:
        joule_otel.uninstrument()
    rows = {r["receipt_id"]: r for r in ledger_rows(ledger_path)}
    assert set(rows) == {"rcpt_before", "rcpt_odd", "rcpt_after"}
    assert (rows["rcpt_odd"]["input_tokens"], rows["rcpt_odd"]["output_tokens"]) == expected_tokens
    assert rows["rcpt_after"]["energy_j"] == 5
    assert stats["capture_errors"] == 0 and stats["rows_invalid"] == 0


def test_a_lone_surrogate_in_the_request_model_is_written_cleaned(scripted, ledger_path):
    Scripted.headers_to_send = {"X-Energy-Joules": "2", "X-Receipt-Id": "rcpt_surrogate"}
    joule_otel.instrument(db=ledger_path, flush_interval=0.1)
    try:
        # the JSON escape reaches the parser as a lone surrogate, which UTF-8 storage cannot hold
        httpx.post(f"{scripted}/chat/completions", content=b'{"model": "llama\\ud800-70b", "messages": []}')
        Scripted.headers_to_send = {"X-Energy-Joules": "3", "X-Receipt-Id": "rcpt_next"}
        httpx.post(f"{scripted}/chat/completions", json={"model": "auto", "messages": []})
        assert joule_otel.flush(timeout_s=20) is True
    finally:
        joule_otel.uninstrument()
    rows = {r["receipt_id"]: r for r in ledger_rows(ledger_path)}
    assert set(rows) == {"rcpt_surrogate", "rcpt_next"}
    model = rows["rcpt_surrogate"]["requested_model"]
    assert model.startswith("llama") and model.endswith("-70b")
    # and the file itself holds it, after compaction at exit
    with duckdb.connect(str(ledger_path), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM inference_calls").fetchone()[0] == 2


def test_a_row_no_column_can_hold_is_dropped_counted_and_the_rest_are_written(ledger_path, caplog):
    good = ROW._replace(receipt_id="rcpt_good")
    bad_tokens = good._replace(receipt_id="rcpt_bad", input_tokens=2**70)
    bad_text = good._replace(receipt_id="rcpt_bad_text", workload="w\ud800")
    bad_bool = good._replace(receipt_id="rcpt_bool", output_tokens=True)
    assert problem(good) is None
    assert "BIGINT" in (problem(bad_tokens) or "")
    assert "UTF-8" in (problem(bad_text) or "")
    assert problem(bad_bool) is not None
    writer = LedgerWriter(ledger_path)
    writer.append([good, bad_tokens, good._replace(receipt_id="rcpt_good2"), bad_text, bad_bool])
    with caplog.at_level(logging.ERROR, logger="joule_otel"):
        assert writer.write_segment() is True
        writer.append([good._replace(receipt_id="rcpt_good3"), bad_tokens._replace(receipt_id="rcpt_bad2")])
        assert writer.write_segment() is True
    assert writer.stats.rows_invalid == 4
    assert writer.stats.pending_rows == 0
    assert sorted(r["receipt_id"] for r in ledger_rows(ledger_path)) == ["rcpt_good", "rcpt_good2", "rcpt_good3"]
    dropped = [r for r in caplog.records if "could not be written and was dropped" in r.getMessage()]
    assert len(dropped) == 3  # once per kind of problem (tokens, text, bool), not once per row


# -- implausible figures -----------------------------------------------------------------------------------------


def test_a_figure_no_call_could_cost_is_missing_and_counted(scripted, ledger_path):
    huge = "1" * 300  # finite: 1.1e299 J
    Scripted.headers_to_send = {"X-Energy-Joules": huge, "X-Carbon-mg": huge, "X-Receipt-Id": "rcpt_huge"}
    joule_otel.instrument(db=ledger_path, flush_interval=0.1)
    try:
        openai.OpenAI(base_url=scripted, api_key="k", max_retries=0).chat.completions.create(model="auto", messages=HI)
        assert joule_otel.flush(timeout_s=20)
        stats = joule_otel.stats()
    finally:
        joule_otel.uninstrument()
    [row] = ledger_rows(ledger_path)
    assert row["energy_j"] is None and row["carbon_mg"] is None
    assert stats["invalid_headers"] == 2


def test_a_stream_final_event_beyond_the_ceiling_is_missing(scripted, ledger_path):
    events = [
        {
            "id": "c",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "m",
            "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}],
        },
        {
            "id": "c",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "m",
            "choices": [],
            "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
            "joule": {"energy_joules": 1e300, "carbon_mg": True},
        },
    ]
    Scripted.content_type = "text/event-stream"
    Scripted.body = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    Scripted.headers_to_send = {"X-Energy-Joules": "12", "X-Carbon-mg": "1", "X-Receipt-Id": "rcpt_stream"}
    joule_otel.instrument(db=ledger_path, flush_interval=0.1)
    try:
        stream = openai.OpenAI(base_url=scripted, api_key="k", max_retries=0).chat.completions.create(
            model="auto", messages=HI, stream=True
        )
        assert [c.choices[0].delta.content for c in stream if c.choices] == ["hi"]
        assert joule_otel.flush(timeout_s=20)
    finally:
        joule_otel.uninstrument()
    [row] = ledger_rows(ledger_path)
    # the final event's figure is implausible, so the header's stands; the tokens are fine
    assert (row["energy_j"], row["carbon_mg"]) == (12.0, 1.0)
    assert (row["input_tokens"], row["output_tokens"]) == (3, 4)
