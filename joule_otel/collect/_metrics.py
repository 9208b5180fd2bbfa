"""Metrics for calls that reach ``collect`` from other languages, each under its own service.

A Node service's calls must show up in Grafana as that service, beside the Python ones: with OTLP metrics
configured, every service gets a MeterProvider of its own whose resource names it (``service.name``), exporting
the way any joule-otel process does. With only a Prometheus endpoint there is one provider (one scrape target):
the calls still count, under ``collect``'s own service, their workload telling them apart.
"""

from __future__ import annotations

import logging
from typing import Any

from opentelemetry import metrics

from joule_otel._config import Settings
from joule_otel._exporters import Providers, otlp_exporter
from joule_otel._instruments import create_instruments
from joule_otel._metrics import MetricRecorder
from joule_otel._version import __version__

_log = logging.getLogger("joule_otel.collect")

MAX_SERVICES = 200
"""Services given a provider of their own; calls of any further service are recorded under ``collect``'s."""


class ServiceRecorders:
    """One :class:`MetricRecorder` per service (OTLP), or a shared one (Prometheus, or no metrics at all)."""

    def __init__(self, settings: Settings, providers: Providers, *, per_service: bool) -> None:
        self.settings = settings
        self.per_service = per_service
        self.shared = self._recorder(providers.meter_provider)
        self._by_service: dict[str, MetricRecorder] = {}
        self._providers: list[Any] = []

    def _recorder(self, meter_provider: Any) -> MetricRecorder:
        meter = metrics.get_meter("joule_otel", __version__, meter_provider=meter_provider)
        return MetricRecorder(
            create_instruments(meter),
            meter_provider,
            mode=self.settings.metrics,
            max_workloads=self.settings.max_workloads,
            metric_tags=self.settings.metric_tags,
        )

    def for_service(self, service: str) -> MetricRecorder | None:
        """The recorder of ``service``'s calls, ready to record (``begin_cycle`` done), or None if nothing is live."""
        recorder = self._by_service.get(service)
        if recorder is None:
            recorder = self.shared
            if self.per_service and len(self._by_service) < MAX_SERVICES:
                recorder = self._by_service[service] = self._recorder(self._provider_for(service))
        return recorder if recorder.begin_cycle() else None

    def _provider_for(self, service: str) -> Any:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.resources import Resource

        exporter = otlp_exporter("metrics", self.settings)  # the same endpoint, protocol and headers as collect's
        readers = [PeriodicExportingMetricReader(exporter)] if exporter is not None else []
        resource = Resource.create({"service.name": service, "joule.collected_by": "joule-otel collect"})
        provider = MeterProvider(metric_readers=readers, resource=resource)
        self._providers.append(provider)
        return provider

    def add_counter_sums(self) -> None:
        """Add what every recorder summed."""
        for recorder in (self.shared, *self._by_service.values()):
            try:
                recorder.add_counter_sums()
            except Exception:
                _log.debug("joule-otel collect: adding counter sums failed", exc_info=True)

    def shutdown(self) -> None:
        """Export and stop the per-service providers."""
        for provider in self._providers:
            try:
                provider.shutdown()
            except Exception:
                _log.debug("joule-otel collect: shutting a meter provider down failed", exc_info=True)
