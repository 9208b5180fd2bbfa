"""Budgets that warn before the 402: month-to-date energy per budget, watched on the background thread.

Month to date is what the ledger holds for this UTC month (every process that writes to it, read at
most once a minute, from the hourly rollup where it can) plus what this process has captured since
that read. Crossing a threshold (80 % and 100 % by default) logs one warning per budget, threshold and
month; a 402 ``insufficient_balance`` logs one per workload and hour, with its month to date and
budget. Gauges (``joule.budget.*``) carry the same state to any metrics backend. Nothing here runs on
the app's threads, and nothing here ever raises into them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from joule_otel import _attributes as attr
from joule_otel._budgets import Budget
from joule_otel._units import energy as energy_text
from joule_otel.ledger._row import LedgerRow

_log = logging.getLogger("joule_otel")

REFRESH_S = 60.0
"""How often the ledger's month to date is read again (other processes' calls arrive through it)."""
REFUSED = "insufficient_balance"

Key = tuple[str | None, str | None]
"""(workload, service) of the calls a sum covers; service :data:`_ALL` for every service of the workload."""
_ALL = "\x00all"
"""A service no label can be (labels are cleaned of control characters): the key of a workload's total."""


def _month_of(moment: datetime) -> tuple[int, int]:
    return moment.year, moment.month


def month_start(now: datetime) -> datetime:
    """Midnight UTC of the first day of ``now``'s month."""
    return now.astimezone(timezone.utc).replace(day=1, hour=0, minute=0, second=0, microsecond=0)


class BudgetWatch:
    """Month-to-date energy per (workload, service), the budgets' thresholds, the 402 warnings and the gauges."""

    def __init__(
        self,
        budgets: list[Budget],
        thresholds: tuple[float, ...],
        db_path: Path | None,
        *,
        count_refusal: Callable[[str], None] | None = None,
    ) -> None:
        self.budgets = budgets
        self._by_workload: dict[str | None, list[Budget]] = {}
        for budget in budgets:
            self._by_workload.setdefault(budget.workload, []).append(budget)
        self.count_refusal = count_refusal
        """Adds one to the ``joule.budget.refusals`` counter for a workload (None: metrics are off)."""
        self.thresholds = thresholds
        self.db_path = db_path
        self._month = _month_of(datetime.now(timezone.utc))
        self._ledger: dict[Key, float] = {}
        self._local: dict[Key, float] = {}
        self._warned: set[tuple[Budget, float]] = set()
        self._refusals_warned: dict[str, float] = {}
        self._last_read = float("-inf")
        self.refusals: dict[str, int] = {}
        """402 refusals per workload seen by this process (the ``joule.budget.refusals`` counter adds them)."""

    # -- state ---------------------------------------------------------------------------------
    def spent_j(self, workload: str | None, service: str | None = None) -> float:
        """Month-to-date joules of a workload (on one service, or all when ``service`` is None).

        Sums are kept per (workload, service) and per workload alike, so this is two lookups whatever the number
        of budgets and workloads.
        """
        key = (workload, service) if service is not None else (workload, _ALL)
        return self._ledger.get(key, 0.0) + self._local.get(key, 0.0)

    def budget_for(self, workload: str | None, service: str | None) -> Budget | None:
        """The budget that covers calls of this workload and service (one of that service first)."""
        mine = self._by_workload.get(workload, ())
        return next((b for b in mine if b.service == service), None) or next(
            (b for b in mine if b.service is None), None
        )

    # -- the background thread's side -----------------------------------------------------------
    def _roll_month(self, now: datetime) -> None:
        month = _month_of(now)
        if month != self._month:
            self._month = month
            self._ledger.clear()
            self._local.clear()
            self._warned.clear()
            self._last_read = float("-inf")

    def observe(self, rows: Iterable[LedgerRow]) -> None:
        """Add this cycle's rows (this month's) to the local sums; warn on 402s and crossed thresholds."""
        now = datetime.now(timezone.utc)
        self._roll_month(now)
        start_us = int(month_start(now).timestamp() * 1_000_000)
        refused: list[LedgerRow] = []
        changed: set[str | None] = set()
        local = self._local
        for row in rows:
            if row.error_type == REFUSED:
                refused.append(row)
            if row.energy_j and row.started_at_us >= start_us:
                changed.add(row.workload)
                for key in ((row.workload, row.service), (row.workload, _ALL)):
                    local[key] = local.get(key, 0.0) + row.energy_j
        for row in refused:
            self._refused(row)
        self.check(changed)

    def refresh(self, *, nothing_pending: bool) -> None:
        """Read the ledger's month to date again, at most every :data:`REFRESH_S`.

        Only when every row this process captured is on disk (``nothing_pending``): the read then holds
        them, and the local sums start again from zero, so no call is counted twice or missed.
        """
        if self.db_path is None or not nothing_pending or time.monotonic() - self._last_read < REFRESH_S:
            return
        if not self.budgets and not self.refusals:
            return
        now = datetime.now(timezone.utc)
        self._roll_month(now)
        self._last_read = time.monotonic()
        try:
            read = ledger_month_to_date(self.db_path, month_start(now))
        except Exception:  # a busy or unreadable ledger: keep the last figures and try again later
            _log.debug("joule_otel: reading month-to-date energy failed", exc_info=True)
            return
        self._ledger, self._local = _with_workload_totals(read), {}
        self.check()

    def check(self, workloads: Iterable[str | None] | None = None) -> None:
        """Log one warning per budget and threshold crossed this month (of ``workloads`` only, when given).

        A drain checks the budgets of the workloads its rows touched: O(changed workloads), never every budget
        against every workload while the app's calls wait for the GIL.
        """
        budgets = self.budgets if workloads is None else [b for w in workloads for b in self._by_workload.get(w, ())]
        for budget in budgets:
            spent = self.spent_j(budget.workload, budget.service)
            for share in self.thresholds:
                if spent >= budget.joules * share and (budget, share) not in self._warned:
                    self._warned.add((budget, share))
                    _log.warning(
                        "joule_otel: workload %s has used %.0f%% of its monthly energy budget (%s of %s this month); "
                        "warning at %.0f%%",
                        budget.label,
                        100 * spent / budget.joules,
                        energy_text(spent),
                        energy_text(budget.joules),
                        100 * share,
                    )

    def _refused(self, row: LedgerRow) -> None:
        workload = row.workload or "(no workload)"
        self.refusals[workload] = self.refusals.get(workload, 0) + 1
        if self.count_refusal is not None:
            self.count_refusal(workload)
        now = time.monotonic()
        if now - self._refusals_warned.get(workload, float("-inf")) < 3600:
            return
        self._refusals_warned[workload] = now
        budget = self.budget_for(row.workload, row.service)
        spent = self.spent_j(workload, budget.service if budget else None)
        _log.warning(
            "joule_otel: Joule Cloud refused a call of workload %s with 402 insufficient_balance; its energy this "
            "month is %s, %s (further 402s of this workload are counted, and said again in an hour)",
            workload,
            energy_text(spent),
            f"its budget {energy_text(budget.joules)}"
            if budget
            else "and it has no budget in JOULE_OTEL_BUDGETS: the account's balance or the key's own budget ran out",
        )

    # -- gauges (called by the metric reader's thread) -------------------------------------------
    def observations(self) -> list[tuple[Budget, float]]:
        """Each budget with its month-to-date joules."""
        return [(b, self.spent_j(b.workload, b.service)) for b in self.budgets]


def _with_workload_totals(sums: dict[Key, float]) -> dict[Key, float]:
    """Per (workload, service) sums, and per workload (service :data:`_ALL`) beside them."""
    found = dict(sums)
    for (workload, _), joules in sums.items():
        found[(workload, _ALL)] = found.get((workload, _ALL), 0.0) + joules
    return found


def budget_attributes(budget: Budget) -> dict[str, Any]:
    """The attributes a budget's gauges carry: its workload, and its service when it covers one only."""
    values: dict[str, Any] = {attr.JOULE_WORKLOAD: budget.workload}
    if budget.service is not None:
        values[attr.JOULE_BUDGET_SERVICE] = budget.service
    return values


def ledger_month_to_date(db_path: Path, start: datetime) -> dict[Key, float]:
    """Joules per (workload, service) since ``start`` (an hour boundary) in the ledger, from the rollup where it can."""
    from joule_otel.ledger import _reader as reader

    with reader.connect(db_path, timeout_s=1.0) as con:
        has_rollup = (
            con.execute("SELECT count(*) FROM duckdb_views() WHERE view_name = 'calls_rollup'").fetchone() or (0,)
        )[0]
        source = (
            "(SELECT workload, service, energy_j FROM calls_rollup WHERE hour >= $1 "
            "UNION ALL SELECT workload, service, energy_j FROM pending_calls WHERE started_at >= $1)"
            if has_rollup
            else "(SELECT workload, service, energy_j FROM inference_calls WHERE started_at >= $1)"
        )
        found = con.execute(
            f"SELECT workload, service, sum(energy_j) FROM {source} WHERE energy_j IS NOT NULL GROUP BY ALL", [start]
        ).fetchall()
    return {(w, s): float(j) for w, s, j in found}
