"""The public surface is exactly what ``joule_otel`` exports: a sorted ``__all__``, internal modules named as such."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
from datetime import timedelta, timezone
from pathlib import Path

import openai
import pytest

import joule_otel


def test_all_is_sorted_and_complete():
    assert joule_otel.__all__ == sorted(joule_otel.__all__)
    names = set(dir(joule_otel)) - {"annotations", "TYPE_CHECKING", "Any"}
    public = {name for name in names if not name.startswith("_")}
    modules = {name for name in public if type(getattr(joule_otel, name)).__name__ == "module"}
    assert set(joule_otel.__all__) - {"__version__"} == public - modules


def test_importing_the_package_leaves_the_sdk_and_duckdb_unloaded():
    """`import joule_otel` is light (the dashboard's first page and the simulator pay nothing for capture)."""
    heavy = ("opentelemetry.sdk", "duckdb", "pyarrow", "joule_otel._instrument")
    code = f"import sys, joule_otel, joule_otel._units; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert callable(joule_otel.instrument) and joule_otel.read_ledger.__name__ == "read_calls"


def test_internal_modules_are_named_as_internal():
    """Modules with no public role start with an underscore (httpx's and Logfire's convention); every public
    module says what it exports, and exports only what it has."""
    public_modules = {
        "collect",  # serve(): joule-otel collect, embeddable
        "dashboard",  # the Streamlit script, app.py
        "instrumentor",  # the zero-code entry point (opentelemetry_instrumentor)
        "ledger",  # read_ledger, connect, LedgerRow, COLUMN_NAMES
        "proxy",  # serve(): joule-otel proxy, embeddable; Proxy, the ASGI app
        "pytest_plugin",  # the pytest11 entry point: the simulator fixture and the energy check
        "simulator",  # running(): a Joule Cloud on loopback, for tests and demos
    }
    root = Path(joule_otel.__path__[0])
    found = {m.name for m in pkgutil.iter_modules(joule_otel.__path__) if not m.name.startswith("_")}
    assert found == public_modules
    for package in ("collect", "dashboard", "ledger", "proxy", "simulator"):
        inner = {m.name for m in pkgutil.iter_modules([str(root / package)]) if not m.name.startswith("_")}
        assert inner <= {"app"}, f"joule_otel.{package} has public modules {inner}"
        assert (root / package / "__init__.py").exists()
    for name in found:
        module = importlib.import_module(f"joule_otel.{name}")
        exported = module.__all__
        assert len(set(exported)) == len(exported), name  # their order is ruff's (RUF022)
        assert all(hasattr(module, item) for item in exported), name


@pytest.fixture
def ledger_of_three(ledger_only, joule_simulator):
    client = openai.OpenAI(base_url=joule_simulator.base_url, api_key="jc_test", max_retries=0)
    for name in ("support-bot", "ops-agent", "nightly"):
        with joule_otel.workload(name):
            client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}])
    assert joule_otel.flush(timeout_s=20)
    return ledger_only


def test_read_ledger_takes_the_documented_arguments(ledger_of_three):
    """The signature the README's API table shows, with every kind of time and name it accepts."""
    db = ledger_of_three
    assert len(joule_otel.read_ledger(db=db)) == 3
    assert len(joule_otel.read_ledger(str(db))) == 3
    assert set(joule_otel.read_ledger(db=db, workload=["support-bot", "nightly"])["workload"]) == {
        "support-bot",
        "nightly",
    }
    assert list(joule_otel.read_ledger(db=db, workload="ops-agent")["workload"]) == ["ops-agent"]
    assert joule_otel.read_ledger(db=db, workload=[]).empty
    newest_first = joule_otel.read_ledger(db=db, limit=2)
    assert list(newest_first["workload"]) == ["nightly", "ops-agent"]
    started = joule_otel.read_ledger(db=db)["started_at"].min().to_pydatetime()
    for since in (
        timedelta(hours=1),
        started,
        started.astimezone(timezone.utc).replace(tzinfo=None).isoformat() + "Z",
        started.astimezone(timezone(timedelta(hours=-3, minutes=-30))),
        started.astimezone().replace(tzinfo=None),  # naive: local time, as datetime.now() gives
        (started - timedelta(days=1)).astimezone().date(),
    ):
        assert len(joule_otel.read_ledger(db=db, since=since)) == 3, since
    assert joule_otel.read_ledger(db=db, until=started).empty
    assert joule_otel.read_ledger(db=db, since=started + timedelta(hours=1)).empty
    assert len(joule_otel.read_ledger(db_path=db)) == 3, "the former name still works"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"since": "yesterday"}, r"since: 'yesterday' is not a time; pass a datetime, a date, an ISO 8601 text"),
        ({"until": 5}, r"until: 5 is not a time"),
        ({"workload": ["a", 1]}, r"workload: \['a', 1\] is not a name; pass a str, or a list of str"),
        ({"service": 3}, r"service: 3 is not a name"),
        ({"limit": -1}, r"limit: -1 is not a number of rows; pass an int >= 0"),
        ({"limit": "10"}, r"limit: '10' is not a number of rows"),
        ({"db": 5}, r"db: 5 is not a path"),
    ],
)
def test_read_ledger_refuses_bad_arguments_saying_what_it_accepts(ledger_of_three, kwargs, message):
    kwargs.setdefault("db", ledger_of_three)
    with pytest.raises(ValueError, match=message):
        joule_otel.read_ledger(**kwargs)


def test_read_ledger_of_a_missing_path_says_so(tmp_path):
    missing = tmp_path / "nowhere" / "joule.duckdb"
    with pytest.raises(FileNotFoundError, match=r"no ledger at .*nowhere/joule.duckdb: nothing has been recorded"):
        joule_otel.read_ledger(db=missing)
    assert not missing.parent.exists(), "reading never creates a ledger"
