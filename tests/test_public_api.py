"""The public surface is exactly what ``joule_otel`` exports: a sorted ``__all__``, internal modules named as such."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import joule_otel


def test_all_is_sorted_and_complete():
    assert joule_otel.__all__ == sorted(joule_otel.__all__)
    public = {name for name in vars(joule_otel) if not name.startswith("_") and name != "annotations"}
    modules = {name for name, value in vars(joule_otel).items() if type(value).__name__ == "module"}
    assert set(joule_otel.__all__) - {"__version__"} == public - modules


def test_internal_modules_are_named_as_internal():
    """Modules with no public role start with an underscore (httpx's and Logfire's convention)."""
    public_modules = {
        "attributes",  # attribute keys users filter on
        "budgets",  # the budgets file, read by the app, the dashboard and `joule-otel budgets`
        "cli",
        "collect",  # joule-otel collect
        "config",  # the environment variables, documented
        "dashboard",
        "demo",
        "headers",  # parsing a Joule response, for anyone reconciling receipts by hand
        "instrumentor",  # the zero-code entry point
        "instruments",  # metric names, units and buckets
        "pytest_plugin",  # the pytest11 entry point: the simulator fixture and the energy check
        "ledger",
        "simulator",
        "units",  # J/kJ, mg/g and their everyday equivalents, as the dashboard and the CLI print them
        "workload",
    }
    root = Path(joule_otel.__path__[0])
    found = {m.name for m in pkgutil.iter_modules(joule_otel.__path__) if not m.name.startswith("_")}
    found |= {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))}  # namespace pkgs
    assert found == public_modules
    for name in found:
        importlib.import_module(f"joule_otel.{name}")
