"""Capture: every Joule call through httpx/httpx2 lands on spans, metrics and the ledger, exactly once."""

from __future__ import annotations

import asyncio
import gc
import gzip
import inspect
import json
import pickle
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry import baggage, context
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

import joule_otel
from joule_otel._capture import BODY_CAP_BYTES

HI = [{"role": "user", "content": "hi"}]
SECRET = "jc_live_SECRET_KEY_123"


def rows(db) -> list[dict]:
    assert joule_otel.flush(timeout_s=20)
    frame = joule_otel.read_ledger(db)
    return [{k: (None if v is None or v != v else v) for k, v in r.items()} for r in frame.to_dict("records")]


def by_receipt(db) -> dict[str, dict]:
    found = [r for r in rows(db) if r["receipt_id"]]
    receipts = [r["receipt_id"] for r in found]
    assert len(receipts) == len(set(receipts)), "a receipt landed twice"
    return {r["receipt_id"]: r for r in found}


def oai(sim, key: str = SECRET) -> openai.OpenAI:
    return openai.OpenAI(base_url=sim.base_url, api_key=key, max_retries=0)


def assert_matches_receipt(row: dict, receipt) -> None:
    assert row["energy_j"] == receipt.energy_j
    assert row["carbon_mg"] == receipt.carbon_mg
    assert row["routed_to"] == receipt.routed_to
    assert row["tier"] == receipt.tier
    assert row["region"] == receipt.region
    assert row["requested_model"] == receipt.requested_model
    assert row["status_code"] == 200
    assert row["error_type"] is None


def test_every_receipt_lands_once_with_exact_values(telemetry, joule_simulator):
    client = oai(joule_simulator)
    client.chat.completions.create(model="auto", messages=HI)
    client.chat.completions.create(model="llama-3.3-405b-instruct", messages=HI, extra_headers={"X-Region": "eu-fi"})
    for _ in client.chat.completions.create(
        model="auto", messages=HI, stream=True, stream_options={"include_usage": True}
    ):
        pass
    client.embeddings.create(model="auto", input=["a", "b"])

    async def async_calls() -> None:
        aclient = openai.AsyncOpenAI(base_url=joule_simulator.base_url, api_key=SECRET, max_retries=0)
        await asyncio.gather(*(aclient.chat.completions.create(model="auto", messages=HI) for _ in range(5)))
        stream = await aclient.chat.completions.create(model="auto", messages=HI, stream=True)
        async for _ in stream:
            pass

    asyncio.run(async_calls())
    ledger = by_receipt(telemetry.db)
    issued = {r.receipt_id: r for r in joule_simulator.receipts}
    assert set(ledger) == set(issued)
    for receipt_id, receipt in issued.items():
        row = ledger[receipt_id]
        assert_matches_receipt(row, receipt)
        assert row["operation"] == receipt.operation
        assert row["server_address"] == "127.0.0.1"
        assert row["stream"] == receipt.stream
        if receipt_id == joule_simulator.receipts[-1].receipt_id:  # the stream without include_usage
            assert row["input_tokens"] is row["output_tokens"] is None
        else:
            assert row["input_tokens"] == receipt.input_tokens
            assert row["output_tokens"] == (receipt.output_tokens if receipt.operation == "chat" else None)
        assert row["duration_ms"] > 0
        assert (row["ttft_ms"] is not None) == receipt.stream
        assert row["trace_id"] and len(row["trace_id"]) == 32 and len(row["span_id"]) == 16
    assert ledger[joule_simulator.receipts[1].receipt_id]["region"] == "eu-fi"


def test_span_attributes_on_the_http_client_span(telemetry, joule_simulator):
    with joule_otel.workload("spans"):
        oai(joule_simulator).chat.completions.create(model="auto", messages=HI)
    receipt = joule_simulator.receipts[-1]
    spans = [s for s in telemetry.spans.get_finished_spans() if s.attributes.get("joule.receipt_id")]
    assert len(spans) == 1
    attrs = spans[0].attributes
    assert attrs["gen_ai.provider.name"] == "joule_cloud"
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.request.model"] == "auto"
    assert attrs["gen_ai.response.model"] == receipt.routed_to
    assert attrs["joule.energy"] == receipt.energy_j
    assert attrs["joule.carbon"] == receipt.carbon_mg
    assert attrs["joule.tier"] == receipt.tier
    assert attrs["joule.region"] == receipt.region
    assert attrs["joule.workload"] == "spans"
    assert attrs["joule.energy.source"] == "header"
    assert "gen_ai.input.messages" not in attrs
    row = by_receipt(telemetry.db)[receipt.receipt_id]
    assert row["trace_id"] == format(spans[0].context.trace_id, "032x")
    assert row["span_id"] == format(spans[0].context.span_id, "016x")


def test_metric_sums_equal_ledger_sums_per_workload(telemetry, joule_simulator):
    client = oai(joule_simulator)
    for name, count in (("alpha", 4), ("beta", 3)):
        with joule_otel.workload(name):
            for _ in range(count):
                client.chat.completions.create(model="auto", messages=HI)
            for _ in client.chat.completions.create(model="auto", messages=HI, stream=True):
                pass
    ledger_sums: dict[str, float] = defaultdict(float)
    ledger_tokens: dict[str, int] = defaultdict(int)
    for row in rows(telemetry.db):
        ledger_sums[row["workload"]] += row["energy_j"]
        ledger_tokens[row["workload"]] += row["output_tokens"] or 0
    metric_sums: dict[str, float] = defaultdict(float)
    for point in telemetry.metric_points("joule.client.energy"):
        metric_sums[point.attributes["joule.workload"]] += point.value
    assert metric_sums == pytest.approx(dict(ledger_sums))
    histogram_counts: dict[str, int] = defaultdict(int)
    for point in telemetry.metric_points("joule.client.request.energy"):
        histogram_counts[point.attributes["joule.workload"]] += point.count
    assert histogram_counts == {"alpha": 5, "beta": 4}
    token_sums: dict[str, int] = defaultdict(int)
    for point in telemetry.metric_points("gen_ai.client.token.usage"):
        if point.attributes["gen_ai.token.type"] == "output":
            token_sums[point.attributes["joule.workload"]] += point.sum
    # the streams without include_usage carry no token counts, in the ledger or the metrics
    assert token_sums == dict(ledger_tokens)
    ttfc = telemetry.metric_points("gen_ai.client.operation.time_to_first_chunk")
    assert sum(p.count for p in ttfc) == 2
    units = telemetry.metric_units()
    assert units["joule.client.energy"] == "J"
    assert units["joule.client.carbon"] == "mg"
    assert units["gen_ai.client.operation.duration"] == "s"
    assert units["gen_ai.client.token.usage"] == "{token}"
    for point in telemetry.metric_points("joule.client.energy"):
        assert "joule.receipt_id" not in point.attributes
        assert set(point.attributes) <= {
            "joule.workload",
            "gen_ai.operation.name",
            "gen_ai.provider.name",
            "gen_ai.request.model",
            "gen_ai.response.model",
            "joule.tier",
            "joule.region",
            "error.type",
        }


def test_workload_resolution_nested_async_and_decorated(ledger_path, joule_simulator, monkeypatch):
    monkeypatch.setenv("OTEL_SERVICE_NAME", "checkout-svc")
    joule_otel.instrument(db=ledger_path, flush_interval=0.2, workload="default-wl")
    try:
        client = oai(joule_simulator)
        aclient = openai.AsyncOpenAI(base_url=joule_simulator.base_url, api_key=SECRET, max_retries=0)

        def call(tag: str) -> None:
            client.chat.completions.create(model="auto", messages=[{"role": "user", "content": tag}])

        @joule_otel.workload("decorated")
        def decorated() -> None:
            call("decorated")

        @joule_otel.workload("async-decorated")
        async def async_decorated() -> None:
            await aclient.chat.completions.create(model="auto", messages=[{"role": "user", "content": "ad"}])

        async def tagged(name: str) -> None:
            with joule_otel.workload(name):
                await asyncio.sleep(0.01)
                await aclient.chat.completions.create(model="auto", messages=[{"role": "user", "content": name}])

        async def main() -> None:
            await asyncio.gather(tagged("task-a"), tagged("task-b"), async_decorated())

        with joule_otel.workload("outer"):
            call("outer")
            with joule_otel.workload("inner"):
                call("inner")
            call("outer-again")
        decorated()
        asyncio.run(main())
        token = context.attach(baggage.set_baggage("joule.workload", "from-baggage"))
        try:
            call("baggage")
            # a call that never reached a server is a row too, and its baggage names its workload as well
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                closed = probe.getsockname()[1]
            unreachable = openai.OpenAI(base_url=f"http://127.0.0.1:{closed}/v1", api_key=SECRET, max_retries=0)
            with pytest.raises(openai.APIConnectionError):
                unreachable.chat.completions.create(model="auto", messages=[{"role": "user", "content": "x"}])
        finally:
            context.detach(token)
        call("default")
        assert {r["workload"] for r in rows(ledger_path) if r["error_type"] == "ConnectError"} == {"from-baggage"}
        found = {r["workload"] for r in rows(ledger_path)}
        assert found == {
            "outer",
            "inner",
            "decorated",
            "async-decorated",
            "task-a",
            "task-b",
            "from-baggage",
            "default-wl",
        }
        assert {r["service"] for r in rows(ledger_path)} == {"checkout-svc"}
    finally:
        joule_otel.uninstrument()
    with pytest.raises(ValueError):
        joule_otel.workload("")


def test_service_name_is_the_last_resort_workload(ledger_path, joule_simulator, monkeypatch):
    monkeypatch.setenv("OTEL_SERVICE_NAME", "svc-fallback")
    monkeypatch.delenv("JOULE_OTEL_WORKLOAD", raising=False)
    joule_otel.instrument(db=ledger_path, flush_interval=0.2)
    try:
        oai(joule_simulator).chat.completions.create(model="auto", messages=HI)
        assert [r["workload"] for r in rows(ledger_path)] == ["svc-fallback"]
    finally:
        joule_otel.uninstrument()


def test_streams_full_partial_closed_and_garbage_collected(ledger_only, joule_simulator):
    client = oai(joule_simulator)
    for _ in client.chat.completions.create(
        model="auto", messages=HI, stream=True, stream_options={"include_usage": True}
    ):
        pass
    full = joule_simulator.receipts[-1]
    stream = client.chat.completions.create(model="auto", messages=HI, stream=True, max_tokens=200)
    for _ in stream:
        break
    stream.close()
    closed = joule_simulator.receipts[-1]
    with client.chat.completions.create(model="auto", messages=HI, stream=True, max_tokens=200) as stream2:
        next(iter(stream2))
    context_managed = joule_simulator.receipts[-1]
    abandoned_stream = client.chat.completions.create(model="auto", messages=HI, stream=True, max_tokens=300)
    next(iter(abandoned_stream))
    abandoned = joule_simulator.receipts[-1]
    del abandoned_stream
    deadline = time.monotonic() + 10
    while True:  # a stream dropped unclosed is finished when it is collected (a cycle may take more than one pass)
        gc.collect()
        if not joule_otel.stats()["calls_in_flight"] or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    ledger = by_receipt(ledger_only)
    assert set(ledger) == {
        full.receipt_id,
        closed.receipt_id,
        context_managed.receipt_id,
        abandoned.receipt_id,
    }
    full_row = ledger[full.receipt_id]
    assert full_row["output_tokens"] == full.output_tokens
    assert full_row["energy_j"] == full.energy_j
    assert 0 < full_row["ttft_ms"] <= full_row["duration_ms"]
    for receipt in (closed, context_managed, abandoned):
        row = ledger[receipt.receipt_id]
        assert row["energy_j"] == receipt.energy_j  # from the header: the stream never reached its end
        assert row["output_tokens"] is None
        assert row["ttft_ms"] is not None
    assert full_row["trace_id"] is None  # no tracing configured: no spans, no ids
    assert joule_otel.stats()["calls_in_flight"] == 0


def test_gzip_bodies_give_usage_whether_httpx_or_the_app_reads_them(ledger_only, joule_simulator):
    # read whole, httpx decodes it and capture reads that; read as raw bytes, capture inflates what it kept
    url = f"{joule_simulator.base_url}/chat/completions"
    body = {"model": "auto", "messages": HI, "max_tokens": 30}
    headers = {"Authorization": f"Bearer {SECRET}", "Accept-Encoding": "gzip"}
    with httpx.Client(headers=headers) as client:
        whole = client.post(url, json=body)
        assert whole.headers["content-encoding"] == "gzip"
        with client.stream("POST", url, json=body) as streamed:
            raw = b"".join(streamed.iter_raw())
        assert raw[:2] == b"\x1f\x8b"  # the app saw the gzip bytes themselves
    ledger = by_receipt(ledger_only)
    assert set(ledger) == {r.receipt_id for r in joule_simulator.receipts}
    for receipt in joule_simulator.receipts:
        row = ledger[receipt.receipt_id]
        assert (row["input_tokens"], row["output_tokens"]) == (receipt.input_tokens, receipt.output_tokens)
        assert row["output_tokens"] > 0


def test_a_raw_stream_dropped_unclosed_still_lands(ledger_only, joule_simulator):
    url = f"{joule_simulator.base_url}/chat/completions"
    body = {"model": "auto", "messages": HI, "max_tokens": 200, "stream": True}
    with httpx.Client(headers={"Authorization": f"Bearer {SECRET}"}) as client:
        response = client.send(client.build_request("POST", url, json=body), stream=True)
        assert next(response.iter_raw())
        assert joule_otel.stats()["calls_in_flight"] == 1
        del response  # never closed: only the garbage collector sees it go
        gc.collect()
        assert joule_otel.stats()["calls_in_flight"] == 0
    (receipt,) = joule_simulator.receipts
    row = by_receipt(ledger_only)[receipt.receipt_id]
    assert row["energy_j"] == receipt.energy_j
    assert row["stream"] is True


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"])
@pytest.mark.parametrize("filler", [0, 3, 400])
def test_stream_usage_and_energy_are_read_from_the_last_events(newline, filler):
    from joule_otel._decode import parse_body

    def event(payload: dict) -> bytes:
        return b"data: " + json.dumps(payload).encode() + newline + newline

    chunk = {"choices": [{"delta": {"content": 'say "data: {\\"usage\\": 1}"'}}]}  # the model may write SSE
    body = b"".join(
        [event(chunk)] * filler
        + [
            event({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 11}}),
            event({"choices": [], "joule": {"energy_joules": 12.5, "carbon_mg": "0.25"}}),
            event({"choices": [{"delta": {"role": "usage"}}], "usage": None}),  # "usage" as a value, and null
            b"data: [DONE]" + newline + newline,
        ]
    )
    facts = parse_body(body, is_sse=True, status_code=200)
    assert (facts.input_tokens, facts.output_tokens) == (7, 11)
    assert (facts.stream_energy_j, facts.stream_carbon_mg) == (12.5, 0.25)
    no_figures = parse_body(event(chunk) * 3, is_sse=True, status_code=200)
    assert no_figures.input_tokens is None and no_figures.stream_energy_j is None
    whole = json.dumps({"usage": {"prompt_tokens": 1}, "x": [{"role": "usage"}], "usage ": 0}).encode()
    assert parse_body(whole, is_sse=False, status_code=200).input_tokens == 1


def test_waiting_calls_do_not_set_off_the_apps_garbage_collector(ledger_path, joule_simulator):
    # what a captured call holds until the background takes it must die young: held for a second it used to set
    # off a collection every dozen calls on the app's thread, and full collections of its whole heap
    client = oai(joule_simulator)

    def collections(calls: int) -> Counter:
        runs: Counter = Counter()

        def count(phase: str, info: dict) -> None:
            if phase == "start" and threading.current_thread() is threading.main_thread():
                runs[info["generation"]] += 1

        gc.collect()
        gc.callbacks.append(count)
        try:
            for _ in range(calls):
                client.chat.completions.create(model="auto", messages=HI, max_tokens=5)
        finally:
            gc.callbacks.remove(count)
        return runs

    calls, warm_up = 600, 100
    collections(warm_up)  # the client's first calls (imports, a connection pool) are the app's own start
    bare = collections(calls)
    joule_otel.instrument(db=ledger_path)
    try:
        collections(warm_up)  # and the background's start (pyarrow, its first segment), paid once
        assert joule_otel.flush(timeout_s=20)
        captured = collections(calls)
        assert joule_otel.flush(timeout_s=20)
        assert len(joule_otel.read_ledger(ledger_path)) == calls + warm_up
    finally:
        joule_otel.uninstrument()
    assert captured[0] <= bare[0] + calls // 40, (bare, captured)
    assert captured[2] == 0, (bare, captured)


def test_sampler_always_off_keeps_ledger_and_metrics(ledger_path, joule_simulator):
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider(sampler=ALWAYS_OFF)
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    joule_otel.instrument(
        db=ledger_path,
        flush_interval=0.2,
        tracer_provider=tracer_provider,
        meter_provider=MeterProvider(metric_readers=[reader]),
    )
    try:
        client = oai(joule_simulator)
        for _ in range(6):
            client.chat.completions.create(model="auto", messages=HI)
        ledger = by_receipt(ledger_path)
    finally:
        joule_otel.uninstrument()
    assert len(ledger) == 6
    assert exporter.get_finished_spans() == ()
    total = sum(
        p.value
        for rm in reader.get_metrics_data().resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == "joule.client.energy"
        for p in m.data.data_points
    )
    assert total == pytest.approx(sum(r.energy_j for r in joule_simulator.receipts))


@pytest.mark.parametrize("joule_first", [True, False])
def test_the_wrappers_keep_the_methods_shape_and_leave_no_trace(joule_first, ledger_path):
    """The wrappers are plain functions, inside any wrapt wrapper; every one is gone after uninstrument()."""
    import inspect

    import httpx2
    import wrapt
    from opentelemetry.instrumentation.httpx import HTTPX2ClientInstrumentor

    slots = [
        (module, cls, name)
        for module in (httpx, httpx2)
        for cls, name in (
            (module.HTTPTransport, "handle_request"),
            (module.AsyncHTTPTransport, "handle_async_request"),
            (module.Client, "_send_single_request"),
            (module.AsyncClient, "_send_single_request"),
        )
    ]
    originals = {(cls, name): cls.__dict__[name] for _, cls, name in slots}

    def innermost(cls: type, name: str) -> object:
        method = cls.__dict__[name]
        while isinstance(method, wrapt.FunctionWrapper):
            method = method.__wrapped__
        return method

    otel = HTTPX2ClientInstrumentor()
    if not joule_first:
        otel.instrument()
    joule_otel.instrument(db=ledger_path)
    if joule_first:
        otel.instrument()
    try:
        for _, cls, name in slots:
            patched = innermost(cls, name)
            assert patched is not originals[(cls, name)]
            assert patched.__name__ == name and patched.__wrapped__ is originals[(cls, name)]
            assert inspect.iscoroutinefunction(patched) == inspect.iscoroutinefunction(originals[(cls, name)])
    finally:
        joule_otel.uninstrument()
    try:
        for _, cls, name in slots:
            assert innermost(cls, name) is originals[(cls, name)]
    finally:
        otel.uninstrument()
    for _, cls, name in slots:
        assert cls.__dict__[name] is originals[(cls, name)]


@pytest.mark.parametrize("order", ["httpx-instrumented-first", "joule-first"])
def test_works_whichever_httpx_instrumentation_ran_first(order, ledger_path, joule_simulator):
    from opentelemetry.instrumentation.httpx import HTTPX2ClientInstrumentor, HTTPXClientInstrumentor

    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrumentors = [HTTPXClientInstrumentor(), HTTPX2ClientInstrumentor()]
    if order == "httpx-instrumented-first":
        for inst in instrumentors:
            inst.instrument(tracer_provider=tracer_provider)
        joule_otel.instrument(db=ledger_path, flush_interval=0.2, tracer_provider=tracer_provider)
    else:
        joule_otel.instrument(db=ledger_path, flush_interval=0.2)  # no tracing yet
        for inst in instrumentors:
            inst.instrument(tracer_provider=tracer_provider)
    try:
        oai(joule_simulator).chat.completions.create(model="auto", messages=HI)  # httpx2 (openai >= 3)
        httpx.post(
            joule_simulator.base_url + "/chat/completions",
            json={"model": "auto", "messages": HI},
            headers={"Authorization": f"Bearer {SECRET}"},
        )  # plain httpx
        ledger = by_receipt(ledger_path)
    finally:
        for inst in instrumentors:
            inst.uninstrument()
        joule_otel.uninstrument()
    assert set(ledger) == {r.receipt_id for r in joule_simulator.receipts}
    annotated = [s for s in exporter.get_finished_spans() if "joule.energy" in s.attributes]
    assert len(annotated) == 2
    for span in annotated:
        assert ledger[span.attributes["joule.receipt_id"]]["trace_id"] == format(span.context.trace_id, "032x")


def test_langchain_calls_are_captured(ledger_only, joule_simulator):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=joule_simulator.base_url, api_key=SECRET, model="auto", max_retries=0)
    with joule_otel.workload("lc"):
        llm.invoke("hello")
        "".join(c.content for c in llm.stream("stream"))
    ledger = by_receipt(ledger_only)
    assert set(ledger) == {r.receipt_id for r in joule_simulator.receipts}
    assert {r["workload"] for r in ledger.values()} == {"lc"}


def test_refused_and_failed_calls_are_rows_and_other_traffic_is_not(ledger_only, joule_simulator):
    joule_simulator.set_energy_budget("jc_tiny", 0.5)
    tiny = oai(joule_simulator, "jc_tiny")
    tiny.chat.completions.create(model="auto", messages=HI)
    with pytest.raises(openai.APIStatusError):
        tiny.chat.completions.create(model="auto", messages=HI)
    with pytest.raises(openai.NotFoundError):
        tiny.chat.completions.create(model="nope", messages=HI)
    httpx.get(joule_simulator.base_url.replace("/v1", "/healthz"))  # not inference: left alone
    with pytest.raises(openai.APIConnectionError):
        openai.OpenAI(base_url="http://127.0.0.1:9/v1", api_key=SECRET, max_retries=0).chat.completions.create(
            model="auto", messages=HI
        )
    found = rows(ledger_only)
    errors = sorted((r["status_code"] or 0, r["error_type"]) for r in found if r["error_type"])
    assert errors == [(0, "ConnectError"), (402, "insufficient_balance"), (404, "404")]
    assert len(found) == 4
    assert all(r["receipt_id"] is None for r in found if r["error_type"])


def test_secrets_and_content_never_reach_ledger_or_spans(telemetry, joule_simulator):
    oai(joule_simulator).chat.completions.create(model="auto", messages=[{"role": "user", "content": "PRIVATE-PROMPT"}])
    assert joule_otel.flush()
    spooled = b"".join(p.read_bytes() for p in telemetry.db.parent.rglob("*.parquet"))
    joule_otel.uninstrument()  # compacts into the DuckDB file
    blob = telemetry.db.read_bytes() + spooled
    assert b"rcpt_" in blob  # the rows are there; the secrets are not
    assert SECRET.encode() not in blob
    assert b"PRIVATE-PROMPT" not in blob
    for span in telemetry.spans.get_finished_spans():
        text = json.dumps(dict(span.attributes), default=str)
        assert SECRET not in text
        assert "PRIVATE-PROMPT" not in text


def test_content_capture_is_opt_in_and_spans_only(ledger_path, joule_simulator):
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    joule_otel.instrument(db=ledger_path, flush_interval=0.2, tracer_provider=tracer_provider, capture_content=True)
    try:
        oai(joule_simulator).chat.completions.create(model="auto", messages=[{"role": "user", "content": "OPT-IN"}])
        assert joule_otel.flush()
    finally:
        joule_otel.uninstrument()
    span = next(s for s in exporter.get_finished_spans() if "joule.energy" in s.attributes)
    assert "OPT-IN" in span.attributes["gen_ai.input.messages"]
    assert b"OPT-IN" not in ledger_path.read_bytes()


def test_instrument_validates_arguments_and_is_idempotent(ledger_path):
    with pytest.raises(ValueError):
        joule_otel.instrument(flush_interval=0)
    with pytest.raises(ValueError):
        joule_otel.instrument(prometheus_port=70000)
    with pytest.raises(ValueError):
        joule_otel.instrument(otlp_endpoint="not a url")
    joule_otel.instrument(db=ledger_path)
    joule_otel.instrument(db=ledger_path)
    try:
        assert joule_otel.stats()["instrumented"] is True
    finally:
        joule_otel.uninstrument()
    joule_otel.uninstrument()
    assert joule_otel.stats() == {"instrumented": False}


def test_invalid_env_is_warned_and_defaulted(monkeypatch, caplog, ledger_path):
    monkeypatch.setenv("JOULE_OTEL_FLUSH_INTERVAL", "soon")
    joule_otel.instrument(db=ledger_path)
    try:
        assert "JOULE_OTEL_FLUSH_INTERVAL" in caplog.text
    finally:
        joule_otel.uninstrument()


def test_capture_failures_never_reach_the_app(ledger_only, joule_simulator, monkeypatch):
    from joule_otel import _instrument

    state = _instrument._state

    def broken(call):
        raise RuntimeError("boom")

    monkeypatch.setattr(state.capture, "_begin", lambda *a: broken(None))
    out = oai(joule_simulator).chat.completions.create(model="auto", messages=HI)
    assert out.choices[0].message.content
    assert joule_otel.stats()["capture_errors"] == 1


class _ScriptedHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    headers_to_send: dict[str, str] = {}

    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = json.dumps(
            {
                "id": "x",
                "object": "chat.completion",
                "created": 0,
                "model": "m",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
            }
        ).encode()
        self.send_response(200)
        for name, value in type(self).headers_to_send.items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def scripted_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ScriptedHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


header_value = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=24).map(str.strip)


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(energy=header_value, carbon=header_value, tier=header_value)
def test_garbage_header_values_never_break_the_call(scripted_server, tmp_path_factory, energy, carbon, tier):
    from joule_otel._headers import parse_quantity

    _, base_url = scripted_server
    _ScriptedHandler.headers_to_send = {"X-Energy-Joules": energy, "X-Carbon-mg": carbon, "X-Tier": tier}
    db = tmp_path_factory.mktemp("garbage") / "l.duckdb"
    joule_otel.instrument(db=db, flush_interval=0.2)
    try:
        out = openai.OpenAI(base_url=base_url, api_key="k", max_retries=0).chat.completions.create(
            model="auto", messages=HI
        )
        assert out.choices[0].message.content == "ok"
        [row] = rows(db)
        stats = joule_otel.stats()
    finally:
        joule_otel.uninstrument()
    assert row["energy_j"] == parse_quantity(energy)
    assert row["carbon_mg"] == parse_quantity(carbon)
    # both headers are always sent: an empty or unparsable value is missing *and* counted
    expected_invalid = sum(1 for v in (energy, carbon) if parse_quantity(v) is None)
    assert stats["invalid_headers"] == expected_invalid
    assert row["input_tokens"] == 1 and row["output_tokens"] == 2


def test_same_receipt_seen_twice_is_one_row(scripted_server, ledger_path):
    _, base_url = scripted_server
    _ScriptedHandler.headers_to_send = {"X-Energy-Joules": "5", "X-Receipt-Id": "rcpt_replayed"}
    joule_otel.instrument(db=ledger_path, flush_interval=0.2)
    try:
        client = openai.OpenAI(base_url=base_url, api_key="k", max_retries=0)
        client.chat.completions.create(model="auto", messages=HI)
        client.chat.completions.create(model="auto", messages=HI)
        found = rows(ledger_path)
        assert joule_otel.stats()["duplicate_receipts"] == 1
    finally:
        joule_otel.uninstrument()
    assert [r["receipt_id"] for r in found] == ["rcpt_replayed"]


LATE_PROVIDER = """
import sys
import openai
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
import joule_otel

joule_otel.instrument(db=sys.argv[2], flush_interval=0.2)
client = openai.OpenAI(base_url=sys.argv[1], api_key="jc_late", max_retries=0)
for _ in range(3):
    client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}])
assert joule_otel.flush(timeout_s=20)
reader = InMemoryMetricReader()
metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
for _ in range(2):
    client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}])
assert joule_otel.flush(timeout_s=20)
counts = {
    metric.name: sum(point.count for point in metric.data.data_points)
    for resource in reader.get_metrics_data().resource_metrics
    for scope in resource.scope_metrics
    for metric in scope.metrics
    if metric.name == "joule.client.request.energy"
}
print(counts.get("joule.client.request.energy", 0), len(joule_otel.read_ledger(sys.argv[2])))
"""


def test_a_meter_provider_set_after_instrument_gets_the_metrics_from_then_on(tmp_path, joule_simulator):
    """No MeterProvider: nothing is recorded (it would go nowhere); one set later receives every call after it."""
    script = tmp_path / "late.py"
    script.write_text(LATE_PROVIDER)
    db = tmp_path / "late.duckdb"
    out = subprocess.run(
        [sys.executable, str(script), joule_simulator.base_url, str(db)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert out.stdout.split() == ["2", "5"]


class _GzipHandler(BaseHTTPRequestHandler):
    """Chat completions with a gzip body (or, for ``/v1/broken/...``, a body that claims gzip and is not; for
    ``/v1/big/...``, one that inflates past capture's body cap, its usage at the end)."""

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = json.dumps(
            {
                "id": "x",
                "object": "chat.completion",
                "created": 0,
                "model": "m",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                "filler": "x" * (BODY_CAP_BYTES + 1 if self.path.startswith("/v1/big/") else 0),
                "usage": {"prompt_tokens": 7, "completion_tokens": 9, "total_tokens": 16},
            }
        ).encode()
        data = b"this is not gzip" if self.path.startswith("/v1/broken/") else gzip.compress(body)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Encoding", "gzip")
        self.send_header("X-Energy-Joules", "5.5")
        self.send_header(
            "X-Receipt-Id", f"rcpt_{self.path.rsplit('/', 1)[-1]}_{threading.get_ident()}_{time.time_ns()}"
        )
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def gzip_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _GzipHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_compressed_body_is_inflated_once_by_the_apps_client(ledger_only, gzip_server, monkeypatch):
    """The body the app's client inflated is what is parsed; only a body read raw is inflated in the background."""
    import httpx2

    from joule_otel import _record

    inflated = []
    real_decode = _record.decode
    monkeypatch.setattr(
        _record, "decode", lambda data, encoding: inflated.append(encoding) or real_decode(data, encoding)
    )
    body = {"model": "auto", "messages": HI}
    responses = []
    with httpx.Client() as client:  # httpx 0.28: a decoder returns bytes
        responses.append(client.post(f"{gzip_server}/v1/chat/completions", json=body))
        with client.stream("POST", f"{gzip_server}/v1/chat/completions", json=body) as raw:
            assert b"".join(raw.iter_raw())[:2] == b"\x1f\x8b"  # the app read the raw bytes: nothing decoded them
    with httpx2.Client() as client:  # httpx2 (openai >= 3): a decoder returns an iterator of bytes
        responses.append(client.post(f"{gzip_server}/v1/chat/completions", json=body))
    openai.OpenAI(base_url=f"{gzip_server}/v1", api_key=SECRET, max_retries=0).chat.completions.create(
        model="auto", messages=HI
    )

    async def async_read() -> None:
        async with httpx2.AsyncClient() as client:
            responses.append(await client.post(f"{gzip_server}/v1/chat/completions", json=body))

    asyncio.run(async_read())
    assert all(r.json()["usage"]["completion_tokens"] == 9 for r in responses)
    found = rows(ledger_only)
    assert len(found) == 5
    assert [(r["input_tokens"], r["output_tokens"], r["energy_j"]) for r in found] == [(7, 9, 5.5)] * 5
    assert inflated == ["gzip"]  # the raw read only
    for response in responses:  # a response the app keeps can still be pickled (a cache, say)
        assert pickle.loads(pickle.dumps(response)).content == response.content


def test_a_body_inflated_past_the_cap_is_read_from_its_end_not_inflated_again(ledger_only, gzip_server, monkeypatch):
    import httpx2

    from joule_otel import _record

    inflated = []
    monkeypatch.setattr(_record, "decode", lambda data, encoding: inflated.append(encoding) or b"")
    with httpx2.Client() as client:
        response = client.post(f"{gzip_server}/v1/big/chat/completions", json={"model": "auto", "messages": HI})
    assert len(response.content) > BODY_CAP_BYTES
    assert [(r["input_tokens"], r["output_tokens"]) for r in rows(ledger_only)] == [(7, 9)]
    assert inflated == []


@pytest.mark.parametrize("let_go", ["before the drain", "after the drain"])
def test_capture_leaves_no_cycle_behind_a_response(ledger_only, joule_simulator, let_go):
    """A response the app drops is freed there and then, collector or not: capture holds it only until its drain."""
    import weakref

    import httpx2

    gc.disable()
    try:
        with httpx2.Client(headers={"Authorization": f"Bearer {SECRET}"}) as client:
            url = f"{joule_simulator.base_url}/chat/completions"
            response = client.post(url, json={"model": "auto", "messages": HI})
            gone = weakref.ref(response)
            if let_go == "before the drain":
                del response
            assert joule_otel.flush(timeout_s=30)
            if let_go == "after the drain":
                del response
            assert gone() is None
    finally:
        gc.enable()
    assert [r["output_tokens"] > 0 for r in rows(ledger_only)] == [True]


def test_a_body_that_cannot_be_inflated_fails_the_same_with_capture(gzip_server, ledger_path):
    def read() -> str:
        with httpx.Client() as client:
            try:
                client.post(f"{gzip_server}/v1/broken/chat/completions", json={"model": "auto"})
            except httpx.DecodingError as exc:
                return type(exc).__name__
        return "no error"

    without = read()
    joule_otel.instrument(db=ledger_path, flush_interval=0.2)
    try:
        assert read() == without == "DecodingError"
        assert [(r["energy_j"], r["output_tokens"]) for r in rows(ledger_path)] == [(5.5, None)]
    finally:
        joule_otel.uninstrument()


def test_a_call_caught_before_its_decoder_flushed_waits_one_drain(ledger_only, monkeypatch):
    """A call finishes when its raw stream ends, a moment before the client flushes its decoder: it waits a drain."""
    from joule_otel import _instrument, _record
    from joule_otel._record import CallRecord

    inflated = []
    monkeypatch.setattr(_record, "decode", lambda data, encoding: inflated.append(encoding) or b"")
    body = json.dumps({"usage": {"prompt_tokens": 3, "completion_tokens": 4}}).encode()
    request = httpx.Request("POST", "http://127.0.0.1:9/v1/chat/completions", json={"model": "auto"})
    call = CallRecord(request, "chat", time.perf_counter_ns(), time.time_ns())
    call.status_code = 200
    headers = {"content-encoding": "gzip", "x-receipt-id": "rcpt_waited"}
    response = httpx.Response(200, headers=headers, stream=httpx.ByteStream(gzip.compress(body)))
    response._get_content_decoder()  # the app's client has begun decoding the body, and has not the whole of it yet
    call.response, call.response_headers = response, response.headers
    call.chunks, call.kept = [gzip.compress(body)], 1
    pipeline = _instrument._state.pipeline
    with pipeline._cycle_lock:  # the background thread waits: these drains are the only ones
        pipeline.submit(call)
        assert pipeline._drain(wait_for_decoders=True) == []
        assert list(pipeline._queue) == [call]
        response._content = body  # the client has the decoded body (what Response.read keeps)
        (row,) = pipeline._drain(wait_for_decoders=True)
    assert (row.receipt_id, row.input_tokens, row.output_tokens) == ("rcpt_waited", 3, 4)
    assert inflated == []  # the app's copy was parsed: nothing inflated twice


def test_a_plain_patch_laid_over_capture_never_keeps_it_running_after_uninstrument(ledger_path, joule_simulator):
    """mock.patch and vcrpy lay plain functions over the transport: capture's wrapper beneath cannot be taken out.
    After uninstrument it passes calls through (none queue into the stopped pipeline), and instrument() again
    captures each call once."""
    from joule_otel import _instrument

    joule_otel.instrument(db=ledger_path, flush_interval=0.2)
    beneath = httpx.HTTPTransport.handle_request
    seen = []

    def spy(self, request):  # what mock.patch(..., wraps=...) or a recorder lays on top
        seen.append(request.url.path)
        return beneath(self, request)

    httpx.HTTPTransport.handle_request = spy
    try:
        first = _instrument._state
        joule_otel.uninstrument()
        with httpx.Client(base_url=joule_simulator.base_url, headers={"Authorization": "Bearer k"}) as client:
            body = {"model": "auto", "messages": HI}
            client.post("/chat/completions", json=body)
            assert len(first.pipeline._queue) == 0 and not first.capture.inflight, "nothing reaches a stopped capture"
            joule_otel.instrument(db=ledger_path, flush_interval=0.2)
            for _ in range(3):
                client.post("/chat/completions", json=body)
            assert joule_otel.flush(timeout_s=20)
            assert joule_otel.stats()["calls_captured"] == 3
        issued = [r.receipt_id for r in joule_simulator.receipts]
        assert len(seen) == 4
        assert sorted(r["receipt_id"] for r in rows(ledger_path)) == sorted(issued[1:])
    finally:
        joule_otel.uninstrument()
        httpx.HTTPTransport.handle_request = inspect.unwrap(beneath)


def test_a_response_read_before_the_transport_returns_it_keeps_its_tokens_and_its_time(ledger_only):
    """httpx's MockTransport and respx hand back responses already read: the call ends there, with the usage in its
    body, not at garbage collection."""

    def joule(request: httpx.Request) -> httpx.Response:
        body = {"model": "m", "choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 7}}
        headers = {"X-Energy-Joules": "3.5", "X-Receipt-Id": "rcpt_mocked"}
        return httpx.Response(200, json=body, headers=headers)

    with httpx.Client(transport=httpx.MockTransport(joule)) as client:
        response = client.post("http://127.0.0.1:9/v1/chat/completions", json={"model": "auto", "messages": HI})
        assert joule_otel.flush(timeout_s=20)
        [row] = rows(ledger_only)
        assert response.status_code == 200  # still referenced: the call ended without waiting for the collector
    assert (row["receipt_id"], row["energy_j"], row["input_tokens"], row["output_tokens"]) == (
        "rcpt_mocked",
        3.5,
        11,
        7,
    )
    assert 0 <= row["duration_ms"] < 60_000
