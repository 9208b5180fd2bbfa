"""Histogram records handed straight to the SDK's storage: the data ``record`` exports, and ``record`` wherever the
sameness cannot be shown.

Real OpenTelemetry SDK MeterProviders with in-memory readers; the end-to-end test drives real calls to the simulator.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.metrics._internal import _ProxyMeter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics._internal import _default_meter_configurator, _disable_meter_configurator
from opentelemetry.sdk.metrics._internal import measurement as sdk_measurement
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.metrics.view import View
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

import joule_otel
from joule_otel import _direct_record
from joule_otel._direct_record import histogram_record

ATTRIBUTES = {
    "joule.workload": "support-bot",
    "gen_ai.operation.name": "chat",
    "gen_ai.provider.name": "joule_cloud",
    "gen_ai.request.model": "auto",
    "gen_ai.response.model": "llama-3.1-70b",
    "joule.tier": "standard",
    "joule.region": "eu-fi",
}
TOKENS = {**ATTRIBUTES, "gen_ai.token.type": "input"}


def _sampled(trace_id: int, span_id: int) -> Context:
    span = SpanContext(trace_id, span_id, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED))
    return trace.set_span_in_context(NonRecordingSpan(span))


MEASUREMENTS: list[tuple[float, dict[str, str], Context | None]] = [
    (0.0, ATTRIBUTES, None),
    (0.4, ATTRIBUTES, Context()),
    (3, ATTRIBUTES, _sampled(0xABC, 0x1)),
    (250.5, ATTRIBUTES, _sampled(0xABD, 0x2)),
    (17, TOKENS, None),
    (4_096, TOKENS, Context()),
    (1e6, TOKENS, _sampled(0xABE, 0x3)),
]
"""Two attribute sets, ints and floats, zero, in-bucket and overflow values, with and without a sampled span."""


@pytest.fixture
def cleanings(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every attribute mapping the SDK's ``Measurement`` cleans, as it cleans it."""
    seen: list[Any] = []
    if not hasattr(sdk_measurement, "_clean_attribute_value"):  # SDK < 1.45: a Measurement cleans nothing
        pytest.skip("this SDK's Measurement does not clean attributes: there is no second cleaning to skip")
    clean = sdk_measurement._clean_attribute_value

    def counting(value: Any, limit: Any) -> Any:
        seen.append(value)
        return clean(value, limit)

    monkeypatch.setattr(sdk_measurement, "_clean_attribute_value", counting)
    return seen


@pytest.fixture
def fresh_probe() -> Iterator[None]:
    """The probe's verdict and the SDK's classes looked at again, and afterwards."""
    _direct_record._direct_path_matches.cache_clear()
    _direct_record._sdk_histogram_types.cache_clear()
    _direct_record._path.clear()
    yield
    _direct_record._direct_path_matches.cache_clear()
    _direct_record._sdk_histogram_types.cache_clear()
    _direct_record._path.clear()


def _histogram(**provider_options: Any) -> tuple[Any, InMemoryMetricReader, MeterProvider]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False, **provider_options)
    histogram = provider.get_meter("test").create_histogram(
        "joule.client.request.energy", unit="J", explicit_bucket_boundaries_advisory=[0.5, 1, 10, 100, 1_000]
    )
    return histogram, reader, provider


def _points(reader: InMemoryMetricReader) -> list[tuple[Any, ...]]:
    data = reader.get_metrics_data()
    if data is None:
        return []
    return sorted(
        (
            tuple(sorted(p.attributes.items())),
            p.count,
            p.sum,
            p.min,
            p.max,
            tuple(p.bucket_counts),
            tuple(
                sorted(
                    (e.value, e.trace_id, e.span_id, tuple(sorted(e.filtered_attributes.items()))) for e in p.exemplars
                )
            ),
        )
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        for p in m.data.data_points
    )


def test_the_direct_path_exports_what_record_exports_without_cleaning_the_attributes_again(cleanings, fresh_probe):
    public, public_reader, _ = _histogram()
    for value, attributes, context in MEASUREMENTS:
        public.record(value, attributes, context=context)
    assert len(cleanings) == len(MEASUREMENTS)  # the public path cleans every record's attributes

    direct, direct_reader, _ = _histogram()
    record = histogram_record(direct)
    cleanings.clear()
    for value, attributes, context in MEASUREMENTS:
        record(value, attributes, context)
    assert cleanings == []

    exported = _points(direct_reader)
    assert exported == _points(public_reader)
    assert [(p[1], p[2]) for p in exported] == [(3, 1_004_113), (4, 253.9)]
    assert sum(len(p[6]) for p in exported) == 3  # the sampled spans' exemplars, kept


def test_the_app_s_views_apply_to_the_direct_path_as_to_record(fresh_probe):
    """A view keeping one attribute: both ways, one stream of every measurement, the dropped attributes on exemplars."""
    views = [View(instrument_name="joule.client.request.energy", attribute_keys={"joule.workload"})]
    public, public_reader, _ = _histogram(views=views)
    direct, direct_reader, _ = _histogram(views=views)
    record = histogram_record(direct)
    for value, attributes, context in MEASUREMENTS:
        public.record(value, attributes, context=context)
        record(value, attributes, context)
    exported = _points(direct_reader)
    assert exported == _points(public_reader)
    assert [(p[0], p[1]) for p in exported] == [((("joule.workload", "support-bot"),), 7)]
    assert all(("joule.tier", "standard") in e[3] for e in exported[0][6])


def test_values_record_refuses_go_to_record_which_warns_and_drops_them(cleanings, fresh_probe, caplog):
    histogram, reader, _ = _histogram()
    record = histogram_record(histogram)
    with caplog.at_level(logging.WARNING, logger="opentelemetry.sdk.metrics._internal.instrument"):
        for value in (math.nan, -1.0, math.inf):
            record(value, ATTRIBUTES, None)
    assert len(caplog.records) == 3
    assert "not finite" in caplog.records[0].getMessage()
    assert "non-negative" in caplog.records[1].getMessage()
    assert _points(reader) == []


def test_a_meter_disabled_after_the_histogram_was_made_records_nothing(fresh_probe):
    histogram, reader, provider = _histogram()
    record = histogram_record(histogram)
    record(2.0, ATTRIBUTES, None)
    provider._set_meter_configurator(meter_configurator=_disable_meter_configurator)
    record(5.0, ATTRIBUTES, None)
    provider._set_meter_configurator(meter_configurator=_default_meter_configurator)
    record(7.0, ATTRIBUTES, None)
    assert [(p[1], p[2]) for p in _points(reader)] == [(2, 9.0)]


def test_a_proxy_histogram_records_through_the_proxy_once_a_provider_is_set(cleanings, fresh_probe):
    meter = _ProxyMeter("joule_otel")
    proxy = meter.create_histogram("joule.client.request.energy", unit="J")
    record = histogram_record(proxy)
    record(1.0, ATTRIBUTES, None)  # no provider yet: goes nowhere, as the proxy's record
    reader = InMemoryMetricReader()
    meter.on_set_meter_provider(MeterProvider(metric_readers=[reader], shutdown_on_exit=False))
    record(3.0, ATTRIBUTES, None)
    assert [(p[1], p[2]) for p in _points(reader)] == [(1, 3.0)]
    assert len(cleanings) == 1  # the public path, cleaning as always


def test_a_probe_that_differs_keeps_record(cleanings, fresh_probe, monkeypatch, caplog):
    real_probe = _direct_record._probe
    monkeypatch.setattr(
        _direct_record,
        "_probe",
        lambda *, direct: real_probe(direct=direct)[1:] if direct else real_probe(direct=direct),
    )
    histogram, reader, _ = _histogram()
    with caplog.at_level(logging.WARNING, logger="joule_otel"):
        record = histogram_record(histogram)
        histogram_record(_histogram()[0])  # a second histogram: decided once, said once
    cleanings.clear()
    record(4.0, ATTRIBUTES, None)
    assert len(cleanings) == 1
    assert [(p[1], p[2]) for p in _points(reader)] == [(1, 4.0)]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "exported different data" in warnings[0], warnings
    assert _direct_record.path_in_use() == "public-api"


def test_sdk_internals_not_as_written_against_keep_record(cleanings, fresh_probe, monkeypatch):
    monkeypatch.setattr(_direct_record, "_MEASUREMENT_FIELDS", ("value", "time_unix_nano", "instrument", "attributes"))
    histogram, reader, _ = _histogram()
    record = histogram_record(histogram)
    assert _direct_record.path_in_use() == "public-api"
    record(4.0, ATTRIBUTES, None)
    assert len(cleanings) == 1
    assert [(p[1], p[2]) for p in _points(reader)] == [(1, 4.0)]


def test_a_probe_that_raises_keeps_record(cleanings, fresh_probe, monkeypatch):
    def broken(*, direct: bool) -> list[tuple[Any, ...]]:
        raise AttributeError("'_Histogram' object has no attribute '_measurement_consumer'")

    monkeypatch.setattr(_direct_record, "_probe", broken)
    histogram, reader, _ = _histogram()
    histogram_record(histogram)(4.0, ATTRIBUTES, None)
    assert len(cleanings) == 1
    assert [(p[1], p[2]) for p in _points(reader)] == [(1, 4.0)]


def test_capture_records_its_histograms_without_the_second_cleaning(telemetry, joule_simulator, cleanings):
    client = openai.OpenAI(base_url=joule_simulator.base_url, api_key="jc_test", max_retries=0)
    for _ in range(3):
        client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}], max_tokens=8)
    assert joule_otel.flush(timeout_s=30)
    # the token records are the only measurements that carry gen_ai.token.type: none was cleaned again (the probe's
    # public half, on its private provider, is cleaned as any record is)
    assert not [c for c in cleanings if "gen_ai.token.type" in c and c["joule.workload"] != "probe"]
    assert [c for c in cleanings if "joule.workload" in c]  # the counters' adds still go through the public API
    usage = telemetry.metric_points("gen_ai.client.token.usage")
    assert sorted(p.attributes["gen_ai.token.type"] for p in usage) == ["input", "output"]
    assert all(p.count == 3 for p in usage)
    energy = telemetry.metric_points("joule.client.request.energy")
    assert sum(p.count for p in energy) == 3
    assert joule_otel.stats()["histogram_path"] == "sdk-storage"  # on the oldest SDK supported and the newest
