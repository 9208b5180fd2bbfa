"""`joule-otel reconcile`: the real simulator's bill against ledgers written by real capture and by `collect`.

Every category of the report, every shape of bill, every bad input and the exit codes, through the command a
finance team's nightly job runs.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import openai
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import joule_otel
from joule_otel import _reconcile as rc
from joule_otel import _units as units
from joule_otel.simulator import running

APP_KEY = "jc_support_a1b2"
CRON_KEY = "jc_cron_9c41f"
HI = [{"role": "user", "content": "hi"}]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "joule_otel._cli", "reconcile", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def plain_call(base_url: str, key: str) -> None:
    """A call as a shell script makes it: no joule-otel, no OpenTelemetry."""
    body = json.dumps({"model": "auto", "messages": HI}).encode()
    request = urllib.request.Request(
        base_url + "/chat/completions",
        data=body,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        response.read()


@pytest.fixture(scope="module")
def books(tmp_path_factory):
    """An instrumented app (6 calls, a 402 refused), an uninstrumented cron script (3 calls), and the bill."""
    tmp = tmp_path_factory.mktemp("books")
    db = tmp / "app.duckdb"
    joule_otel.instrument(db=db, flush_interval=0.2)
    try:
        with running(seed=11, energy_budgets={"jc_spent": 0.0}) as sim:
            client = openai.OpenAI(base_url=sim.base_url, api_key=APP_KEY, max_retries=0)
            with joule_otel.workload("support-bot"):
                for _ in range(5):
                    client.chat.completions.create(model="auto", messages=HI)
                for _ in client.chat.completions.create(
                    model="auto", messages=HI, stream=True, stream_options={"include_usage": True}
                ):
                    pass
            spent = openai.OpenAI(base_url=sim.base_url, api_key="jc_spent", max_retries=0)
            with pytest.raises(openai.APIStatusError):
                spent.chat.completions.create(model="auto", messages=HI)
            for _ in range(3):
                plain_call(sim.base_url, CRON_KEY)
            assert joule_otel.flush(timeout_s=20)
            receipts = sim.receipts
            for suffix in ("csv", "jsonl", "json", "parquet"):
                sim.write_bill(tmp / f"bill.{suffix}")
            sim.write_bill(tmp / "app-only.csv", api_key=APP_KEY)
    finally:
        joule_otel.uninstrument()
    return tmp, db, receipts


def report(*args: str) -> tuple[int, dict]:
    result = cli(*args, "--format", "json")
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout)


@pytest.mark.parametrize("suffix", ["csv", "jsonl", "json", "parquet"])
def test_the_bill_against_the_ledger_names_the_uninstrumented_token(books, suffix):
    tmp, db, receipts = books
    code, found = report("--bill", str(tmp / f"bill.{suffix}"), "--db", str(db))
    assert code == 1 and found["explained"] is False
    app = [r for r in receipts if r.token == "jc_…a1b2"]
    cron = [r for r in receipts if r.token == "jc_…c41f"]
    assert len(app) == 6 and len(cron) == 3
    coverage = found["coverage"]
    assert coverage["billed_calls"] == 9 and coverage["found_calls"] == 6
    assert coverage["billed_j"] == pytest.approx(sum(r.energy_j for r in receipts))
    assert coverage["found_j"] == pytest.approx(sum(r.energy_j for r in app))
    assert coverage["joules_share"] == pytest.approx(sum(r.energy_j for r in app) / sum(r.energy_j for r in receipts))
    assert sum(d["billed_calls"] for d in coverage["by_day"]) == 9
    missing = found["billed_not_in_ledger"]
    assert missing["calls"] == 3 and missing["energy_j"] == pytest.approx(sum(r.energy_j for r in cron))
    (group,) = missing["groups"]
    assert group["token"] == "jc_…c41f" and group["calls"] == 3
    assert {r["receipt_id"] for r in missing["receipts"]} == {r.receipt_id for r in cron}
    assert found["in_ledger_not_billed"]["calls"] == 0 and found["differing"]["calls"] == 0
    assert found["without_receipt"] == 1  # the 402: neither billed nor missing


def test_the_terminal_summary_says_it_in_one_line_per_token(books):
    tmp, db, receipts = books
    result = cli("--bill", str(tmp / "bill.csv"), "--db", str(db))
    assert result.returncode == 1, result.stderr
    cron_j = sum(r.energy_j for r in receipts if r.token == "jc_…c41f")
    hour = datetime.fromtimestamp(receipts[-1].billed_at, timezone.utc).hour
    line = next(line for line in result.stdout.splitlines() if "jc_…c41f" in line)
    assert line.strip().startswith('token "jc_…c41f": 3 calls') and f"{hour:02d} h UTC" in line
    assert f"{cron_j:.0f} J" in line.replace(",", "") or "kJ" in line
    assert "does not explain the bill" in result.stdout


def test_a_ledger_that_explains_its_bill_exits_0_and_a_lower_bar_is_met(books):
    tmp, db, _ = books
    ok = cli("--bill", str(tmp / "app-only.csv"), "--db", str(db))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "explains the bill" in ok.stdout
    _, found = report("--bill", str(tmp / "bill.csv"), "--db", str(db))
    share = found["coverage"]["joules_share"] * 100
    assert cli("--bill", str(tmp / "bill.csv"), "--db", str(db), "--min-coverage", f"{share - 1:.2f}").returncode == 0
    assert cli("--bill", str(tmp / "bill.csv"), "--db", str(db), "--min-coverage", f"{share + 1:.2f}").returncode == 1


def test_figures_that_differ_and_receipts_no_bill_knows(books, tmp_path):
    tmp, db, receipts = books
    rows = list(csv.DictReader((tmp / "app-only.csv").open(encoding="utf-8")))
    changed, dropped = rows[0], rows[1]
    changed["energy_j"] = str(float(changed["energy_j"]) + 5.0)
    changed["region"] = "EU-FI" if changed["region"] != "eu-fi" else "us-east"
    kept = [r for r in rows if r is not dropped]
    bill = tmp_path / "tampered.csv"
    with bill.open("w", newline="", encoding="utf-8") as out:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)
    # the period is the whole day: the dropped receipt lies inside it, away from its edges
    first = datetime.fromtimestamp(receipts[0].billed_at, timezone.utc)
    code, found = report(
        "--bill",
        str(bill),
        "--db",
        str(db),
        "--from",
        first.date().isoformat(),
        "--to",
        (first.date() + timedelta(days=1)).isoformat(),
    )
    assert code == 1
    figures = {(f["receipt_id"], f["field"]): f for f in found["differing"]["figures"]}
    energy = figures[(changed["receipt_id"], "energy_j")]
    assert energy["difference"] == pytest.approx(-5.0)
    assert (changed["receipt_id"], "region") in figures
    assert found["differing"]["calls"] == 1
    unbilled = found["in_ledger_not_billed"]
    assert [r["receipt_id"] for r in unbilled["receipts"]] == [dropped["receipt_id"]]


def test_a_call_at_the_edge_of_the_period_is_no_false_alarm(books, tmp_path):
    """A call started just before the period's end and billed just after it is on next period's bill: within the
    clock-skew allowance it is no alarm; without the allowance it is "in a ledger but not billed"."""
    tmp, db, receipts = books
    last = [r for r in receipts if r.token == "jc_…a1b2"][-1]
    with joule_otel.ledger.connect(db) as con:
        (started,) = con.execute(
            "SELECT started_at FROM inference_calls WHERE receipt_id = ?", [last.receipt_id]
        ).fetchall()[0]
    billed = datetime.fromtimestamp(last.billed_at, timezone.utc)
    assert started < billed
    end = started + (billed - started) / 2
    rows = [
        r for r in csv.DictReader((tmp / "app-only.csv").open(encoding="utf-8")) if r["receipt_id"] != last.receipt_id
    ]
    bill = tmp_path / "period.csv"
    with bill.open("w", newline="", encoding="utf-8") as out:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    code, found = report("--bill", str(bill), "--db", str(db), "--to", end.isoformat())
    assert code == 0 and found["coverage"]["billed_calls"] == 5
    assert found["in_ledger_not_billed"] == {"calls": 0, "energy_j": 0.0, "at_edges": 1, "receipts": []}
    _, tight = report("--bill", str(bill), "--db", str(db), "--to", end.isoformat(), "--skew", "0")
    assert [r["receipt_id"] for r in tight["in_ledger_not_billed"]["receipts"]] == [last.receipt_id]


def test_several_ledgers_are_one_and_rows_in_two_are_counted_once(books, tmp_path):
    tmp, db, _ = books
    copy = tmp_path / "copy.duckdb"
    assert cli("--bill", str(tmp / "bill.csv"), "--db", str(db)).returncode == 1
    subprocess.run(
        [sys.executable, "-m", "joule_otel._cli", "ledger", "export", str(tmp_path / "rows.parquet"), "--db", str(db)],
        check=True,
        capture_output=True,
    )
    import duckdb

    with duckdb.connect(str(copy)) as out:
        out.execute(f"CREATE TABLE inference_calls AS SELECT * FROM read_parquet('{tmp_path / 'rows.parquet'}')")
    _, found = report("--bill", str(tmp / "bill.csv"), "--db", str(db), "--db", str(copy))
    assert found["coverage"]["found_calls"] == 6
    assert found["in_two_ledgers"]["calls"] == 6


def test_from_api_reads_the_accounts_pages_with_the_key_from_the_environment(tmp_path):
    db = tmp_path / "api.duckdb"
    joule_otel.instrument(db=db, flush_interval=0.2)
    try:
        with running(seed=3) as sim:
            client = openai.OpenAI(base_url=sim.base_url, api_key=APP_KEY, max_retries=0)
            for _ in range(5):
                client.chat.completions.create(model="auto", messages=HI)
            plain_call(sim.base_url, CRON_KEY)  # another account: not on this account's bill
            assert joule_otel.flush(timeout_s=20)
            pages = list(rc.fetch_bill(sim.base_url, APP_KEY, None, None, page=2))
            assert [p["receipt_id"] for p in pages] == [r.receipt_id for r in sim.receipts if r.token == "jc_…a1b2"]
            result = cli(
                "--from-api",
                sim.base_url,
                "--db",
                str(db),
                "--api-key-env",
                "MY_JOULE_KEY",
                env={"MY_JOULE_KEY": APP_KEY},
            )
            assert result.returncode == 0, result.stdout + result.stderr
            assert APP_KEY not in result.stdout + result.stderr
            unset = cli("--from-api", sim.base_url, "--db", str(db), "--api-key-env", "NOT_SET_ANYWHERE")
            assert unset.returncode == 2 and "NOT_SET_ANYWHERE" in unset.stderr
    finally:
        joule_otel.uninstrument()


def test_the_full_result_goes_to_a_file_in_every_format(books, tmp_path):
    tmp, db, receipts = books
    cron = {r.receipt_id for r in receipts if r.token == "jc_…c41f"}
    for fmt in ("json", "csv", "markdown"):
        out = tmp_path / f"result.{fmt}"
        result = cli("--bill", str(tmp / "bill.csv"), "--db", str(db), "--format", fmt, "--out", str(out))
        assert result.returncode == 1 and "Billed:" in result.stdout  # the summary still prints
        text = out.read_text(encoding="utf-8")
        assert all(receipt in text for receipt in cron), fmt
    rows = list(csv.DictReader((tmp_path / "result.csv").open(encoding="utf-8")))
    assert {r["receipt_id"] for r in rows if r["finding"] == "billed_not_in_ledger"} == cron


def test_reconcile_never_writes_to_a_ledger(books):
    tmp, db, _ = books
    spool = db.parent / f".{db.name}.spool"
    before = (hashlib.sha256(db.read_bytes()).hexdigest(), sorted(p.name for p in db.parent.iterdir()))
    spooled = sorted(p.name for p in spool.iterdir()) if spool.exists() else []
    assert cli("--bill", str(tmp / "bill.csv"), "--db", str(db)).returncode == 1
    assert (hashlib.sha256(db.read_bytes()).hexdigest(), sorted(p.name for p in db.parent.iterdir())) == before
    assert (sorted(p.name for p in spool.iterdir()) if spool.exists() else []) == spooled


# -- bills that cannot be read --------------------------------------------------------------------------------------
def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_text(text, encoding=encoding)
    return path


GOOD = (
    "receipt_id,billed_at,energy_j,token\nr1,2026-11-02T10:00:00Z,10.5,jc_…0001\nr2,2026-11-02T11:00:00Z,3,jc_…0001\n"
)


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("no-receipt.csv", "id_of_call,billed_at,energy_j\nr1,2026-11-02T10:00:00Z,1\n", "no column for receipt_id"),
        ("no-energy.csv", "receipt_id,billed_at,kwh\nr1,2026-11-02T10:00:00Z,1\n", "no column for energy_j"),
        (
            "abc.csv",
            "receipt_id,billed_at,energy_j\nr1,2026-11-02T10:00:00Z,1\nr2,2026-11-02T10:00:01Z,abc\n",
            "row 2, column 'energy_j': \"abc\" is not a number of joules",
        ),
        ("negative.csv", "receipt_id,billed_at,energy_j\nr1,2026-11-02T10:00:00Z,-4\n", "row 1, column 'energy_j'"),
        ("underscore.csv", "receipt_id,billed_at,energy_j\nr1,2026-11-02T10:00:00Z,1_000\n", '"1_000" is not a number'),
        (
            "dupes.csv",
            "receipt_id,billed_at,energy_j\nr1,2026-11-02T10:00:00Z,1\nr2,2026-11-02T10:00:00Z,1\n"
            "r1,2026-11-02T10:00:09Z,1\n",
            'receipt "r1" appears more than once (rows 1, 3)',
        ),
        ("when.csv", "receipt_id,billed_at,energy_j\nr1,yesterday,1\n", "row 1, column 'billed_at': \"yesterday\""),
        ("empty.csv", "", "the file is empty"),
        ("header-only.csv", "receipt_id,billed_at,energy_j\n", "no receipts"),
        (
            "blank-receipt.csv",
            "receipt_id,billed_at,energy_j\n ,2026-11-02T10:00:00Z,1\n",
            "row 1, column 'receipt_id': no receipt id",
        ),
        (
            "ragged.csv",
            "receipt_id,billed_at,energy_j\nr1,2026-11-02T10:00:00Z,1,extra,fields\n",
            "cannot be read as CSV",
        ),
    ],
)
def test_a_bill_that_cannot_be_read_is_exit_2_naming_file_row_and_column(books, tmp_path, name, text, expected):
    _, db, _ = books
    bill = write(tmp_path / name, text)
    result = cli("--bill", str(bill), "--db", str(db))
    assert result.returncode == 2, result.stdout + result.stderr
    assert str(bill) in result.stderr and expected in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1  # one line, no traceback


def test_a_parquet_bill_of_another_shape_is_exit_2(books, tmp_path):
    _, db, _ = books
    bill = tmp_path / "other.parquet"
    pq.write_table(pa.table({"invoice": ["i1"], "amount_eur": [12.5]}), bill)
    result = cli("--bill", str(bill), "--db", str(db))
    assert result.returncode == 2 and "no column for receipt_id, energy_j, billed_at" in result.stderr


def test_a_spreadsheets_csv_with_a_bom_quotes_and_other_names_is_read(books, tmp_path):
    """Excel's UTF-8 CSV (a byte-order mark), quoted fields with commas and line breaks, epoch milliseconds, and a
    column named by --map."""
    _, db, receipts = books
    app = [r for r in receipts if r.token == "jc_…a1b2"]
    lines = ["Receipt,Created_At,Joules Billed,Key_Name,Note"]
    for r in app:
        lines.append(f'{r.receipt_id},{int(r.billed_at * 1000)},{r.energy_j},"jc_…a1b2","support, team\nline two"')
    bill = write(tmp_path / "excel.csv", "\ufeff" + "\r\n".join(lines) + "\r\n")
    result = cli("--bill", str(bill), "--db", str(db), "--map", "energy_j=joules billed", "--format", "json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["coverage"]["found_calls"] == 6
    unknown = cli("--bill", str(bill), "--db", str(db), "--map", "kwh=Joules Billed")
    assert unknown.returncode == 2 and "--map names no bill field 'kwh'" in unknown.stderr


def test_names_from_a_bill_are_text_in_the_terminal_and_in_markdown(books, tmp_path):
    _, db, _ = books
    hostile = "jc_\x1b[31mRED\x1b[0m|`**x**`"
    bill = write(
        tmp_path / "hostile.csv",
        f'receipt_id,billed_at,energy_j,token\n"r_\x1b]8;;http://x\x07",2026-11-02T10:00:00Z,10,"{hostile}"\n',
    )
    text = cli("--bill", str(bill), "--db", str(db))
    assert text.returncode == 1 and "\x1b" not in text.stdout and "\\u001b[31mRED" in text.stdout
    markdown = cli("--bill", str(bill), "--db", str(db), "--format", "markdown")
    assert "\x1b" not in markdown.stdout and "\\|" in markdown.stdout


def test_a_ledger_that_is_not_there_and_a_period_backwards_are_exit_2(books, tmp_path):
    tmp, _, _ = books
    missing = cli("--bill", str(tmp / "bill.csv"), "--db", str(tmp_path / "nowhere.duckdb"))
    assert missing.returncode == 2 and "no ledger at" in missing.stderr
    backwards = cli(
        "--bill", str(tmp / "bill.csv"), "--db", str(tmp / "app.duckdb"), "--from", "2026-11-02", "--to", "2026-11-01"
    )
    assert backwards.returncode == 2 and "ends" in backwards.stderr


def test_days_and_hours_are_counted_in_the_time_zone_asked_for(tmp_path):
    bill = write(
        tmp_path / "tz.csv",
        "receipt_id,billed_at,energy_j,token\n"
        "a,2026-11-01T21:30:00Z,1,k\nb,2026-11-01T22:30:00Z,2,k\nc,2026-11-02T09:00:00Z,4,k\n",
    )
    ledger = tmp_path / "empty.duckdb"
    import duckdb

    from joule_otel.ledger._schema import create_statements

    with duckdb.connect(str(ledger)) as con:
        for statement in create_statements():
            con.execute(statement)
    result = rc.reconcile(bill, [ledger], tz=rc.zone("Europe/Helsinki"))
    # Helsinki is UTC+2 in November: 21:30Z is 23:30 on the 1st, 22:30Z is 00:30 on the 2nd
    assert [(d["day"], d["billed_calls"]) for d in result.by_day] == [("2026-11-01", 1), ("2026-11-02", 2)]
    assert result.missing_groups[0]["hours"] == "00, 11, 23 h Europe/Helsinki"
    start = rc.instant("2026-11-02", rc.zone("Europe/Helsinki"), "--from")
    assert start == datetime(2026, 11, 1, 22, 0, tzinfo=timezone.utc)
    part = rc.reconcile(bill, [ledger], start=start, tz=rc.zone("Europe/Helsinki"))
    assert part.billed_calls == 2 and part.billed_j == 6


# -- the dashboard's Bill tab ---------------------------------------------------------------------------------------
def test_the_bill_tab_shows_the_commands_figures(books, tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    tmp, db, _ = books
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("JOULE_OTEL_DB", str(db))
    monkeypatch.setenv("JOULE_OTEL_BILL", str(tmp / "bill.csv"))
    monkeypatch.delenv("JOULE_OTEL_BUDGETS", raising=False)
    app = Path(rc.__file__).parent / "dashboard" / "app.py"
    at = AppTest.from_file(str(app), default_timeout=90).run()
    assert not at.exception, at.exception
    at.sidebar.selectbox(key="f_range_select").set_value("All data").run()
    assert not at.exception, at.exception
    metrics = {m.label: m for m in at.metric}
    # the command over the same period: the page's, as its caption states it
    _, found = report("--bill", str(tmp / "bill.csv"), "--db", str(db))
    coverage = found["coverage"]
    assert metrics["Coverage of joules"].value == f"{coverage['joules_share']:.1%}"
    assert metrics["Coverage of receipts"].value == f"{coverage['calls_share']:.1%}"
    assert metrics[f"Billed: {coverage['billed_calls']:,} receipts"].value == units.energy(coverage["billed_j"])
    assert metrics[f"In the ledger: {coverage['found_calls']:,} receipts"].value == units.energy(coverage["found_j"])
    groups = next(df.value for df in at.dataframe if "hours" in df.value.columns)
    assert list(groups["token"]) == [g["token"] for g in found["billed_not_in_ledger"]["groups"]]
    assert list(groups["calls"]) == [g["calls"] for g in found["billed_not_in_ledger"]["groups"]]
    receipts = next(df.value for df in at.dataframe if "billed" in df.value.columns)
    assert set(receipts["receipt"]) == {r["receipt_id"] for r in found["billed_not_in_ledger"]["receipts"]}
    at.text_input(key="bill_path").set_value(str(tmp_path / "nowhere.csv")).run()
    assert not at.exception and any("no such file" in e.value for e in at.error)


def test_a_hosts_ledger_and_collects_central_ledger_together(tmp_path):
    """An app that keeps a local ledger and sends call events to `collect`: both ledgers hold its calls, together they
    explain its bill, and every call is counted once (and said to be in both)."""
    from test_collect import run_app, start_collect, stop

    central = start_collect(tmp_path / "central.duckdb")
    local = tmp_path / "local.duckdb"
    try:
        with running(require_auth=True) as sim:
            run_app(tmp_path, sim.base_url, central, JOULE_OTEL_DB=str(local))
            sim.write_bill(tmp_path / "bill.csv")
            receipts = sim.receipts
    finally:
        stop(central)
    assert len(receipts) == 4
    code, found = report("--bill", str(tmp_path / "bill.csv"), "--db", str(local), "--db", str(central.db))
    assert code == 0, found
    assert found["coverage"]["found_calls"] == 4 and found["in_two_ledgers"]["calls"] == 4
    assert {r["receipt_id"] for r in found["in_two_ledgers"]["receipts"]} == {r.receipt_id for r in receipts}
    code, alone = report("--bill", str(tmp_path / "bill.csv"), "--db", str(central.db))
    assert code == 0 and alone["coverage"]["found_calls"] == 4 and alone["in_two_ledgers"]["calls"] == 0
