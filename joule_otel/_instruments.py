"""Every metric joule_otel records, defined once with its UCUM unit, description and buckets."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from opentelemetry.metrics import CallbackOptions, Counter, Histogram, Meter, Observation

ENERGY = "joule.client.energy"
CARBON = "joule.client.carbon"
REQUEST_ENERGY = "joule.client.request.energy"
OPERATION_DURATION = "gen_ai.client.operation.duration"
TOKEN_USAGE = "gen_ai.client.token.usage"
TIME_TO_FIRST_CHUNK = "gen_ai.client.operation.time_to_first_chunk"
BUDGET_LIMIT = "joule.budget.limit"
BUDGET_SPENT = "joule.budget.spent"
BUDGET_REMAINING = "joule.budget.remaining"
BUDGET_REFUSALS = "joule.budget.refusals"

GEN_AI_METRICS = (OPERATION_DURATION, TOKEN_USAGE, TIME_TO_FIRST_CHUNK)
"""Metrics another GenAI instrumentation may already record; recorded here only when none does."""

ENERGY_BUCKETS_J = (0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000)
"""An embedding is a fraction of a joule; a long 405B answer thousands."""

DURATION_BUCKETS_S = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
"""The GenAI semantic conventions' advice for ``gen_ai.client.operation.duration``."""

TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
"""The GenAI semantic conventions' advice for ``gen_ai.client.token.usage``."""

TTFC_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
"""Time to first chunk: from cache hits (ms) to cold prefill of long prompts (s)."""


@dataclass(frozen=True)
class Instruments:
    """The instruments of one meter."""

    energy: Counter
    carbon: Counter
    request_energy: Histogram
    duration: Histogram
    token_usage: Histogram
    time_to_first_chunk: Histogram


def create_instruments(meter: Meter) -> Instruments:
    """Create every joule_otel instrument on ``meter``."""
    return Instruments(
        energy=meter.create_counter(ENERGY, unit="J", description="Energy billed by Joule Cloud for inference calls."),
        carbon=meter.create_counter(CARBON, unit="mg", description="Carbon (mg CO2e) of the energy billed."),
        request_energy=meter.create_histogram(
            REQUEST_ENERGY,
            unit="J",
            description="Energy billed per inference call.",
            explicit_bucket_boundaries_advisory=list(ENERGY_BUCKETS_J),
        ),
        duration=meter.create_histogram(
            OPERATION_DURATION,
            unit="s",
            description="GenAI operation duration.",
            explicit_bucket_boundaries_advisory=list(DURATION_BUCKETS_S),
        ),
        token_usage=meter.create_histogram(
            TOKEN_USAGE,
            unit="{token}",
            description="Measures number of input and output tokens used.",
            explicit_bucket_boundaries_advisory=list(TOKEN_BUCKETS),
        ),
        time_to_first_chunk=meter.create_histogram(
            TIME_TO_FIRST_CHUNK,
            unit="s",
            description="Time to receive the first chunk of a streamed response.",
            explicit_bucket_boundaries_advisory=list(TTFC_BUCKETS_S),
        ),
    )


BudgetCallback = Callable[[CallbackOptions], Iterable[Observation]]


def create_budget_gauges(
    meter: Meter, *, limit: BudgetCallback, spent: BudgetCallback, remaining: BudgetCallback
) -> None:
    """The ``joule.budget.*`` gauges, observed through the callbacks."""
    meter.create_observable_gauge(
        BUDGET_LIMIT, callbacks=[limit], unit="J", description="Monthly energy budget of a workload."
    )
    meter.create_observable_gauge(
        BUDGET_SPENT,
        callbacks=[spent],
        unit="J",
        description="Energy a workload used this UTC month (ledger + process).",
    )
    meter.create_observable_gauge(
        BUDGET_REMAINING, callbacks=[remaining], unit="J", description="Energy left in a workload's monthly budget."
    )


def create_refusals_counter(meter: Meter) -> Counter:
    """``joule.budget.refusals``: calls refused with 402 ``insufficient_balance``, per workload."""
    return meter.create_counter(
        BUDGET_REFUSALS,
        unit="{call}",
        description="Calls Joule Cloud refused with 402 insufficient_balance (the account's or the key's budget).",
    )
