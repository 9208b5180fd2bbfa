"""Metric recording for the background thread: bounded attribute sets, summed counters, one record per histogram.

What is recorded is set by ``JOULE_OTEL_METRICS`` (``instrument(metrics=...)``): ``all`` (default), ``energy`` (the
``joule.*`` metrics only), ``none``. The ``gen_ai.client.*`` metrics are skipped when another GenAI
instrumentation in the process records them already.
"""

from __future__ import annotations

import sys
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from joule_otel import _attributes as attr
from joule_otel._calls import Measurement, measurement
from joule_otel._config import METRICS_MODES
from joule_otel._direct_record import Record, histogram_record
from joule_otel._genai import SEMCONV_OPERATIONS
from joule_otel._instruments import Instruments
from joule_otel._tags import TAG_PREFIX
from joule_otel.ledger._row import LedgerRow

METRICS_ALL, METRICS_ENERGY, METRICS_NONE = METRICS_MODES

ATTRIBUTE_SETS_CACHED = 4_096
_NO_SPAN = otel_context.Context()
"""A context without a span: a measurement recorded with it offers no exemplar."""
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_NO_OP_METER_PROVIDERS = frozenset({"_ProxyMeterProvider", "NoOpMeterProvider"})

MetricKey = tuple[str | None, ...]
"""A :class:`~joule_otel._calls.Measurement`'s key: one attribute set."""


def other_genai_metrics_recorder() -> str | None:
    """Name of another GenAI instrumentation in this process that records ``gen_ai.client.*`` metrics."""
    for module_name, label in (
        ("opentelemetry.instrumentation.openai_v2", "opentelemetry-instrumentation-openai-v2"),
        ("opentelemetry.instrumentation.openai", "OpenLLMetry"),
    ):
        module = sys.modules.get(module_name)
        instrumentor = getattr(module, "OpenAIInstrumentor", None) if module else None
        if instrumentor is not None and getattr(instrumentor(), "_is_instrumented_by_opentelemetry", False):
            return label
    if "logfire._internal.integrations.llm_providers.openai" in sys.modules:
        return "Logfire"
    if "openlit.instrumentation.openai" in sys.modules:
        return "OpenLIT"
    return None


class MetricRecorder:
    """Records :class:`Measurement` s on the instruments; counters are summed and added once a flush interval."""

    def __init__(
        self,
        instruments: Instruments | None,
        meter_provider: Any,
        *,
        mode: str,
        max_workloads: int,
        metric_tags: tuple[str, ...] = (),
    ) -> None:
        self.instruments = instruments
        self.meter_provider = meter_provider
        """The provider the instruments came from; ``None`` or the API's proxy: the global one, looked up each cycle."""
        self.mode = mode
        self.max_workloads = max_workloads
        self.metric_tags = metric_tags
        """Tag keys that are metric attributes (``JOULE_OTEL_METRIC_TAGS``), each bounded as workloads are."""
        self._workloads: set[str] = set()
        self._tag_values: dict[str, set[str]] = {key: set() for key in metric_tags}
        self._attribute_sets: dict[tuple[str | None, ...], dict[str, Any]] = {}
        self._counter_sums: dict[MetricKey, list[float | None]] = {}
        self._live = False
        self._skip_genai = True
        self._records: tuple[Record, Record, Record, Record] | None = None
        """How to record on the four histograms (energy, duration, tokens, time to first chunk), once first live."""

    def begin_cycle(self) -> bool:
        """Decide, once per cycle, whether measurements go anywhere and which; True if any are recorded."""
        self._live = self.instruments is not None and self.mode != METRICS_NONE and self._provider_live()
        self._skip_genai = self.mode != METRICS_ALL or (self._live and other_genai_metrics_recorder() is not None)
        if self._live and self._records is None:
            self._records = self._histogram_records()
        return self._live

    def _histogram_records(self) -> tuple[Record, Record, Record, Record]:
        """How to record on each histogram, decided once.

        On the API's proxy (instruments made before the app set a MeterProvider): its ``record``, which forwards.
        """
        inst = self.instruments
        assert inst is not None
        return (
            histogram_record(inst.request_energy),
            histogram_record(inst.duration),
            histogram_record(inst.token_usage),
            histogram_record(inst.time_to_first_chunk),
        )

    def _provider_live(self) -> bool:
        """Whether a measurement goes anywhere.

        Not while the app has set no MeterProvider (the API's proxy forwards to nothing until one is set; this is
        checked again every cycle) or set a no-op one.
        """
        provider = self.meter_provider
        if provider is None or type(provider).__name__ == "_ProxyMeterProvider":
            provider = metrics.get_meter_provider()  # what the proxy forwards to, once the app sets one
        return type(provider).__name__ not in _NO_OP_METER_PROVIDERS

    def metric_workload(self, workload: str) -> str:
        """``workload``, or ``other`` once :attr:`max_workloads` distinct values reached the metrics."""
        if workload in self._workloads:
            return workload
        if len(self._workloads) < self.max_workloads:
            self._workloads.add(workload)
            return workload
        return "other"

    def metric_tag(self, key: str, value: str | None) -> str | None:
        """A tag's value as a metric attribute, or ``other`` once :attr:`max_workloads` values of its key were."""
        if value is None:
            return None
        seen = self._tag_values[key]
        if value in seen:
            return value
        if len(seen) < self.max_workloads:
            seen.add(value)
            return value
        return "other"

    def record_row(self, row: LedgerRow) -> None:
        """Record the call of ``row`` (only after :meth:`begin_cycle` said measurements are live)."""
        m = measurement(row, self.metric_workload(row.workload or row.service or "unknown"))
        if self.metric_tags:
            tags = row.tags or {}
            m = m._replace(key=(*m.key, *(self.metric_tag(key, tags.get(key)) for key in self.metric_tags)))
        self.record(m)

    def record(self, m: Measurement) -> None:
        """Record one call (only after :meth:`begin_cycle` said measurements are live)."""
        if not self._live:
            return
        records = self._records
        assert records is not None
        record_energy, record_duration, record_tokens, record_ttfc = records
        key = m.key
        attrs = self._attribute_sets.get(key) or self._attribute_set(key)
        ctx = None
        if m.trace_id and m.span_id:
            span_context = SpanContext(m.trace_id, m.span_id, is_remote=False, trace_flags=_SAMPLED)
            ctx = trace.set_span_in_context(NonRecordingSpan(span_context))
        if m.energy_j is not None or m.carbon_mg is not None:
            # counters are summed here and added once per attribute set per cycle (the SDK's cost is per add, and a
            # sum is a sum); histograms keep one record per call, with its exemplar
            sums = self._counter_sums.get(key)
            if sums is None:
                sums = self._counter_sums[key] = [None, None]
            if m.energy_j is not None:
                sums[0] = (sums[0] or 0.0) + m.energy_j
                record_energy(m.energy_j, attrs, ctx)
            if m.carbon_mg is not None:
                sums[1] = (sums[1] or 0.0) + m.carbon_mg
        if self._skip_genai:
            return
        if m.duration_s is not None:
            record_duration(m.duration_s, attrs, ctx)
        # token counts carry no exemplar: a trace is one click away from the energy and duration histograms, and an
        # exemplar offer costs each record a third more
        if m.input_tokens is not None:
            record_tokens(m.input_tokens, self._token_attributes(key, "input"), _NO_SPAN)
        if m.output_tokens is not None:
            record_tokens(m.output_tokens, self._token_attributes(key, "output"), _NO_SPAN)
        if m.ttft_s is not None:
            record_ttfc(m.ttft_s, attrs, ctx)

    def add_counter_sums(self) -> None:
        """Add what the counters summed since the last call: one ``add`` per attribute set."""
        inst = self.instruments
        sums, self._counter_sums = self._counter_sums, {}
        if inst is None:
            return
        for key, (energy, carbon) in sums.items():
            attrs = self._attribute_sets.get(key) or self._attribute_set(key)
            if energy is not None:
                inst.energy.add(energy, attrs)
            if carbon is not None:
                inst.carbon.add(carbon, attrs)

    @property
    def has_sums(self) -> bool:
        """Whether counter sums wait to be added."""
        return bool(self._counter_sums)

    def forget_sums(self) -> None:
        """Drop sums not yet added: after a fork the parent adds them, the child must not add them again."""
        self._counter_sums = {}

    def _attribute_set(self, key: MetricKey) -> dict[str, Any]:
        """The metric attributes of ``key``, built once (the number of distinct sets is bounded)."""
        workload, operation, provider, requested_model, routed_to, tier, region, error_type = key[:8]
        attrs: dict[str, Any] = {attr.JOULE_WORKLOAD: workload}
        for name, value in (
            (attr.GEN_AI_OPERATION_NAME, SEMCONV_OPERATIONS.get(operation or "")),
            (attr.GEN_AI_PROVIDER_NAME, provider),
            (attr.GEN_AI_REQUEST_MODEL, requested_model),
            (attr.GEN_AI_RESPONSE_MODEL, routed_to),
            (attr.JOULE_TIER, tier),
            (attr.JOULE_REGION, region),
            (attr.ERROR_TYPE, error_type),
        ):
            if value is not None:
                attrs[name] = value
        for tag, value in zip(self.metric_tags, key[8:], strict=False):
            if value is not None:
                attrs[TAG_PREFIX + tag] = value
        if len(self._attribute_sets) >= ATTRIBUTE_SETS_CACHED:
            self._attribute_sets.clear()
        self._attribute_sets[key] = attrs
        return attrs

    def _token_attributes(self, key: MetricKey, token_type: str) -> dict[str, Any]:
        token_key = (*key, token_type)
        attrs = self._attribute_sets.get(token_key)
        if attrs is None:
            attrs = {**(self._attribute_sets.get(key) or self._attribute_set(key)), attr.GEN_AI_TOKEN_TYPE: token_type}
            self._attribute_sets[token_key] = attrs
        return attrs
