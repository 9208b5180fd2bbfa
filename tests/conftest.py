from __future__ import annotations

import importlib
import os
import runpy
import subprocess
import sys
import tracemalloc  # noqa: F401 - pytest imports it inside its unraisable-exception hook, which can run mid-import
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import hypothesis.strategies  # noqa: F401 - import before any test starts threads (CPython 3.11.7 AST race)
import pytest
from hypothesis import HealthCheck, settings
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import joule_otel


def _import_every_module() -> None:
    """Import all of joule_otel now, on the main thread, before any test starts a thread.

    pytest rewrites the asserts of every module of a distribution that registers a plugin (ours does), and parsing
    a module on one thread while another parses (CPython 3.11.7: "AST constructor recursion depth mismatch") fails
    an import at random: a module the ledger thread imports lazily met one a test imported.
    """
    import logging
    import pkgutil

    logging.disable(logging.WARNING)  # Streamlit's caches say at import that no app runs: none is meant to
    try:
        for module in pkgutil.walk_packages(joule_otel.__path__, "joule_otel."):
            if module.name != "joule_otel.dashboard.app":  # a Streamlit script: it draws the page when imported
                importlib.import_module(module.name)
    finally:
        logging.disable(logging.NOTSET)


_import_every_module()

CLOCK = Path(__file__).resolve().parent / "clock"
if os.environ.get("JOULE_OTEL_TEST_CLOCK"):  # the suite run with its clock moved (see tests/clock/sitecustomize.py)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CLOCK), os.environ.get("PYTHONPATH")]))
    if not getattr(sys.modules.get("sitecustomize"), "_days", ""):  # not already moved at start-up
        runpy.run_path(str(CLOCK / "sitecustomize.py"))

# Property tests check what is computed, never how fast: on a shared machine a draw can stall for seconds (another
# test's subprocess, a full collection), and Hypothesis's timing checks then fail a correct test at random.
settings.register_profile("joule_otel", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("joule_otel")

FAILURES = Path(__file__).resolve().parent.parent / "test-artifacts" / "failures.txt"
"""Every failed test of the last run, with its report: a run whose output is cut short (a fresh-clone check that
prints only its last lines, a CI log) still leaves what failed and why in the checkout."""
_failed_reports: list[str] = []


def pytest_sessionstart(session: pytest.Session) -> None:
    FAILURES.unlink(missing_ok=True)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.failed:
        _failed_reports.append(f"FAILED {report.nodeid} ({report.when})\n{report.longreprtext}\n")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _failed_reports:
        FAILURES.parent.mkdir(exist_ok=True)
        FAILURES.write_text("\n".join(_failed_reports))


@dataclass
class Telemetry:
    db: Path
    metrics: InMemoryMetricReader
    spans: InMemorySpanExporter
    tracer_provider: TracerProvider
    meter_provider: MeterProvider

    def metric_points(self, name: str) -> list:
        data = self.metrics.get_metrics_data()
        points = []
        for rm in data.resource_metrics if data else []:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    if metric.name == name:
                        points.extend(metric.data.data_points)
        return points

    def metric_units(self) -> dict[str, str]:
        data = self.metrics.get_metrics_data()
        return {m.name: m.unit for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    return tmp_path / "ledger" / "joule.duckdb"


@pytest.fixture
def telemetry(ledger_path: Path) -> Iterator[Telemetry]:
    """instrument() with in-memory OTel readers and a real ledger file; uninstrumented afterwards."""
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    joule_otel.instrument(
        db=ledger_path, flush_interval=0.2, tracer_provider=tracer_provider, meter_provider=meter_provider
    )
    try:
        yield Telemetry(ledger_path, reader, exporter, tracer_provider, meter_provider)
    finally:
        joule_otel.uninstrument()
        meter_provider.shutdown()
        tracer_provider.shutdown()


@pytest.fixture
def ledger_only(ledger_path: Path) -> Iterator[Path]:
    """instrument() with no tracing configured: ledger and (proxy) metrics only."""
    joule_otel.instrument(db=ledger_path, flush_interval=0.2)
    try:
        yield ledger_path
    finally:
        joule_otel.uninstrument()


@pytest.fixture
def scripted():
    """A loopback server answering every request as the test scripts :class:`support.Scripted` to."""
    from support import serve_scripted

    base_url, stop = serve_scripted()
    yield base_url
    stop()


@pytest.fixture
def small_disk(tmp_path, request):
    """A small tmpfs (4 MiB unless parametrized indirectly with another size): a real device that runs out of space."""
    mount = tmp_path / "small"
    mount.mkdir()
    size = getattr(request, "param", "4m")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"cannot mount a tmpfs for the disk-full test: {result.stderr!r}")
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
