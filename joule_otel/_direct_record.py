"""Histogram records without the OpenTelemetry SDK cleaning the same attributes again on every record.

The SDK's ``Histogram.record`` cleans and copies a measurement's attributes each time (``Measurement.__post_init__``),
then its storage copies and hashes them for the aggregation key. joule-otel's metric attribute sets are built once per
set, from parsed strings, and never changed afterwards: cleaning one gives back an equal dict, so that first pass is
pure cost: about a third of a record (``benchmarks/run.py --only peers`` counts it).

For the SDK's own synchronous histograms this module hands the measurement straight to the instrument's measurement
consumer: the seam between the SDK's instrument API and its storage, so views, aggregation, exemplars and cardinality
limits all still apply. It does so only after a probe, once a process, on two private MeterProviders, shows that this
path and ``record`` export the same data (points, buckets and exemplars). Any other instrument (the API's proxy before
the app sets a MeterProvider, another SDK), a disabled meter, a value ``record`` would refuse, or a probe that differs
(another SDK version's internals): the public ``record``, unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Mapping
from time import time_ns
from typing import Any

from opentelemetry.context import Context, get_current

logger = logging.getLogger("joule_otel")

Record = Callable[[float, Mapping[str, str], "Context | None"], None]
"""Record ``value`` with a clean, never-mutated attribute set, in ``context`` (None: the current one)."""

_MEASUREMENT_FIELDS = ("value", "time_unix_nano", "instrument", "context", "attributes")


def histogram_record(histogram: Any) -> Record:
    """How to record on ``histogram``: to its SDK storage where that is shown to be the same, else ``record``."""
    record = _public(histogram)
    sdk = _sdk_histogram_types()
    if sdk is None:
        _fell_back("its internals are not the ones joule-otel knows")
        return record
    if type(histogram) not in sdk[0] or not _direct_path_matches():
        return record
    if not _path:
        _path.append("sdk-storage")
    return _direct(histogram, sdk[1], record)


def _public(histogram: Any) -> Record:
    """``histogram.record`` in :data:`Record`'s shape."""
    public = histogram.record

    def record(value: float, attributes: Mapping[str, str], context: Context | None) -> None:
        public(value, attributes, context=context)

    return record


def _direct(histogram: Any, measurement_type: type, public: Record) -> Record:
    consume = histogram._measurement_consumer.consume_measurement
    is_enabled = histogram._is_enabled
    inf = math.inf

    def record(value: float, attributes: Mapping[str, str], context: Context | None) -> None:
        # what ``record`` checks before its measurement, in the same order; anything it would warn about goes to it
        if 0 <= value < inf and is_enabled():
            consume(measurement_type(value, time_ns(), histogram, context or get_current(), attributes))
        else:
            public(value, attributes, context)

    return record


@functools.cache
def _sdk_histogram_types() -> tuple[frozenset[type], type] | None:
    """The SDK's synchronous histogram classes, and a measurement type that keeps its attributes as given.

    None if the SDK's internals are not the ones this module was written against.
    """
    try:
        from opentelemetry.sdk.metrics._internal import instrument
        from opentelemetry.sdk.metrics._internal.measurement import Measurement
    except ImportError:
        return None
    if not dataclasses.is_dataclass(Measurement):
        return None
    if tuple(f.name for f in dataclasses.fields(Measurement)) != _MEASUREMENT_FIELDS:
        return None
    histograms = frozenset(
        cls for name in ("Histogram", "_Histogram") if isinstance(cls := getattr(instrument, name, None), type)
    )
    if not histograms:
        return None

    class CleanMeasurement(Measurement):
        """A measurement whose attributes were cleaned when their set was built."""

        def __post_init__(self) -> None:
            pass

    return histograms, CleanMeasurement


@functools.cache
def _direct_path_matches() -> bool:
    """Whether the direct path and ``record`` export the same data, on two private MeterProviders (once a process)."""
    try:
        public, direct = (_probe(direct=False), _probe(direct=True))
    except Exception:  # internals not as expected: the public path, always correct
        _fell_back("its internals are not the ones joule-otel knows", exc_info=True)
        return False
    if public != direct or not public:
        _fell_back("a probe recorded through both paths exported different data")
        return False
    return True


_FALLBACK = (
    "joule_otel: this OpenTelemetry SDK's histograms are recorded through its public API, as %s; every figure is "
    "the same, each record costs the background thread a third more (stats()['histogram_path'] says which path)"
)


_path: list[str] = []
"""How SDK histograms are recorded in this process, once decided: ``sdk-storage`` or ``public-api``."""


def _fell_back(reason: str, *, exc_info: bool = False) -> None:
    if not _path:
        _path.append("public-api")
        logger.warning(_FALLBACK, reason, exc_info=exc_info)


def path_in_use() -> str | None:
    """``sdk-storage`` or ``public-api`` once an SDK histogram was recorded on, else None (for ``stats()``)."""
    return _path[0] if _path else None


def _probe(*, direct: bool) -> list[tuple[Any, ...]]:
    """Record a few measurements on a private histogram and read back what the SDK would export."""
    from opentelemetry import trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    sdk = _sdk_histogram_types()
    assert sdk is not None
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    try:
        histogram = provider.get_meter("joule_otel.probe").create_histogram(
            "probe", unit="J", explicit_bucket_boundaries_advisory=[1.0, 10.0]
        )
        if type(histogram) not in sdk[0]:
            return []
        record = _direct(histogram, sdk[1], _public(histogram)) if direct else None
        span = SpanContext(0x1F, 0x2F, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED))
        sampled = trace.set_span_in_context(NonRecordingSpan(span))
        first = {"joule.workload": "probe", "gen_ai.request.model": "auto"}
        second = {**first, "gen_ai.token.type": "input"}
        for value, attributes, context in (
            (0.5, first, None),
            (5, first, sampled),
            (50.0, second, Context()),
        ):
            if record is not None:
                record(value, attributes, context)
            else:
                histogram.record(value, attributes, context=context)
        data = reader.get_metrics_data()
    finally:
        provider.shutdown()
    assert data is not None
    points: list[Any] = [
        point
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        for point in metric.data.data_points
    ]
    return sorted(
        (
            tuple(sorted(point.attributes.items())),
            point.count,
            point.sum,
            point.min,
            point.max,
            tuple(point.bucket_counts),
            tuple(
                (e.value, e.trace_id, e.span_id, tuple(sorted((e.filtered_attributes or {}).items())))
                for e in point.exemplars
            ),
        )
        for point in points
    )
