"""The budget watch at scale: many budgets against many workloads."""

from __future__ import annotations

import time
from typing import Any


def budget_watch(budgets: int, workloads: int) -> list[dict[str, object]]:
    """The budget watch at scale: what a drain, a full check (after the ledger's minute read) and a gauge export cost."""
    from joule_otel._budget_watch import BudgetWatch, _with_workload_totals
    from joule_otel._budgets import Budget
    from joule_otel.ledger._row import LedgerRow

    watch = BudgetWatch([Budget(f"w{i}", 1e12) for i in range(budgets)], (0.8, 1.0), None)
    watch._ledger = _with_workload_totals({(f"w{i}", "api"): 1.0 for i in range(workloads)})
    now_us = time.time_ns() // 1000
    row = LedgerRow(*([None] * 22))._replace(started_at_us=now_us, energy_j=2.0, service="api")
    drain = [row._replace(workload=f"w{i * 37 % workloads}") for i in range(200)]

    def best(run: Any, repeat: int) -> float:
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        return min(times)

    label = f"{budgets:,} budgets × {workloads:,} workloads"
    return [
        {
            "case": label,
            "step": "a drain of 200 rows (every 50 ms while calls flow)",
            "ms": best(lambda: watch.observe(drain), 50) * 1000,
        },
        {
            "case": label,
            "step": "every budget checked (after the ledger's once-a-minute read)",
            "ms": best(watch.check, 5) * 1000,
        },
        {"case": label, "step": "the gauges' callback (each metric export)", "ms": best(watch.observations, 5) * 1000},
    ]
