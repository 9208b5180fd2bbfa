"""joule_otel: see where your joules go.

Joule Cloud bills inference in joules and says so on every response (``X-Energy-Joules``,
``X-Carbon-mg``, ``X-Routed-To``, ``X-Tier``, ``X-Receipt-Id``). One line captures those headers
on every call made through httpx/httpx2, whatever transport runs underneath (the openai SDK, its aiohttp
client, LangChain, litellm, DSPy, plain httpx), records them as OpenTelemetry span attributes and metrics,
and writes every billed call to a local DuckDB ledger::

    import joule_otel

    joule_otel.instrument()

    with joule_otel.workload("support-bot"):
        client.chat.completions.create(model="auto", messages=[...])

    joule_otel.read_ledger()          # a pandas DataFrame of inference_calls

Zero-code: ``opentelemetry-instrument python app.py`` does the same through the ``joule``
instrumentor. ``joule-otel dashboard`` charts the ledger; ``joule-otel collect`` receives OTLP from other
languages and hosts into it; ``joule-otel demo`` shows it all offline.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from joule_otel._tags import tags
from joule_otel._version import __version__
from joule_otel._workload import workload

if TYPE_CHECKING:
    from joule_otel._instrument import flush, instrument, stats, uninstrument
    from joule_otel.ledger._reader import read_calls as read_ledger

# Capture brings in the OpenTelemetry SDK, and reading the ledger DuckDB: neither is loaded until used, so that
# `joule_otel._units`, the simulator or the dashboard (a fresh server's first page) do not pay for them.
_LAZY = {
    "flush": ("joule_otel._instrument", "flush"),
    "instrument": ("joule_otel._instrument", "instrument"),
    "stats": ("joule_otel._instrument", "stats"),
    "uninstrument": ("joule_otel._instrument", "uninstrument"),
    "read_ledger": ("joule_otel.ledger._reader", "read_calls"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'joule_otel' has no attribute {name!r}")
    module, attribute = _LAZY[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "__version__",
    "flush",
    "instrument",
    "read_ledger",
    "stats",
    "tags",
    "uninstrument",
    "workload",
]
