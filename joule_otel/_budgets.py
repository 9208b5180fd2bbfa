"""Energy budgets: one file, read by the dashboard, the in-app warnings and gauges, and the Prometheus rules.

A budget is joules per UTC calendar month for a workload, optionally for one service only. The file
(``JOULE_OTEL_BUDGETS``) is JSON, TOML or CSV::

    {"support-bot": 150000, "nightly-summaries": {"joules": 400000, "service": "reports"}}

    # TOML: a table of numbers, or [[budget]] entries
    [budgets]
    support-bot = 150000
    [[budget]]
    workload = "nightly-summaries"
    service = "reports"
    joules = 400000

    workload,budget_j,service          # CSV; service may be left empty
    support-bot,150000,

No OpenTelemetry import here: this module is a leaf the dashboard and the CLI load on their own.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path
from typing import Any, NamedTuple

from joule_otel._config import JOULE_OTEL_BUDGET_THRESHOLDS, JOULE_OTEL_BUDGETS
from joule_otel._headers import clean_string

DEFAULT_THRESHOLDS = (0.8, 1.0)
"""Shares of a budget at which a warning is logged (and alert rules fire): 80 % and 100 %."""


class Budget(NamedTuple):
    """Joules a workload may use per UTC month (on one service, or on all when ``service`` is None)."""

    workload: str
    joules: float
    service: str | None = None

    @property
    def label(self) -> str:
        """``support-bot``, or ``support-bot @ support-api`` for a budget of one service."""
        return self.workload if self.service is None else f"{self.workload} @ {self.service}"


def budget(name: Any, value: Any, where: str) -> Budget:
    """One budget from a name and a number (or a table with ``joules``/``budget_j`` and ``service``).

    Names are cleaned as workloads are (trimmed, control characters removed, capped), so a budget matches the
    workload a call is recorded under. ``where`` says where the entry came from, for the error.

    Raises:
        ValueError: an empty name, a service that is not a name, or joules that are not a finite positive number.
    """
    service = None
    if isinstance(value, dict):
        service = value.get("service") or None
        if service is not None and not isinstance(service, str):
            raise ValueError(f"service of budget {name!r} in {where} must be a name, not {service!r}")
        value = value.get("joules", value.get("budget_j"))
    joules = _joules(value)
    if joules is None:
        raise ValueError(f"budget of {name!r} in {where} must be a positive number of joules, not {value!r}")
    workload = clean_string(name) if isinstance(name, str) else None
    if workload is None:
        raise ValueError(f"a budget in {where} has no workload name ({name!r})")
    return Budget(workload, joules, clean_string(service))


def _joules(value: Any) -> float | None:
    """A finite positive number of joules (a number, or a decimal text as CSV gives), else ``None``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        joules = float(value)
    except (ValueError, OverflowError):  # a 400-digit integer does not fit a float
        return None
    return joules if 0 < joules < float("inf") else None


def load_budgets(path: str | os.PathLike[str] | None = None) -> list[Budget]:
    """The budgets of a JSON, TOML or CSV file (``JOULE_OTEL_BUDGETS`` when no path is given; none if unset).

    Raises:
        ValueError: the file cannot be read as budgets (the message says which entry and why).
    """
    if path is None:
        configured = os.environ.get(JOULE_OTEL_BUDGETS, "").strip()
        if not configured:
            return []
        path = configured
    file = Path(path).expanduser()
    try:
        text = file.read_text(encoding="utf-8-sig")  # a spreadsheet's CSV starts with a byte-order mark
    except UnicodeDecodeError:
        raise ValueError(f"budgets file {file} is not UTF-8 text") from None
    except OSError as exc:
        raise ValueError(f"cannot read budgets file {file}: {exc.strerror or exc}") from None
    entries: list[tuple[str, Any]] = []
    try:
        suffix = file.suffix.lower()
        if suffix == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # Python 3.10: the same parser, from PyPI
                import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

            raw = tomllib.loads(text)
            table = raw.get("budgets", {k: v for k, v in raw.items() if k != "budget"})
            entries += list(table.items()) if isinstance(table, dict) else []
            for item in raw.get("budget", []):
                entries.append((item.get("workload", ""), item))
        elif suffix == ".csv":
            for row in csv.DictReader(text.splitlines()):
                entries.append((row["workload"], {"joules": row["budget_j"], "service": row.get("service") or None}))
        else:
            raw = json.loads(text)
            if isinstance(raw, list):
                if not all(isinstance(item, dict) for item in raw):
                    raise ValueError('a list holds objects such as {"workload": "bot", "joules": 1000}')
                entries += [(item.get("workload", ""), item) for item in raw]
            elif isinstance(raw, dict):
                entries += list(raw.items())
            else:
                raise ValueError("it must map workload names to joules")
    except RecursionError:
        raise ValueError(f"budgets file {file} is not valid: nested too deeply") from None
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as exc:
        raise ValueError(f"budgets file {file} is not valid: {exc}") from None
    budgets = [budget(name, value, str(file)) for name, value in entries]
    return _unique(budgets, f"budgets file {file}")


def _unique(budgets: list[Budget], where: str) -> list[Budget]:
    seen: set[tuple[str, str | None]] = set()
    for found in budgets:
        key = (found.workload, found.service)
        if key in seen:
            raise ValueError(f"{where} names {found.label} twice")
        seen.add(key)
    return budgets


def budgets_of(mapping: dict[Any, Any]) -> list[Budget]:
    """``instrument(budgets={workload: joules})`` as budgets; ``ValueError`` for any entry that is not one."""
    return _unique([budget(name, value, "budgets=") for name, value in mapping.items()], "budgets=")


def parse_thresholds(raw: str | None) -> tuple[float, ...]:
    """``"0.8,1"`` (or ``"80%,100%"``) → ``(0.8, 1.0)``; empty → :data:`DEFAULT_THRESHOLDS`.

    Raises:
        ValueError: a share that is not a number in (0, 10].
    """
    if raw is None or not raw.strip():
        return DEFAULT_THRESHOLDS
    shares = []
    for part in raw.split(","):
        text = part.strip()
        try:
            share = float(text.removesuffix("%")) / (100 if text.endswith("%") else 1)
        except ValueError:
            raise ValueError(f"{JOULE_OTEL_BUDGET_THRESHOLDS}: {text!r} is not a share such as 0.8 or 80%") from None
        if not 0 < share <= 10:
            raise ValueError(f"{JOULE_OTEL_BUDGET_THRESHOLDS}: {text!r} is not a share in (0, 10]")
        shares.append(share)
    return tuple(sorted(set(shares)))


SPENT_METRIC = "joule_budget_spent_joules"
"""``joule.budget.spent`` as Prometheus names it (OTLP through the Collector, or the app's own endpoint)."""
REFUSALS_METRIC = "joule_budget_refusals_total"
SPENT_RECORD = "joule:budget_spent:joules"
BURN_RECORD = "joule:budget_burn_rate:joules_per_second"


def _matcher(budget: Budget) -> str:
    # an absent label matches "": a budget of every service is the series without joule_budget_service
    return f"joule_workload={json.dumps(budget.workload)}, joule_budget_service={json.dumps(budget.service or '')}"


def _yaml_text(value: str) -> str:
    return json.dumps(value)  # a JSON string is a YAML double-quoted scalar


def prometheus_rules(
    budgets: list[Budget],
    *,
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS,
    exhaustion_days: float = 7.0,
    burn_window: str = "6h",
) -> str:
    """Prometheus recording and alerting rules (YAML) for these budgets.

    Recording: month-to-date joules per budget (the largest any process reports: every process reads the
    same ledger) and its burn rate over ``burn_window``. Alerting, per budget: one per threshold (warning
    below 100 %, critical from it), a critical one when the burn rate would spend what is left within
    ``exhaustion_days``; and one for any 402 ``insufficient_balance``, whatever the budgets.
    """
    lines = [
        "# Generated by `joule-otel budgets rules` from the budgets file: regenerate it when the budgets change.",
        "groups:",
        "  # one group: its rules run in order, so each alert reads the month to date recorded at the same evaluation",
        "  - name: joule-otel-budgets",
        "    rules:",
        f"      - record: {SPENT_RECORD}",
        f"        expr: max by (joule_workload, joule_budget_service) ({SPENT_METRIC})",
        f"      - record: {BURN_RECORD}",
        f"        expr: clamp_min(deriv({SPENT_RECORD}[{burn_window}]), 0)",
        "      - alert: JouleInsufficientBalance",
        # a counter's first sample is no increase: a series that appeared in the window counts too
        f"        expr: sum by (joule_workload) (increase({REFUSALS_METRIC}[10m])) > 0 or sum by (joule_workload) "
        f"({REFUSALS_METRIC} unless {REFUSALS_METRIC} offset 10m) > 0",
        "        labels:",
        "          severity: critical",
        "        annotations:",
        '          summary: "Joule Cloud refused calls of {{ $labels.joule_workload }} with 402 insufficient_balance"',
        '          description: "{{ $value | humanize }} calls refused in 10 minutes: the account balance or the API '
        "key's energy budget ran out.\"",
    ]
    for budget in budgets:
        spent = f"{SPENT_RECORD}{{{_matcher(budget)}}}"
        for share in thresholds:
            lines += [
                "      - alert: JouleEnergyBudgetThreshold",
                f"        expr: {spent} >= {budget.joules * share!r}",
                "        labels:",
                f"          severity: {'critical' if share >= 1 else 'warning'}",
                f"          threshold: {_yaml_text(f'{share:.0%}')}",
                f"          budget_joules: {_yaml_text(repr(budget.joules))}",
                "        annotations:",
                f"          summary: {_yaml_text(f'{budget.label} has used {share:.0%} of its monthly energy budget')}",
                "          description: "
                + _yaml_text(f"{{{{ $value | humanize }}}} J of {budget.joules:g} J used this month."),
            ]
        lines += [
            "      - alert: JouleEnergyBudgetExhaustionProjected",
            f"        expr: ({budget.joules!r} - {spent}) / {BURN_RECORD}{{{_matcher(budget)}}}"
            f" < {exhaustion_days * 86400:g} and {spent} < {budget.joules!r}",
            "        labels:",
            "          severity: critical",
            f"          budget_joules: {_yaml_text(repr(budget.joules))}",
            "        annotations:",
            "          summary: "
            + _yaml_text(f"{budget.label} will spend its energy budget within {exhaustion_days:g} days"),
            "          description: "
            + _yaml_text("At the burn rate of the last " + burn_window + ", {{ $value | humanizeDuration }} are left."),
        ]
    return "\n".join(lines) + "\n"
