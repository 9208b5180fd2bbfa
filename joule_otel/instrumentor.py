"""The ``joule`` OpenTelemetry instrumentor, for zero-code use under ``opentelemetry-instrument``.

Configured by environment variables alone (``JOULE_OTEL_*``, ``OTEL_*``), like every instrumentor
that ``opentelemetry-instrument`` loads.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]

from joule_otel import _instrument

__all__ = ["JouleInstrumentor"]


class JouleInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Captures Joule Cloud calls made through httpx/httpx2 (and the aiohttp-backed transports on them)."""

    def instrumentation_dependencies(self) -> Collection[str]:
        """Nothing beyond joule-otel's own requirements: httpx and httpx2 are captured when present."""
        return ()

    def _instrument(self, **kwargs: Any) -> None:
        _instrument.instrument(
            tracer_provider=kwargs.get("tracer_provider"), meter_provider=kwargs.get("meter_provider")
        )

    def _uninstrument(self, **kwargs: Any) -> None:
        _instrument.uninstrument()
