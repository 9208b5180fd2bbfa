"""Budgets that warn before the 402: the budgets file, warnings and gauges on a real app, and the rules
`joule-otel budgets rules` writes, checked by promtool."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import joule_otel
from joule_otel._budgets import Budget, load_budgets, parse_thresholds, prometheus_rules
from joule_otel.simulator import running

PROMTOOL = shutil.which("promtool")
DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def gauges(reader: InMemoryMetricReader) -> dict[str, dict[tuple, float]]:
    """Every joule.budget.* point: metric → {attributes: value}."""
    found: dict[str, dict[tuple, float]] = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data else []:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name.startswith("joule.budget."):
                    for point in metric.data.data_points:
                        found.setdefault(metric.name, {})[tuple(sorted(point.attributes.items()))] = point.value
    return found


def ask(client, n: int, workload: str) -> None:
    with joule_otel.workload(workload):
        for i in range(n):
            client.chat.completions.create(
                model="llama-3.3-70b-instruct", max_tokens=60, messages=[{"role": "user", "content": f"q{i}"}]
            )


def test_budgets_file_formats_and_errors(tmp_path):
    (tmp_path / "b.json").write_text(json.dumps({"bot": 100, "sum": {"joules": 5e5, "service": "reports"}}))
    (tmp_path / "b.toml").write_text(
        '[budgets]\nbot = 100\n[[budget]]\nworkload = "sum"\nservice = "reports"\njoules = 5e5\n'
    )
    (tmp_path / "b.csv").write_text("workload,budget_j,service\nbot,100,\nsum,500000,reports\n")
    expected = [Budget("bot", 100.0), Budget("sum", 5e5, "reports")]
    for name in ("b.json", "b.toml", "b.csv"):
        assert load_budgets(tmp_path / name) == expected, name
    assert expected[1].label == "sum @ reports"
    for text, message in (
        ('{"bot": "lots"}', "positive number"),
        ('{"bot": -1}', "positive"),
        ('["bot"]', "not valid"),
        ("{", "not valid"),
        ('[{"workload": "bot", "joules": 1}, {"workload": "bot", "joules": 2}]', "twice"),
    ):
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(ValueError, match=message):
            load_budgets(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="cannot read"):
        load_budgets(tmp_path / "missing.json")
    assert parse_thresholds("50%, 0.9,1") == (0.5, 0.9, 1.0)
    assert parse_thresholds("") == (0.8, 1.0)
    with pytest.raises(ValueError, match="not a share"):
        parse_thresholds("eighty")


def test_every_budgets_file_a_user_can_hand_over_is_budgets_or_one_clear_error(tmp_path, monkeypatch, caplog):
    """Nesting deep enough to exhaust the parser, integers no float holds, a spreadsheet's BOM, control characters:
    each is budgets or a ValueError that names the file, never a crash of the app that set JOULE_OTEL_BUDGETS."""
    from joule_otel._cli import main

    (tmp_path / "bom.csv").write_text("\ufeffworkload,budget_j,service\nbot,100,\n", encoding="utf-8")
    assert load_budgets(tmp_path / "bom.csv") == [Budget("bot", 100.0)]
    (tmp_path / "ctl.json").write_text(
        json.dumps({"support-\u0000bot\u0007 ": 100, "x": {"joules": 5, "service": "a\tb"}})
    )
    assert load_budgets(tmp_path / "ctl.json") == [Budget("support-bot", 100.0), Budget("x", 5.0, "ab")]
    hostile = {
        "deep.json": "[" * 100_000 + "]" * 100_000,
        "deep-object.json": '{"a":' * 50_000 + "1" + "}" * 50_000,
        "digits.json": '{"bot": ' + "9" * 400 + "}",
        "latin1.csv": b"workload,budget_j\n\xe9t\xe9,5\n",
        "inf.json": '{"bot": 1e999}',
        "bool.json": '{"bot": true}',
        "empty-name.json": '{"  ": 5}',
    }
    for name, text in hostile.items():
        path = tmp_path / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(ValueError, match=str(path) if "name" not in name else "no workload name"):
            load_budgets(path)
        assert main(["budgets", "rules", str(path)]) == 2, name
        monkeypatch.setenv("JOULE_OTEL_BUDGETS", str(path))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="joule_otel"):
            joule_otel.instrument(db="off")  # warns once and goes on without budgets
            joule_otel.uninstrument()
        assert [r for r in caplog.records if "budget warnings and gauges are off" in r.getMessage()], name


@pytest.mark.parametrize(
    "budgets",
    [{"bot": float("inf")}, {"bot": float("nan")}, {"bot": 0}, {"bot": -5}, {"bot": True}, {"": 5}, {"bot": "lots"}],
)
def test_instrument_refuses_budgets_that_are_not_budgets(budgets):
    with pytest.raises(ValueError, match="budget"):
        joule_otel.instrument(db="off", budgets=budgets)


def test_instrument_rejects_bad_budget_options_and_warns_on_a_bad_variable(tmp_path, monkeypatch, caplog):
    with pytest.raises(ValueError, match="budget_thresholds"):
        joule_otel.instrument(db="off", budget_thresholds="0.8")
    with pytest.raises(ValueError, match="budgets must"):
        joule_otel.instrument(db="off", budgets=42)
    (tmp_path / "bad.json").write_text('{"bot": "lots"}')
    monkeypatch.setenv("JOULE_OTEL_BUDGETS", str(tmp_path / "bad.json"))
    with caplog.at_level(logging.WARNING, logger="joule_otel"):
        joule_otel.instrument(db="off")
        joule_otel.uninstrument()
    assert any(
        "positive number" in r.getMessage() and "budget warnings and gauges are off" in r.getMessage()
        for r in caplog.records
    )


def test_a_real_app_warns_once_per_threshold_and_exports_budget_gauges(tmp_path, caplog):
    """Month to date = what the ledger holds (an earlier process's calls) + what this process captures."""
    db = tmp_path / "ledger.duckdb"
    with running(seed=5) as sim:
        client = openai.OpenAI(base_url=sim.base_url, api_key="k", max_retries=0)
        joule_otel.instrument(db=db, flush_interval=0.2, metrics="none")  # an earlier run of the app
        try:
            ask(client, 3, "bot")
            joule_otel.flush()
        finally:
            joule_otel.uninstrument()
        earlier = sum(r.energy_j for r in sim.receipts)
        budget = earlier / 0.7  # 70 % used before this process starts
        reader = InMemoryMetricReader()
        provider = MeterProvider(metric_readers=[reader])
        with caplog.at_level(logging.WARNING, logger="joule_otel"):
            joule_otel.instrument(
                db=db, flush_interval=0.2, meter_provider=provider, budgets={"bot": budget, "idle": 1000.0}
            )
            try:
                joule_otel.flush()
                assert not [r for r in caplog.records if "energy budget" in r.getMessage()], "70 %: no warning yet"
                spent = earlier
                while spent < budget * 1.3:  # past 80 %, then past 100 %, then on
                    ask(client, 1, "bot")
                    spent = sum(r.energy_j for r in sim.receipts)
                joule_otel.flush()
                points = gauges(reader)
            finally:
                joule_otel.uninstrument()
                provider.shutdown()
    warnings = [r.getMessage() for r in caplog.records if "energy budget" in r.getMessage()]
    assert len(warnings) == 2, warnings
    assert "warning at 80%" in warnings[0] and "warning at 100%" in warnings[1]
    assert all("workload bot" in w for w in warnings)
    bot = (("joule.workload", "bot"),)
    assert points["joule.budget.limit"][bot] == pytest.approx(budget)
    assert points["joule.budget.spent"][bot] == pytest.approx(spent), "ledger's earlier calls + this process's"
    assert points["joule.budget.remaining"][bot] == 0.0
    idle = (("joule.workload", "idle"),)
    assert points["joule.budget.spent"][idle] == 0.0 and points["joule.budget.remaining"][idle] == 1000.0


def test_a_402_warns_with_month_to_date_and_budget_once_per_workload_and_hour(tmp_path, caplog):
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    with running(seed=6, energy_budgets={"jc_small": 100.0}) as sim:
        client = openai.OpenAI(base_url=sim.base_url, api_key="jc_small", max_retries=0)
        with caplog.at_level(logging.WARNING, logger="joule_otel"):
            joule_otel.instrument(
                db=tmp_path / "l.duckdb", flush_interval=0.2, meter_provider=provider, budgets={"enrich": 5000.0}
            )
            try:
                statuses = []
                with joule_otel.workload("enrich"):
                    for i in range(12):
                        try:
                            client.chat.completions.create(
                                model="llama-3.3-70b-instruct", messages=[{"role": "user", "content": f"r{i}"}]
                            )
                        except openai.APIStatusError as exc:
                            statuses.append(exc.status_code)
                joule_otel.flush()
                data = reader.get_metrics_data()
            finally:
                joule_otel.uninstrument()
                provider.shutdown()
    served = sum(r.energy_j for r in sim.receipts)
    refused = len(statuses)
    assert refused >= 2 and set(statuses) == {402}
    said = [r.getMessage() for r in caplog.records if "402 insufficient_balance" in r.getMessage()]
    assert len(said) == 1, said
    from joule_otel._units import energy

    assert "workload enrich" in said[0] and energy(served) in said[0] and "its budget 5.00 kJ" in said[0]
    refusals = [
        p.value
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == "joule.budget.refusals"
        for p in m.data.data_points
        if dict(p.attributes) == {"joule.workload": "enrich"}
    ]
    assert refusals == [refused]


@pytest.mark.skipif(PROMTOOL is None and not __import__("os").environ.get("CI"), reason="promtool not installed")
def test_rules_pass_promtool_check_and_unit_tests_that_cross_each_threshold(tmp_path):
    budgets = [Budget("support-bot", 150_000.0), Budget("summaries", 400_000.0, "reports")]
    (tmp_path / "rules.yml").write_text(prometheus_rules(budgets, exhaustion_days=7, burn_window="1h"))
    check = subprocess.run([PROMTOOL, "check", "rules", str(tmp_path / "rules.yml")], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr

    def used(share: str, joules: str) -> dict[str, str]:
        return {
            "summary": f"support-bot has used {share} of its monthly energy budget",
            "description": f"{joules} J of 150000 J used this month.",
        }

    threshold, exhaustion, refused = (
        "JouleEnergyBudgetThreshold",
        "JouleEnergyBudgetExhaustionProjected",
        "JouleInsufficientBalance",
    )
    bot = {"joule_workload": "support-bot", "budget_joules": "150000.0"}
    warning, critical = {"severity": "warning", "threshold": "80%"}, {"severity": "critical", "threshold": "100%"}
    exhausting = {
        "summary": "support-bot will spend its energy budget within 7 days",
        "description": "At the burn rate of the last 1h, 50m 0s are left.",
    }
    refusals = {
        "summary": "Joule Cloud refused calls of batch with 402 insufficient_balance",
        "description": "5 calls refused in 10 minutes: the account balance or the API key's energy budget ran out.",
    }
    # support-bot: 1 000 J a minute from 0 (two processes report it, the larger counts); summaries (service
    # reports) spends 10 J a minute, weeks from its budget; batch gets its first 402 at minute 31
    series = [
        ('joule_budget_spent_joules{joule_workload="support-bot", instance="a"}', "0+1000x200"),
        ('joule_budget_spent_joules{joule_workload="support-bot", instance="b"}', "0+900x200"),
        ('joule_budget_spent_joules{joule_workload="summaries", joule_budget_service="reports"}', "0+10x200"),
        ('joule_budget_refusals_total{joule_workload="batch"}', "0x30 1+1x20 21x150"),
    ]
    expected = [
        ("100m", threshold, []),
        ("125m", threshold, [(bot | warning, used("80%", "125k"))]),
        ("155m", threshold, [(bot | warning, used("80%", "155k")), (bot | critical, used("100%", "155k"))]),
        # at 100 min 50 kJ are left at 1 kJ a minute: out within the week; summaries is weeks away
        ("100m", exhaustion, [(bot | {"severity": "critical"}, exhausting)]),
        ("160m", exhaustion, []),
        ("20m", refused, []),
        ("35m", refused, [({"joule_workload": "batch", "severity": "critical"}, refusals)]),
        ("120m", refused, []),
    ]
    tests = {
        "rule_files": ["rules.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": name, "values": values} for name, values in series],
                "alert_rule_test": [
                    {
                        "eval_time": at,
                        "alertname": name,
                        "exp_alerts": [
                            {"exp_labels": {"alertname": name, **labels}, "exp_annotations": notes}
                            for labels, notes in alerts
                        ],
                    }
                    for at, name, alerts in expected
                ],
            }
        ],
    }
    (tmp_path / "tests.yml").write_text(json.dumps(tests))  # JSON is YAML
    result = subprocess.run(
        [PROMTOOL, "test", "rules", str(tmp_path / "tests.yml")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_shipped_rules_are_what_the_cli_writes_for_the_example(tmp_path):
    out = tmp_path / "rules.yml"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "joule_otel._cli",
            "budgets",
            "rules",
            str(DEPLOY / "budgets.example.json"),
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert out.read_text() == (DEPLOY / "joule-budgets.rules.yml").read_text(), (
        "regenerate deploy/joule-budgets.rules.yml"
    )
    bad = subprocess.run(
        [sys.executable, "-m", "joule_otel._cli", "budgets", "rules", str(tmp_path / "none.json")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "cannot read budgets file" in bad.stderr


def test_a_drain_checks_only_the_budgets_of_the_workloads_it_touched():
    """10 k budgets over 10 k workloads: a drain of one workload's rows looks at that workload's budgets, not at every
    budget against every workload (which held the GIL for seconds and starved the app's calls)."""
    from joule_otel._budget_watch import BudgetWatch
    from joule_otel.ledger._row import LedgerRow

    budgets = [Budget(f"w{i}", 1000.0) for i in range(10_000)] + [Budget("w7", 500.0, "api")]
    watch = BudgetWatch(budgets, (0.8, 1.0), None)
    looked: list[tuple[str, str | None]] = []
    spent = watch.spent_j
    watch.spent_j = lambda workload, service=None: looked.append((workload, service)) or spent(workload, service)
    now_us = time.time_ns() // 1000
    row = LedgerRow(*([None] * 21), provider="joule_cloud")._replace(started_at_us=now_us, energy_j=450.0)
    watch.observe([row._replace(workload="w7", service="api"), row._replace(workload="w7", service="web")])
    assert sorted(looked, key=str) == sorted([("w7", None), ("w7", "api")], key=str)
    assert spent("w7") == 900.0 and spent("w7", "api") == 450.0 and spent("w8") == 0.0
    assert watch.budget_for("w7", "api") == Budget("w7", 500.0, "api") and watch.budget_for("w7", "web") == budgets[7]
    observed = dict(watch.observations())
    assert observed[budgets[7]] == 900.0 and observed[budgets[8]] == 0.0 and len(observed) == 10_001


def test_rows_a_slow_budget_check_holds_reach_the_writer_and_are_counted_at_exit(tmp_path, monkeypatch, caplog):
    """The budget watch runs after a drain's rows are handed to the writer: a watch that never returns holds no row
    back, and a capture that stops meanwhile says how many rows it could not write (never 0 when some were lost)."""
    import threading

    from joule_otel import _instrument

    monkeypatch.setattr(_instrument, "EXIT_FLUSH_TIMEOUT_S", 1.0)
    release = threading.Event()
    joule_otel.instrument(db=tmp_path / "l.duckdb", flush_interval=60, budgets={"bot": 1e9})
    watch = _instrument._state.pipeline.watch
    entered = threading.Event()

    def stuck(rows):
        entered.set()
        release.wait(30)

    monkeypatch.setattr(watch, "observe", stuck)
    try:
        with running(seed=5) as sim:
            client = openai.OpenAI(base_url=sim.base_url, api_key="k", max_retries=0)
            with joule_otel.workload("bot"):
                for _ in range(5):
                    client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}])
            joule_otel.flush(timeout_s=0.5)  # wakes the drain, which then sticks in the watch
            assert entered.wait(20)
            assert _instrument._state.pipeline.writer.stats.pending_rows == 5, "handed to the writer first"
            with caplog.at_level(logging.ERROR, logger="joule_otel"):
                joule_otel.uninstrument()
    finally:
        release.set()
    lost = [r.getMessage() for r in caplog.records if "could not be written" in r.getMessage()]
    assert lost and lost[0].startswith("joule_otel: 5 ledger rows could not be written"), lost
