"""The pytest plugin's energy check, run as users run it: real pytest runs of an example suite (pytester,
each in its own process) against the simulator, through the real openai SDK."""

from __future__ import annotations

import json

import pytest

pytest_plugins = ["pytester"]

SUITE = """
import json, os
from pathlib import Path

import anyio
import openai
import pytest

import joule_otel

EXTRA = int(os.environ.get("EXTRA_CALLS", "0"))
SPENT = Path(os.environ["SPENT_DIR"])


@pytest.fixture
def client(joule_simulator, request):
    yield openai.OpenAI(base_url=joule_simulator.base_url, api_key="jc_test", max_retries=0)
    billed = sum(r.energy_j for r in joule_simulator.receipts)  # what the simulator billed this test
    calls = len(joule_simulator.receipts)
    (SPENT / (request.node.name + ".json")).write_text(json.dumps({"joules": billed, "calls": calls}))


def ask(client, n):
    for i in range(n):
        client.chat.completions.create(model="llama-3.3-70b-instruct", max_tokens=50,
                                       messages=[{"role": "user", "content": f"question {i}"}])


def test_summary(client):
    ask(client, 2 + EXTRA)


def test_no_calls(client):
    assert 1 + 1 == 2


def test_embeddings(client):
    client.embeddings.create(model="auto", input=["a b c", "d e f"])


@pytest.mark.anyio
async def test_async(joule_simulator, request):
    async with openai.AsyncOpenAI(base_url=joule_simulator.base_url, api_key="jc_test", max_retries=0) as aclient:
        await aclient.chat.completions.create(model="auto", max_tokens=30, messages=[{"role": "user", "content": "hi"}])
    billed = sum(r.energy_j for r in joule_simulator.receipts)
    (SPENT / (request.node.name + ".json")).write_text(json.dumps({"joules": billed, "calls": 1}))


@pytest.fixture
def anyio_backend():
    return "asyncio"
"""


@pytest.fixture
def suite(pytester, tmp_path, monkeypatch):
    spent = tmp_path / "spent"
    spent.mkdir()
    monkeypatch.setenv("SPENT_DIR", str(spent))
    monkeypatch.delenv("JOULE_OTEL_DB", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    pytester.makepyfile(test_suite=SUITE)
    return spent


def by_test(entries: dict) -> dict:
    """Report entries keyed ``test_suite.py::name`` (node ids carry the rootdir's path, which args can move)."""
    return {key.rsplit("/", 1)[-1]: value for key, value in entries.items()}


def billed(spent, name: str) -> float:
    return json.loads((spent / f"{name}.json").read_text())["joules"]


PLUGINS = ("-p", "joule_otel.pytest_plugin", "-p", "anyio.pytest_plugin", "-p", "xdist.plugin")
"""What the inner suites use, loaded by name: every other plugin of this venv (langsmith's, Hypothesis') would cost
each run a second and a half of imports. The entry point that finds ours is tested with autoloading on."""


def run(pytester, *args: str, autoload: bool = False):
    if autoload:
        return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "anyio", *args)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
        return pytester.runpytest_subprocess("-p", "no:cacheprovider", *PLUGINS, *args)


def test_joule_prints_energy_per_test_and_writes_a_report(pytester, suite, tmp_path):
    report_file = tmp_path / "energy-report.json"
    result = run(pytester, "--joule", "--joule-report", str(report_file), autoload=True)  # found by its entry point
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["*joule energy*", "*test_suite.py::test_summary*", "total: 4 calls*in 4 tests"])
    report = json.loads(report_file.read_text())
    tests = by_test(report["tests"])
    for name in ("test_summary", "test_embeddings", "test_async"):
        assert tests[f"test_suite.py::{name}"]["joules"] == pytest.approx(billed(suite, name)), name
    assert tests["test_suite.py::test_summary"]["calls"] == 2
    assert tests["test_suite.py::test_no_calls"] == {"joules": 0.0, "carbon_mg": 0.0, "calls": 0, "calls_by_time": 0}
    assert report["total"]["calls"] == 4
    assert report["total"]["joules"] == pytest.approx(sum(t["joules"] for t in tests.values()))
    assert report["regressions"] == {}


def test_a_regression_fails_and_passes_again_after_the_baseline_is_updated(pytester, suite, tmp_path, monkeypatch):
    baseline = tmp_path / "energy.json"
    run(pytester, "--joule-save", str(baseline)).assert_outcomes(passed=4)
    saved = by_test(json.loads(baseline.read_text())["tests"])
    assert saved["test_suite.py::test_summary"]["joules"] == pytest.approx(billed(suite, "test_summary"))

    monkeypatch.setenv("EXTRA_CALLS", "3")  # test_summary now asks five questions instead of two
    report_file = tmp_path / "report.json"
    result = run(pytester, "--joule-compare", str(baseline), "--joule-report", str(report_file))
    result.assert_outcomes(passed=3, failed=1)
    before = saved["test_suite.py::test_summary"]["joules"]
    after = billed(suite, "test_summary")
    result.stdout.fnmatch_lines(
        [f"*test_summary*energy regression: {before:,.2f} J → {after:,.2f} J (+*%; tolerance +10%, floor 1 J*"]
    )
    assert list(by_test(json.loads(report_file.read_text())["regressions"])) == ["test_suite.py::test_summary"]

    # a tolerance wide enough lets it through; a new baseline makes it the norm
    run(pytester, "--joule-compare", str(baseline), "--joule-tolerance", "500%").assert_outcomes(passed=4)
    run(pytester, "--joule-save", str(baseline)).assert_outcomes(passed=4)
    run(pytester, "--joule-compare", str(baseline)).assert_outcomes(passed=4)


def test_a_marker_caps_one_test_on_every_run(pytester, suite):
    pytester.makepyfile(
        test_capped="""
import openai, pytest

@pytest.mark.joule(max_joules=0.001)
def test_capped(joule_simulator):
    client = openai.OpenAI(base_url=joule_simulator.base_url, api_key="k", max_retries=0)
    client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}])

@pytest.mark.joule(max_joules=1_000_000)
def test_roomy(joule_simulator):
    client = openai.OpenAI(base_url=joule_simulator.base_url, api_key="k", max_retries=0)
    client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}])
"""
    )
    result = run(pytester, "test_capped.py")  # no --joule option: the marker alone turns the check on
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*test_capped*", "energy * J is over this test's cap of 0.001 J (1 call)"])


def test_a_suite_that_uses_none_of_it_is_left_alone(pytester, suite):
    pytester.makepyfile(
        test_plain="""
import joule_otel._instrument as inst

def test_nothing_instrumented():
    assert inst._state is None
"""
    )
    run(pytester, "test_plain.py", autoload=True).assert_outcomes(passed=1)


def test_xdist_workers_each_count_their_own_tests_once(pytester, suite, tmp_path):
    serial, parallel = tmp_path / "serial.json", tmp_path / "parallel.json"
    run(pytester, "--joule-report", str(serial)).assert_outcomes(passed=4)
    result = run(pytester, "-n", "2", "--joule", "--joule-report", str(parallel))
    result.assert_outcomes(passed=4)
    one, two = json.loads(serial.read_text()), json.loads(parallel.read_text())
    assert set(by_test(two["tests"])) == set(by_test(one["tests"])) and len(two["tests"]) == 4
    assert two["total"]["calls"] == one["total"]["calls"] == 4
    assert two["total"]["joules"] == pytest.approx(one["total"]["joules"])
    result.stdout.fnmatch_lines(["*joule energy*", "total: 4 calls*in 4 tests"])


SCOPES = """
import json, os
from pathlib import Path

import openai
import pytest

from joule_otel.simulator import running

SPENT = Path(os.environ["SPENT_DIR"])


@pytest.fixture(scope="module")
def module_sim():
    with running(seed=0) as sim:
        yield sim


@pytest.fixture(scope="session")
def session_sim():
    with running(seed=0) as sim:
        yield sim


@pytest.fixture
def own_sim():  # a suite's own fixture, seeded as joule_simulator is
    with running(seed=0) as sim:
        yield sim


def ask(sim, request, n=2):
    before = len(sim.receipts)
    client = openai.OpenAI(base_url=sim.base_url, api_key="jc_test", max_retries=0)
    for i in range(n):
        client.chat.completions.create(model="llama-3.3-70b-instruct", max_tokens=20,
                                       messages=[{"role": "user", "content": f"question {i}"}])
    mine = sim.receipts[before:]
    billed = {"joules": sum(r.energy_j for r in mine), "calls": len(mine)}
    (SPENT / (request.node.name + ".json")).write_text(json.dumps(billed))


@pytest.mark.parametrize("i", range(3))
@pytest.mark.parametrize("simulator", ["joule_simulator", "module_sim", "session_sim", "own_sim"])
def test_calls(simulator, request, i):
    ask(request.getfixturevalue(simulator), request)


@pytest.mark.joule(max_joules=0.001)
def test_capped_runs_last(joule_simulator, request):
    ask(joule_simulator, request, 1)
"""


def test_every_test_of_a_suite_counts_whatever_the_simulators_scope(pytester, suite, tmp_path):
    """Simulators seeded alike (one per test, per module, per session, the suite's own) issue distinct receipts,
    so no test's calls are taken for an earlier test's and dropped; a capped test fails wherever it runs."""
    pytester.makepyfile(test_scopes=SCOPES)
    report_file = tmp_path / "report.json"
    result = run(pytester, "test_scopes.py", "--joule", "--joule-report", str(report_file))
    result.assert_outcomes(passed=12, failed=1)
    result.stdout.fnmatch_lines(["*test_capped_runs_last*", "energy * J is over this test's cap of 0.001 J (1 call)"])
    tests = by_test(json.loads(report_file.read_text())["tests"])
    assert len(tests) == 13
    for nodeid, measured in tests.items():
        name = nodeid.split("::", 1)[1]
        calls = 1 if name == "test_capped_runs_last" else 2
        assert measured["calls"] == calls, nodeid
        assert measured["joules"] == pytest.approx(billed(suite, name)), nodeid
        assert measured["joules"] > 0, nodeid


OWN_INSTRUMENTATION = """
import openai, pytest

import joule_otel
from joule_otel import _instrument


@pytest.fixture(scope="session")
def own_ledger(tmp_path_factory):
    db = tmp_path_factory.mktemp("ledger") / "suite.duckdb"
    joule_otel.instrument(db=db, flush_interval=0.2)  # after the plugin began capturing: the suite's wins
    yield db


def test_calls(joule_simulator, own_ledger):
    client = openai.OpenAI(base_url=joule_simulator.base_url, api_key="k", max_retries=0)
    client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}])
    assert not _instrument._state.provisional
    assert joule_otel.flush(timeout_s=20)
    assert list(joule_otel.read_ledger(own_ledger)["receipt_id"]) == [joule_simulator.receipts[0].receipt_id]
"""


def test_a_suites_own_instrumentation_is_obeyed_and_heard(pytester, suite, tmp_path):
    """The plugin captures from the first test that needs it, and gives way when the suite instruments later (in a
    fixture, say): the suite's ledger gets the rows, and the energy check still counts them."""
    pytester.makepyfile(test_own=OWN_INSTRUMENTATION)
    report = tmp_path / "report.json"
    run(pytester, "test_own.py", "--joule", "--joule-report", str(report)).assert_outcomes(passed=1)
    assert by_test(json.loads(report.read_text())["tests"])["test_own.py::test_calls"]["calls"] == 1


def test_a_deselected_marker_instruments_nothing(pytester, suite):
    pytester.makepyfile(
        test_marked="""
import pytest
from joule_otel import _instrument

@pytest.mark.joule(max_joules=1)
def test_capped():
    pass

def test_plain():
    assert _instrument._state is None
"""
    )
    run(pytester, "test_marked.py", "-k", "plain").assert_outcomes(passed=1, deselected=1)


LEAKED_THREAD = """
import threading, time
import openai

LEFT = []


def ask(base_url, n=1):
    client = openai.OpenAI(base_url=base_url, api_key="k", max_retries=0)
    for _ in range(n):
        client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}])


def test_a_leaves_a_thread_behind(joule_simulator):
    ask(joule_simulator.base_url, 2)
    late = threading.Event()
    LEFT.append(late)
    threading.Thread(target=lambda: (late.wait(30), ask(joule_simulator.base_url)), daemon=True).start()


def test_b_runs_while_it_calls(joule_simulator):
    LEFT[0].set()  # the thread test_a left behind calls now, during test_b
    time.sleep(1.0)
    ask(joule_simulator.base_url, 3)
"""


def test_calls_are_charged_by_the_test_whose_context_made_them_and_the_rest_are_said(pytester, suite, tmp_path):
    """A test's calls (its tasks' too) carry the test's name in the context; a call a leaked thread makes has none:
    it is charged to the test running when it started, and the report and summary say how many were."""
    pytester.makepyfile(test_leaked=LEAKED_THREAD)
    report = tmp_path / "report.json"
    result = run(pytester, "test_leaked.py", "-p", "no:randomly", "--joule", "--joule-report", str(report))
    result.assert_outcomes(passed=2)
    tests = by_test(json.loads(report.read_text())["tests"])
    a, b = tests["test_leaked.py::test_a_leaves_a_thread_behind"], tests["test_leaked.py::test_b_runs_while_it_calls"]
    assert (a["calls"], a["calls_by_time"]) == (2, 0)
    assert (b["calls"], b["calls_by_time"]) == (4, 1)
    result.stdout.fnmatch_lines(["1 call made outside a test's context (threads) charged to the test running when*"])
