"""A user's ledger is never destroyed or downgraded: the demo refuses one not its own; old files migrate.

Every test here drives real parts: the simulator or a scripted HTTP server on loopback, a real DuckDB file, real
child processes.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import shlex
import subprocess
import sys

import duckdb
import openai
import pytest
from support import HI, ROW, ledger_rows

import joule_otel
from joule_otel._cli import main as cli_main
from joule_otel.ledger import LedgerTooNew
from joule_otel.ledger._schema import SCHEMA_VERSION
from joule_otel.ledger._spool import Spool
from joule_otel.ledger._writer import LedgerWriter

# -- never destroy or downgrade a user's ledger ---------------------------------------------------------------


def test_demo_refuses_a_ledger_that_is_not_a_demos(ledger_path, joule_simulator):
    joule_otel.instrument(db=ledger_path, flush_interval=0.1)
    try:
        openai.OpenAI(base_url=joule_simulator.base_url, api_key="k", max_retries=0).chat.completions.create(
            model="auto", messages=HI
        )
    finally:
        joule_otel.uninstrument()
    before = ledger_path.read_bytes()
    cli = subprocess.run(
        [sys.executable, "-m", "joule_otel._cli", "demo", "--db", str(ledger_path), "--calls", "5", "--no-dashboard"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 2
    assert "not a demo ledger" in cli.stderr
    assert ledger_path.read_bytes() == before
    assert len(ledger_rows(ledger_path)) == 1


def test_demo_reruns_over_its_own_ledger(tmp_path):
    db = tmp_path / "d" / "demo.duckdb"
    counts = []
    command = [sys.executable, "-m", "joule_otel._cli", "demo", "--db", str(db), "--calls", "12", "--no-dashboard"]
    for _ in range(2):
        cli = subprocess.run(
            [*command, "--history-days", "2"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert cli.returncode == 0, cli.stderr[-3000:]
        rows = ledger_rows(db)
        counts.append(len(rows))
        # one story: the count it prints is the ledger's, the service has a name, no figure rounds to nothing
        assert f"{len(rows)} calls in the ledger" in cli.stdout
        assert {r["service"] for r in rows} == {"joule-demo"}
        assert " 0.0 g" not in cli.stdout and " 0 g" not in cli.stdout
        table = cli.stdout.split("  ledger: ", 1)[1].split("\n\n", 1)[0].split("\n")[3:]  # the rows under ----
        table = [line for line in table if not line.startswith(" ")]
        assert len(table) == 5, table
        for column in (0, 1):  # energy, carbon: one unit a column
            assert len({re.findall(r"\d ([a-zA-Z]+)", line)[column] for line in table}) == 1, table
    assert counts[0] >= 12 and counts[1] == counts[0]  # the second run replaced the first demo's rows

    # the "Next:" block names the demo's files, and its commands read them
    next_block = cli.stdout.split("Next:\n", 1)[1]
    assert f"the demo's ledger:  {db}" in next_block
    assert f"its budgets:        {db.with_name('demo-budgets.json')}" in next_block
    commands = [shlex.split(line.strip()) for line in next_block.splitlines() if line.startswith("  joule-otel ")]
    assert [c[1] for c in commands] == ["ledger", "ledger", "budgets", "reconcile"]
    for command in commands:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            # reconcile exits 1: the demo's cron script has no joule-otel, so its calls are billed and in no ledger
            assert cli_main(command[1:]) == (1 if command[1] == "reconcile" else 0), command
        assert "None" not in out.getvalue()
        if command[1] == "reconcile":
            assert 'token "jc_…c41f": 3 calls' in out.getvalue()
        if command[-1] == "stats":
            assert f"rows: {counts[1]}" in out.getvalue()


def test_the_demos_warnings_get_lines_of_their_own_above_its_progress_bar(capsys):
    from joule_otel._demo import _ProgressLine

    line = _ProgressLine()
    logger = logging.getLogger("joule_otel")
    with line.warnings_above():
        line.draw(1, 4, 0.0, "today")
        logger.warning("joule_otel: a 402")
        line.draw(2, 4, 0.0, "today")
        logger.info("joule_otel: not for the demo's screen")
        line.end()
    logger.warning("joule_otel: after the demo")
    err = capsys.readouterr().err
    assert "1/4 tasks" in err and "\n  joule_otel: a 402\n\r  today" in err
    assert "not for the demo's screen" not in err
    assert err.count("joule_otel: after the demo") <= 1 and "  joule_otel: after the demo" not in err


def test_an_older_joule_otel_never_writes_to_a_newer_ledger(ledger_path, joule_simulator, caplog):
    joule_otel.instrument(db=ledger_path, flush_interval=0.1)
    client = openai.OpenAI(base_url=joule_simulator.base_url, api_key="k", max_retries=0)
    try:
        client.chat.completions.create(model="auto", messages=HI)
    finally:
        joule_otel.uninstrument()
    with duckdb.connect(str(ledger_path)) as con:
        con.execute("UPDATE joule_meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION + 1)])
    joule_otel.instrument(db=ledger_path, flush_interval=0.1)
    try:
        with caplog.at_level(logging.ERROR, logger="joule_otel"):
            for _ in range(2):
                client.chat.completions.create(model="auto", messages=HI)
            assert joule_otel.flush(timeout_s=10)
    finally:
        with caplog.at_level(logging.ERROR, logger="joule_otel"):
            joule_otel.uninstrument()
    with duckdb.connect(str(ledger_path), read_only=True) as con:
        version = con.execute("SELECT value FROM joule_meta WHERE key = 'schema_version'").fetchone()[0]
        in_file = con.execute("SELECT count(*) FROM inference_calls").fetchone()[0]
    assert version == str(SCHEMA_VERSION + 1)
    assert in_file == 1
    newer = [r for r in caplog.records if "newer joule-otel" in r.getMessage()]
    assert len(newer) == 1
    assert len(Spool(ledger_path).segments()) >= 1  # the rows wait in the spool
    with pytest.raises(LedgerTooNew, match="newer joule-otel"):  # and this version reads no answer it may get wrong
        ledger_rows(ledger_path)


def test_a_version_2_ledger_gains_the_provider_column(ledger_path):
    ledger_path.parent.mkdir(parents=True)
    with duckdb.connect(str(ledger_path)) as con:
        con.execute(
            "CREATE TABLE inference_calls (receipt_id VARCHAR, started_at TIMESTAMPTZ, server_address VARCHAR, "
            "energy_j DOUBLE, status_code INTEGER)"
        )
        con.execute("CREATE TABLE joule_meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
        con.execute("INSERT INTO joule_meta VALUES ('schema_version', '2')")
        con.execute(
            "INSERT INTO inference_calls VALUES ('r1', now(), '127.0.0.1', 5, 200), "
            "(NULL, now(), 'api.greenjoules.cloud', NULL, 402), (NULL, now(), 'api.openai.com', NULL, 200), "
            "(NULL, now(), 'llm.internal', NULL, 200)"
        )
    writer = LedgerWriter(ledger_path)
    writer.append([ROW._replace(receipt_id="r_new")])
    assert writer.write_segment()
    writer.compact(force=True, timeout_s=5)  # the first writer to open the file migrates it
    with duckdb.connect(str(ledger_path), read_only=True) as con:
        providers = dict(con.execute("SELECT server_address, provider FROM inference_calls").fetchall())
        rolled = con.execute("SELECT provider, sum(calls) FROM joule_rollup GROUP BY 1 ORDER BY 1").fetchall()
    assert providers == {
        "127.0.0.1": "joule_cloud",
        "api.greenjoules.cloud": "joule_cloud",
        "api.openai.com": "openai",
        "llm.internal": "llm.internal",
        "h": "joule_cloud",
    }
    assert rolled == [("joule_cloud", 3), ("llm.internal", 1), ("openai", 1)]


def test_todays_demo_traffic_is_spread_over_the_day_so_far_and_ends_now():
    from datetime import datetime, timedelta, timezone

    from joule_otel._demo import LIVE_SHARE, plan_today

    now = datetime(2026, 3, 9, 15, 30, tzinfo=timezone.utc)  # a fixed moment: the plan, not today, is under test
    plan = plan_today(200, seed=5, now=now)
    dated = [t.moment_ns for t in plan if t.moment_ns is not None]
    assert len(plan) == 200 and len(dated) == round(200 * (1 - LIVE_SHARE))
    assert plan[-1].moment_ns is None and dated == sorted(dated)  # oldest first, the last ones now
    midnight = datetime(2026, 3, 9, tzinfo=timezone.utc)
    moments = [datetime.fromtimestamp(ns / 1e9, timezone.utc) for ns in dated]
    assert all(midnight <= m <= now - timedelta(minutes=1) for m in moments)
    assert len({m.hour for m in moments}) >= 10  # over the day's hours, not one minute
    early = plan_today(200, seed=5, now=datetime(2026, 3, 9, 0, 20, tzinfo=timezone.utc))
    assert all(t.moment_ns is None for t in early)  # just after midnight, today is all now
    assert [t.name for t in plan] == [t.name for t in plan_today(200, seed=5)]  # the same tasks either way
