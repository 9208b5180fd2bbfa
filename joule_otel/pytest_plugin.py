"""pytest plugin (registered through the ``pytest11`` entry point): the simulator fixture and an energy check.

The fixture::

    def test_my_bot(joule_simulator):
        client = openai.OpenAI(base_url=joule_simulator.base_url, api_key="jc_test")

The energy check, for a suite that calls Joule Cloud (the simulator or the real endpoint) through any
captured client::

    pytest --joule                              # joules, carbon and calls per test, at the end of the run
    pytest --joule-save energy.json             # store a baseline
    pytest --joule-compare energy.json          # fail a test whose energy grew past the tolerance
    pytest --joule-report energy-report.json    # a JSON report for CI artifacts

    @pytest.mark.joule(max_joules=50)           # a cap on one test, enforced on every run
    def test_summary(): ...

A test's energy is that of the calls that started during its setup and body (``joule_otel.flush()``
runs after each test, so every call has been seen). With pytest-xdist each worker counts its own
tests; the controller merges them for the summary, the baseline and the report. A suite that uses
none of these options or markers is left exactly as it is: nothing is instrumented.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytest

from joule_otel.simulator import Simulator, running

__all__ = ["joule_simulator"]
"""The fixture; the rest is pytest's hooks (``--joule``, ``@pytest.mark.joule``), reached through the entry point."""

REPORT_VERSION = 1
DEFAULT_TOLERANCE = 0.10
DEFAULT_FLOOR_J = 1.0
_STASH = pytest.StashKey["EnergyCheck"]()
_TEST_KEY = "joule_otel.pytest.test"
"""The OpenTelemetry context key holding the running test's node id (a plain string key: no SDK needed)."""


@pytest.fixture
def joule_simulator() -> Iterator[Simulator]:
    """A fresh Joule Cloud simulator on a free loopback port, seeded with 0, instant streaming."""
    with running(seed=0) as sim:
        yield sim


def pytest_addoption(parser: pytest.Parser) -> None:
    """The ``--joule*`` options."""
    group = parser.getgroup("joule", "energy of the Joule Cloud calls each test makes (joule-otel)")
    group.addoption("--joule", action="store_true", help="print joules, carbon and calls per test at the end")
    group.addoption("--joule-top", type=int, default=10, help="tests listed in the summary (default 10)")
    group.addoption("--joule-save", metavar="FILE", help="store each test's energy as a baseline (JSON)")
    group.addoption("--joule-compare", metavar="FILE", help="fail a test whose energy grew past the tolerance")
    group.addoption(
        "--joule-tolerance",
        type=_share,
        default=DEFAULT_TOLERANCE,
        help="growth allowed over the baseline, e.g. 10%% or 0.1 (default 10%%)",
    )
    group.addoption(
        "--joule-floor",
        type=float,
        default=DEFAULT_FLOOR_J,
        help="joules a test may grow by in any case, for tests that use almost nothing (default 1)",
    )
    group.addoption("--joule-report", metavar="FILE", help="write a JSON report (per test, totals, regressions)")


def _share(text: str) -> float:
    try:
        value = float(text.strip().removesuffix("%")) / (100 if text.strip().endswith("%") else 1)
    except ValueError:
        raise pytest.UsageError(f"--joule-tolerance: {text!r} is not a share such as 10% or 0.1") from None
    if value < 0:
        raise pytest.UsageError("--joule-tolerance must not be negative")
    return value


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker; set the check up (it instruments only when a test needs it)."""
    config.addinivalue_line(
        "markers", "joule(max_joules): fail the test when its Joule Cloud calls used more than max_joules"
    )
    config.stash[_STASH] = EnergyCheck(config)


@dataclass
class CallsEnergy:
    """What one test's calls cost."""

    joules: float = 0.0
    carbon_mg: float = 0.0
    calls: int = 0
    calls_by_time: int = 0
    """Of ``calls``, those made where the test's context was not (a thread it started, say, or one an earlier test
    left running): charged to the test during which they started, which may not be the one that caused them."""


class EnergyCheck:
    """Per-test energy: rows from joule-otel's pipeline, attributed by when each call started."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        option = config.option
        self.wanted = bool(option.joule or option.joule_save or option.joule_compare or option.joule_report)
        self.active = False
        self.results: dict[str, CallsEnergy] = {}
        self.regressions: dict[str, str] = {}
        self.baseline: dict[str, dict[str, Any]] = {}
        self._rows: list[tuple[int, float | None, float | None, str | None]] = []
        """(start µs, J, mg, the test whose context made the call or None) of each row heard."""
        self._lock = threading.Lock()
        self._stop_listening: Any = None
        self._started_us: dict[str, int] = {}
        if option.joule_compare:
            path = Path(option.joule_compare)
            try:
                self.baseline = json.loads(path.read_text())["tests"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise pytest.UsageError(f"--joule-compare: cannot read a baseline from {path}: {exc}") from None

    # -- turning capture on only when something asks for it -------------------------------------
    def activate(self) -> None:
        """Hear capture's rows; capture only if the suite has not (and give way when it does, later).

        Called at the first test that needs it, never at collection: a deselected test's marker changes nothing, and
        a suite's own ``instrument(db=...)`` in a fixture or a test is obeyed whenever it runs, its rows heard too.
        """
        from joule_otel._instrument import instrument_provisionally, is_instrumented, listen_to_rows

        if self._stop_listening is None:
            self._stop_listening = listen_to_rows(self._collect)
        if not is_instrumented():
            # the suite has no capture of its own (yet): capture without touching a ledger or a metrics backend
            # unless the environment asks for one (JOULE_OTEL_DB, JOULE_OTEL_METRICS)
            instrument_provisionally(
                db=None if os.environ.get("JOULE_OTEL_DB") else "off",
                metrics=None if os.environ.get("JOULE_OTEL_METRICS") else "none",
            )
        self.active = True

    def _collect(self, rows: list[Any], contexts: list[Any]) -> None:
        from opentelemetry import context as otel_context

        found = [otel_context.get_value(_TEST_KEY, c) if c is not None else None for c in contexts]
        tests: list[str | None] = [t if isinstance(t, str) else None for t in found]
        tests += [None] * (len(rows) - len(tests))
        with self._lock:
            self._rows += [(r.started_at_us, r.energy_j, r.carbon_mg, t) for r, t in zip(rows, tests, strict=True)]

    # -- per test --------------------------------------------------------------------------------
    def start(self, nodeid: str) -> None:
        """A test's setup begins: its calls are those that start from now."""
        self._started_us[nodeid] = time.time_ns() // 1000

    def finish(self, nodeid: str) -> CallsEnergy:
        """The test's body ended: flush, and sum the calls that started since :meth:`start`."""
        import joule_otel

        joule_otel.flush(timeout_s=10)
        since = self._started_us.pop(nodeid, 0)
        with self._lock:
            # a call made in the test's context is the test's, whenever it started; one made elsewhere (a thread)
            # is charged to the test during which it started
            mine = [row for row in self._rows if row[3] == nodeid or (row[3] is None and row[0] >= since)]
            self._rows = [row for row in self._rows if not (row[3] == nodeid or (row[3] is None and row[0] >= since))]
        energy = CallsEnergy(
            joules=sum(row[1] for row in mine if row[1] is not None),
            carbon_mg=sum(row[2] for row in mine if row[2] is not None),
            calls=len(mine),
            calls_by_time=sum(1 for row in mine if row[3] is None),
        )
        self.results[nodeid] = energy
        return energy

    def judge(self, item: pytest.Item, energy: CallsEnergy) -> str | None:
        """Why this test fails on energy (its marker's cap, or growth over the baseline), or None."""
        marker = item.get_closest_marker("joule")
        if marker is not None and "max_joules" in marker.kwargs:
            cap = float(marker.kwargs["max_joules"])
            if energy.joules > cap:
                calls = f"{energy.calls} call{'s' if energy.calls != 1 else ''}"
                return f"energy {energy.joules:,.2f} J is over this test's cap of {cap:,.6g} J ({calls})"
        before = self._baseline_of(item.nodeid)
        if before is not None:
            old = float(before.get("joules", 0.0))
            option = self.config.option
            allowed = max(old * (1 + option.joule_tolerance), old + option.joule_floor)
            if energy.joules > allowed:
                growth = f"+{energy.joules / old - 1:.1%}" if old > 0 else "from nothing"
                reason = (
                    f"energy regression: {old:,.2f} J → {energy.joules:,.2f} J ({growth}; tolerance "
                    f"+{option.joule_tolerance:.0%}, floor {option.joule_floor:g} J; baseline {option.joule_compare})"
                )
                self.regressions[item.nodeid] = reason
                return reason
        return None

    def _baseline_of(self, nodeid: str) -> dict[str, Any] | None:
        """The baseline's entry for a test: by node id, else the one entry that differs only by the rootdir.

        Node ids are relative to pytest's rootdir, which moves when a run is started with paths elsewhere (a
        report in /tmp, say): ``tests/test_x.py::t`` and ``repo/tests/test_x.py::t`` are the same test.
        """
        found = self.baseline.get(nodeid)
        if found is not None:
            return found
        close = [v for k, v in self.baseline.items() if k.endswith("/" + nodeid) or nodeid.endswith("/" + k)]
        return close[0] if len(close) == 1 else None

    # -- the end of the run ----------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """Everything measured, as the JSON report and the baseline store it."""
        total = CallsEnergy(
            joules=sum(e.joules for e in self.results.values()),
            carbon_mg=sum(e.carbon_mg for e in self.results.values()),
            calls=sum(e.calls for e in self.results.values()),
            calls_by_time=sum(e.calls_by_time for e in self.results.values()),
        )
        return {
            "version": REPORT_VERSION,
            "total": asdict(total),
            "tests": {nodeid: asdict(e) for nodeid, e in sorted(self.results.items())},
            "regressions": dict(sorted(self.regressions.items())),
            "tolerance": self.config.option.joule_tolerance,
            "floor_j": self.config.option.joule_floor,
        }

    def merge(self, worker: dict[str, Any]) -> None:
        """A pytest-xdist worker's measurements (each worker counted its own tests, once)."""
        for nodeid, values in worker.get("tests", {}).items():
            self.results[nodeid] = CallsEnergy(**values)
        self.regressions.update(worker.get("regressions", {}))


def _check(config: pytest.Config) -> EnergyCheck:
    return config.stash[_STASH]


def _is_xdist_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    """Mark where the test's calls begin (fixtures' calls count); capture from the first test that needs it."""
    check = _check(item.config)
    if not check.active and (check.wanted or item.get_closest_marker("joule") is not None):
        check.activate()
    if not check.active:
        return (yield)
    check.start(item.nodeid)
    with _in_test_context(item.nodeid):
        return (yield)


@contextmanager
def _in_test_context(nodeid: str) -> Iterator[None]:
    """The test's name in the OpenTelemetry context: its calls (its tasks' too) say whose they are."""
    from opentelemetry import context as otel_context

    token = otel_context.attach(otel_context.set_value(_TEST_KEY, nodeid))
    try:
        yield
    finally:
        otel_context.detach(token)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """After the body: the test's energy; fail it when over its cap or grown past the baseline."""
    check = _check(item.config)
    try:
        if check.active:
            with _in_test_context(item.nodeid):
                result = yield
        else:
            result = yield
    finally:
        energy = check.finish(item.nodeid) if check.active else None
    if energy is not None:
        reason = check.judge(item, energy)
        if reason is not None:
            pytest.fail(reason, pytrace=False)
    return result


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Workers hand their figures to the controller; the controller (or a plain run) saves and reports."""
    config = session.config
    check = _check(config)
    if _is_xdist_worker(config):
        config.workeroutput["joule"] = json.dumps(check.report())  # type: ignore[attr-defined]
        return
    if check._stop_listening is not None:
        check._stop_listening()
    report = check.report()
    option = config.option
    if option.joule_save:
        Path(option.joule_save).write_text(json.dumps({**report, "regressions": {}}, indent=2) + "\n")
    if option.joule_report:
        Path(option.joule_report).write_text(json.dumps(report, indent=2) + "\n")


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """pytest-xdist: a worker finished; merge what it measured."""
    output = getattr(node, "workeroutput", {}).get("joule")
    if output:
        _check(node.config).merge(json.loads(output))


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """``--joule``: the top tests by energy, and the totals."""
    check = _check(config)
    if not (config.option.joule or config.option.joule_compare) or not check.results:
        return
    from joule_otel._units import carbon, energy

    results = check.results
    top = sorted(results.items(), key=lambda kv: kv[1].joules, reverse=True)[: max(config.option.joule_top, 0)]
    write = terminalreporter.write_line
    terminalreporter.section("joule energy")
    width = min(max((len(nodeid) for nodeid, _ in top), default=10), 80)
    write(f"{'test':<{width}}  {'calls':>6}  {'energy':>10}  {'carbon':>16}")
    for nodeid, e in top:
        name = nodeid if len(nodeid) <= width else "…" + nodeid[-(width - 1) :]
        write(f"{name:<{width}}  {e.calls:>6}  {energy(e.joules):>10}  {carbon(e.carbon_mg):>16}")
    total = check.report()["total"]
    write(
        f"total: {total['calls']} calls, {energy(total['joules'])}, {carbon(total['carbon_mg'])} "
        f"in {len(results)} tests"
    )
    by_time = total.get("calls_by_time", 0)
    if by_time:
        write(
            f"{by_time} call{'s' if by_time != 1 else ''} made outside a test's context (threads) "
            "charged to the test running when they started"
        )
    for nodeid, reason in check.regressions.items():
        write(f"REGRESSION {nodeid}: {reason}", red=True)
