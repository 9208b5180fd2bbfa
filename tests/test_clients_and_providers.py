"""The clients people use, other providers, the app's own providers and options.

aiohttp through openai and litellm, each call a row of the right provider; nothing leaks to spans or the exposition.

Every test here drives real parts: the simulator or a scripted HTTP server on loopback, a real DuckDB file, real
child processes.
"""

from __future__ import annotations

import json
import socket

import httpx
import openai
import pytest
from support import HI, ledger_rows, run_script

import joule_otel

# -- the exposition and the spans stay clean ----------------------------------------------------------------


PROMETHEUS_APP = """
import sys, urllib.request
import openai
import joule_otel
from prometheus_client.parser import text_string_to_metric_families

joule_otel.instrument(db=sys.argv[2], prometheus_port=int(sys.argv[3]), flush_interval=60)
client = openai.OpenAI(base_url=sys.argv[1], api_key="jc_prom", max_retries=0)
for _ in range(3):
    client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}])
    joule_otel.flush(timeout_s=10)
joule_otel.flush(timeout_s=10)
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[3]}/metrics").read().decode()
seen, duplicates = set(), []
for family in text_string_to_metric_families(text):
    for sample in family.samples:
        key = (sample.name, tuple(sorted(sample.labels.items())))
        if key in seen:
            duplicates.append(key)
        seen.add(key)
print(len(duplicates), sum(1 for name, _ in seen if name == "joule_client_energy_joules_total"))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_flush_never_duplicates_series_in_the_prometheus_exposition(tmp_path, joule_simulator):
    out = run_script(PROMETHEUS_APP, joule_simulator.base_url, str(tmp_path / "p.duckdb"), str(free_port()))
    duplicates, energy_series = out.stdout.split()
    assert duplicates == "0"
    assert int(energy_series) >= 1


def test_credentials_in_a_query_string_never_reach_a_span(telemetry, joule_simulator):
    url = f"{joule_simulator.base_url}/chat/completions?api-key=SECRET1&key=SECRET2&api-version=2024-10-21"
    httpx.post(url, json={"model": "auto", "messages": HI}, headers={"Authorization": "Bearer k"})
    assert joule_otel.flush(timeout_s=10)
    [span] = [s for s in telemetry.spans.get_finished_spans() if "joule.receipt_id" in (s.attributes or {})]
    text = json.dumps(dict(span.attributes))
    assert "SECRET" not in text
    full = span.attributes.get("url.full") or span.attributes.get("http.url")
    assert "api-key=REDACTED" in full and "key=REDACTED" in full and "api-version=2024-10-21" in full


# -- aiohttp, through the clients people use ---------------------------------------------------------------------


AIOHTTP_CLIENTS = """
import asyncio, os, sys
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # litellm must not fetch its price list
import openai
import joule_otel

early = openai.AsyncOpenAI(base_url=sys.argv[1], api_key="jc_aio", max_retries=0,
                           http_client=openai.DefaultAioHttpClient())  # made before instrument()
joule_otel.instrument(db=sys.argv[2], flush_interval=0.1)
import litellm

HI = [{"role": "user", "content": "hi"}]

async def main():
    await early.chat.completions.create(model="auto", messages=HI)
    stream = await early.chat.completions.create(model="auto", messages=HI, stream=True,
                                                 stream_options={"include_usage": True})
    async for _ in stream:
        pass
    closed = await early.chat.completions.create(model="auto", messages=HI, stream=True)
    async for _ in closed:
        break
    await closed.close()
    await early.embeddings.create(model="auto", input="hi")
    await early.close()
    await litellm.acompletion(model="openai/auto", api_base=sys.argv[1], api_key="jc_lite", messages=HI)
    s = await litellm.acompletion(model="openai/auto", api_base=sys.argv[1], api_key="jc_lite", messages=HI,
                                  stream=True, stream_options={"include_usage": True})
    async for _ in s:
        pass

asyncio.run(main())
assert joule_otel.flush(timeout_s=20)
"""


def test_aiohttp_calls_of_openai_and_litellm_land_exactly_once(tmp_path, joule_simulator):
    db = tmp_path / "aio.duckdb"
    run_script(AIOHTTP_CLIENTS, joule_simulator.base_url, str(db), timeout=240)
    issued = {r.receipt_id: r for r in joule_simulator.receipts}
    assert len(issued) == 6
    rows = ledger_rows(db)
    assert sorted(r["receipt_id"] for r in rows) == sorted(issued)
    for row in rows:
        receipt = issued[row["receipt_id"]]
        assert row["energy_j"] == receipt.energy_j
        assert row["provider"] == "joule_cloud"
    with_usage = [r for r in rows if r["stream"] and r["input_tokens"] is not None]
    assert len(with_usage) == 2  # the two streams that asked for usage
    assert {r["operation"] for r in rows} == {"chat", "embeddings"}


# -- providers --------------------------------------------------------------------------------------------------


def test_other_providers_are_rows_but_never_joules_and_non_inference_routes_are_not_rows(
    telemetry, joule_simulator, scripted
):
    oai = openai.OpenAI(base_url=joule_simulator.base_url, api_key="k", max_retries=0)
    oai.chat.completions.create(model="auto", messages=HI)
    oai.models.list()
    httpx.post(f"{joule_simulator.base_url}/moderations", json={"input": "x"})
    other = openai.OpenAI(base_url=scripted, api_key="k", max_retries=0)  # an OpenAI-compatible server, no headers
    other.chat.completions.create(model="gpt-4o-mini", messages=HI)
    other.models.list()
    assert joule_otel.flush(timeout_s=10)
    rows = ledger_rows(telemetry.db)
    assert sorted((r["provider"], r["operation"]) for r in rows) == [("127.0.0.1", "chat"), ("joule_cloud", "chat")]
    foreign = next(r for r in rows if r["provider"] == "127.0.0.1")
    assert foreign["energy_j"] is None and foreign["input_tokens"] == 1
    span_providers = {
        s.attributes.get("gen_ai.provider.name")
        for s in telemetry.spans.get_finished_spans()
        if "gen_ai.provider.name" in (s.attributes or {})
    }
    assert span_providers == {"joule_cloud", "127.0.0.1"}
    durations = telemetry.metric_points("gen_ai.client.operation.duration")
    metric_providers = {dict(p.attributes).get("gen_ai.provider.name") for p in durations}
    assert metric_providers == {"joule_cloud", "127.0.0.1"}
    assert {dict(p.attributes)["gen_ai.provider.name"] for p in telemetry.metric_points("joule.client.energy")} == {
        "joule_cloud"
    }


def test_provider_rule():
    from joule_otel._genai import provider_for

    assert provider_for("api.greenjoules.cloud", False) == "joule_cloud"
    assert provider_for("EU.API.GreenJoules.Cloud.", False) == "joule_cloud"
    assert provider_for("api.openai.com", False) == "openai"
    assert provider_for("api.openai.com", True) == "joule_cloud"  # it carried Joule's headers
    assert provider_for("notgreenjoules.cloud", False) == "notgreenjoules.cloud"
    assert provider_for(None, False) == "unknown"


@pytest.mark.parametrize(
    ("headers", "provider"),
    [
        ({"X-Tier": "standard"}, "joule_cloud"),  # any of Joule's response headers, even alone
        ({"x-receipt-id": "r"}, "joule_cloud"),
        ({"X-Region": "eu-fi"}, "llm.example"),  # a region alone is not Joule's: a request sends it too
        ({"OpenAI-Version": "2020-10-01"}, "openai"),  # OpenAI's API behind a gateway
        ({"openai-processing-ms": "12", "x-energy-joules": "1"}, "joule_cloud"),
        ({"content-type": "application/json"}, "llm.example"),
    ],
)
def test_provider_of_a_response(headers, provider):
    from joule_otel._genai import provider_of_scanned
    from joule_otel._headers import scan_headers

    assert provider_of_scanned("llm.example", scan_headers(httpx.Headers(headers))) == provider


# -- the app's own provider, whatever its class -----------------------------------------------------------------


def test_an_api_level_tracer_provider_that_is_not_the_sdks_is_used_not_replaced(
    ledger_path, joule_simulator, monkeypatch
):
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from joule_otel._config import Settings
    from joule_otel._exporters import resolve_providers

    exporter = InMemorySpanExporter()
    sdk = TracerProvider()
    sdk.add_span_processor(SimpleSpanProcessor(exporter))

    class VendorProxyTracerProvider(trace.TracerProvider):  # Logfire's ProxyTracerProvider is of this kind
        def get_tracer(self, *args, **kwargs):
            return sdk.get_tracer(*args, **kwargs)

    vendor = VendorProxyTracerProvider()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")  # would tempt a private pipeline
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")  # (no global MeterProvider left behind for other tests)
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: vendor)
    providers = resolve_providers(Settings.resolve(db=ledger_path), None, None)
    assert providers.tracer_provider is vendor
    assert providers.created == [] or all(not hasattr(p, "get_tracer") for p in providers.created)
    joule_otel.instrument(db=ledger_path, flush_interval=0.1)
    try:
        openai.OpenAI(base_url=joule_simulator.base_url, api_key="k", max_retries=0).chat.completions.create(
            model="auto", messages=HI
        )
        assert joule_otel.flush(timeout_s=10)
    finally:
        joule_otel.uninstrument()
        for provider in providers.created:
            provider.shutdown()
    spans = [s for s in exporter.get_finished_spans() if "joule.receipt_id" in (s.attributes or {})]
    assert len(spans) == 1


# -- options mirror the environment; metrics can be lighter -------------------------------------------------


def test_unknown_options_name_the_valid_ones(ledger_path):
    with pytest.raises(ValueError, match=r"flush_intervall.*valid options: .*flush_interval"):
        joule_otel.instrument(db=ledger_path, flush_intervall=1)
    with pytest.raises(ValueError, match="metrics must be one of all, energy, none"):
        joule_otel.instrument(db=ledger_path, metrics="some")
    with pytest.raises(ValueError, match="not both"):
        joule_otel.instrument(db=ledger_path, flush_interval=1, flush_interval_s=1)
    assert joule_otel.stats() == {"instrumented": False}


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        (
            "all",
            {
                "joule.client.energy",
                "joule.client.carbon",
                "joule.client.request.energy",
                "gen_ai.client.operation.duration",
                "gen_ai.client.token.usage",
                "gen_ai.client.operation.time_to_first_chunk",
            },
        ),
        ("energy", {"joule.client.energy", "joule.client.carbon", "joule.client.request.energy"}),
        ("none", set()),
    ],
)
def test_joule_otel_metrics_chooses_what_is_recorded(ledger_path, joule_simulator, monkeypatch, mode, expected):
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    monkeypatch.setenv("JOULE_OTEL_METRICS", mode)
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    joule_otel.instrument(db=ledger_path, flush_interval=0.1, meter_provider=provider)
    try:
        client = openai.OpenAI(base_url=joule_simulator.base_url, api_key="k", max_retries=0)
        client.chat.completions.create(model="auto", messages=HI)
        for _ in client.chat.completions.create(
            model="auto", messages=HI, stream=True, stream_options={"include_usage": True}
        ):
            pass
        assert joule_otel.flush(timeout_s=10)
        assert joule_otel.stats()["metrics"] == mode
    finally:
        joule_otel.uninstrument()
    data = reader.get_metrics_data()
    names = {
        m.name
        for rm in (data.resource_metrics if data else [])
        for sm in rm.scope_metrics
        for m in sm.metrics
        if sm.scope.name == "joule_otel"
    }
    assert names == expected
    assert len(ledger_rows(ledger_path)) == 2  # the ledger is the same whatever the metrics
    provider.shutdown()
