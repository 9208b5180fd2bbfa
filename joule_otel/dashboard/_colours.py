"""One colour per workload, model, region, tier, service and provider, the same on every chart, tab and range.

Colours are given in the sorted order of every value the ledger holds (not the values a range or filter shows), so
``support-bot`` keeps its colour when the range changes, on every tab and across reruns; a value that appears later
in the ledger may shift the colours after it once. ``auto``, asked for rather than served, is grey.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from plotly.colors import qualitative

PALETTE: tuple[str, ...] = tuple(qualitative.Plotly) + tuple(qualitative.Dark24)
"""Plotly's default ten first (what a chart without this module shows), then 24 more that stay apart on white."""
ASKED_FOR_AUTO = "#9e9e9e"
UNKNOWN = "#bdbdbd"

DIMENSION_OF = {
    "workload": "workload",
    "model": "model",
    "routed_to": "model",
    "requested model": "model",
    "requested_model": "model",
    "region": "region",
    "tier": "tier",
    "service": "service",
    "provider": "provider",
}
"""A chart's split (a dashboard dimension or a ledger column) → the set of values whose colours it uses."""


class Colours:
    """The colour of each value, per dimension, from the ledger's full lists of values."""

    def __init__(self, values: dict[str, Iterable[Any]]) -> None:
        self._of: dict[str, dict[str, str]] = {
            dimension: {str(v): PALETTE[i % len(PALETTE)] for i, v in enumerate(sorted({str(v) for v in found}))}
            for dimension, found in values.items()
        }

    @classmethod
    def from_options(cls, opts: dict[str, Any]) -> Colours:
        """From :func:`~joule_otel.dashboard._queries.options` (every value in the ledger, whatever is shown)."""
        return cls(
            {
                "workload": opts.get("workloads", []),
                "model": opts.get("models", []),
                "region": opts.get("regions", []),
                "tier": opts.get("tiers", []),
                "service": opts.get("services", []),
                "provider": opts.get("providers", []),
            }
        )

    def of(self, dimension: str, value: Any) -> str:
        """The colour of ``value`` (as the ledger holds it, before escaping) in ``dimension``."""
        if value == "auto" and DIMENSION_OF.get(dimension) == "model":
            return ASKED_FOR_AUTO
        known = self._of.get(DIMENSION_OF.get(dimension, dimension), {})
        found = known.get(str(value))
        if found is not None:
            return found
        # a value not in the ledger's lists (a model only ever asked for): a colour of its own, stable by name
        return PALETTE[(len(known) + sum(map(ord, str(value)))) % len(PALETTE)] if value is not None else UNKNOWN


NO_COLOURS = Colours({})
"""For a chart drawn without the ledger's lists: every value still gets a stable colour."""
