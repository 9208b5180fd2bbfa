"""The dashboard: queries against a ledger with known sums, and the Streamlit app driven by AppTest."""

from __future__ import annotations

import base64
import json
import math
import re
from datetime import datetime, time, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from joule_otel import _units as units
from joule_otel._budgets import Budget, load_budgets
from joule_otel.dashboard import _charts as charts
from joule_otel.dashboard import _queries as queries
from joule_otel.dashboard._sources import SAMPLE_PATH, Source, source_for
from joule_otel.ledger import _reader as reader
from joule_otel.ledger import _schema as schema
from joule_otel.ledger._compact import compact
from joule_otel.ledger._spool import Spool
from joule_otel.ledger._writer import rows_to_arrow

APP = str(Path(__file__).resolve().parent.parent / "joule_otel" / "dashboard" / "app.py")
T0 = datetime(2026, 11, 10, 12, tzinfo=timezone.utc)


def row(**values) -> tuple:
    record = dict.fromkeys(schema.COLUMN_NAMES)
    record.update(values)
    record["started_at"] = int(record["started_at"].timestamp() * 1_000_000)
    return tuple(record[name] for name in schema.COLUMN_NAMES)


KNOWN = [
    # workload, requested, routed, region, tier, energy, carbon, out tokens, status, minutes after T0
    ("bot", "auto", "gpt-oss-120b", "eu-fi", "standard", 100.0, 2.0, 200, 200, 0),
    ("bot", "auto", "gpt-oss-120b", "eu-fi", "standard", 50.0, 1.0, 100, 200, 10),
    ("bot", "auto", "llama-3.3-70b-instruct", "us-east", "priority", 300.0, 30.8, 250, 200, 20),
    ("batch", "llama-3.3-405b-instruct", "llama-3.3-405b-instruct", "ap-in", "batch", 1000.0, 196.7, 220, 200, 30),
    ("batch", "llama-3.3-405b-instruct", None, None, None, None, None, None, 402, 40),
]


@pytest.fixture
def known_ledger(tmp_path) -> Path:
    db = tmp_path / "known.duckdb"
    rows = []
    for i, (wl, req, routed, region, tier, energy, carbon, out, status, minutes) in enumerate(KNOWN):
        rows.append(
            row(
                receipt_id=f"rcpt_{i}" if status == 200 else None,
                started_at=T0 + timedelta(minutes=minutes),
                workload=wl,
                service="svc",
                requested_model=req,
                routed_to=routed,
                region=region,
                tier=tier,
                energy_j=energy,
                carbon_mg=carbon,
                output_tokens=out,
                input_tokens=10,
                status_code=status,
                error_type="insufficient_balance" if status == 402 else None,
                duration_ms=100.0 + i,
                operation="chat",
                stream=False,
            )
        )
    Spool(db).write_segment(rows_to_arrow(rows))
    compact(db)
    return db


def test_kpis_breakdowns_and_previous_period(known_ledger):
    window = queries.Filters(start=T0, end=T0 + timedelta(hours=1))
    with reader.connect(known_ledger) as con:
        kpi = queries.kpis(con, window)
        assert kpi["energy_j"] == 1450.0
        assert kpi["carbon_mg"] == pytest.approx(230.5)
        assert kpi["calls"] == 5
        assert kpi["refused_402"] == 1
        assert kpi["mean_j_per_call"] == pytest.approx(1450 / 4)
        assert kpi["j_per_1k_output"] == pytest.approx(1450 / 770 * 1000)
        assert kpi["auto_share"] == pytest.approx(3 / 5)
        assert kpi["previous"]["calls"] == 0
        by_workload = queries.breakdown(con, window, "workload").set_index("group")
        assert by_workload.loc["bot", "energy_j"] == 450.0
        assert by_workload.loc["batch", "errors"] == 1
        flows = queries.router_flows(con, window)
        auto = flows[flows.requested == "auto"].set_index("routed")["energy_j"].to_dict()
        assert auto == {"gpt-oss-120b": 150.0, "llama-3.3-70b-instruct": 300.0}
        regions = queries.carbon_by_region(con, window).set_index("region")
        assert regions.loc["eu-fi", "mg_per_j"] == pytest.approx(0.02)
        assert regions.loc["ap-in", "g_per_kwh"] == pytest.approx(196.7 / 1000 * 3600)
        efficiency = queries.model_efficiency(con, window).set_index("model")
        assert efficiency.loc["gpt-oss-120b", "j_per_output_token"] == pytest.approx(0.5)
        over_time = queries.energy_over_time(con, window, "tier", "1 hour")
        assert over_time.energy_j.sum() == 1450.0
        hist = queries.energy_histogram(con, window)
        assert hist.calls.sum() == 4
        assert (hist.bin_start_j <= 50).any() and (hist.bin_end_j > 1000).any()
        savings = queries.carbon_savings(con, window).set_index("workload")
        assert savings.loc["batch", "cleanest_region"] == "eu-fi"
        assert savings.loc["batch", "if_cleanest_mg"] == pytest.approx(1000 * 0.02)
        later = queries.Filters(start=T0 + timedelta(hours=1), end=T0 + timedelta(hours=2))
        assert queries.kpis(con, later)["previous"]["calls"] == 5


def test_filters_are_parameters_never_sql(known_ledger):
    hostile = "x' OR 1=1 --"
    with reader.connect(known_ledger) as con:
        assert queries.receipts(con, queries.Filters(workloads=(hostile,))).empty
        assert queries.receipts(con, queries.Filters(), search=hostile).empty
        assert list(queries.receipts(con, queries.Filters(), search="RCPT_3").receipt_id) == ["rcpt_3"]
        assert len(queries.receipts(con, queries.Filters(status="errors"))) == 1
        assert len(queries.receipts(con, queries.Filters(status="ok", regions=("eu-fi",)))) == 2
        assert len(queries.receipts(con, queries.Filters(models=("gpt-oss-120b",), tiers=("standard",)))) == 2


def test_budgets_month_to_date(known_ledger, tmp_path):
    as_of = T0 + timedelta(hours=1)
    with reader.connect(known_ledger) as con:
        status = queries.budget_status(con, queries.Filters(), {"batch": 2000.0, "bot": 400.0}, as_of)
        burn = queries.budget_burn(con, queries.Filters(), ["batch", "bot"], as_of)
    status = status.set_index("workload")
    assert status.loc["batch", "spent_j"] == 1000.0
    assert status.loc["batch", "refused_402"] == 1
    assert status.loc["bot", "used_share"] == pytest.approx(450 / 400)
    assert burn.groupby("workload").cumulative_j.max().to_dict() == {"batch": 1000.0, "bot": 450.0}
    (tmp_path / "b.csv").write_text("workload,budget_j\nbot,12.5\n")
    (tmp_path / "b.toml").write_text("[budgets]\nbot = 7\n")
    (tmp_path / "bad.json").write_text('{"bot": "lots"}')
    assert load_budgets(tmp_path / "b.csv") == [Budget("bot", 12.5)]
    assert load_budgets(tmp_path / "b.toml") == [Budget("bot", 7.0)]
    with pytest.raises(ValueError, match="must be a positive number of joules"):
        load_budgets(tmp_path / "bad.json")


def test_units_read_like_a_person_writes():
    assert units.energy(950) == "950 J"
    assert units.energy(1234) == "1.23 kJ"
    assert units.energy(5_330_000) == "5.33 MJ"
    assert units.energy_wh(3.6e6) == "1.00 kWh"
    assert units.carbon(479_000) == "479 g CO2e"
    assert units.carbon(12) == "12.0 mg CO2e"
    assert "phone charges" in units.energy_equivalent(540_000)
    assert "km by car" in units.carbon_equivalent(479_000 * 10)


UNIT_FACTORS = {"J": 1.0, "kJ": 1e3, "MJ": 1e6, "GJ": 1e9, "mg": 1.0, "g": 1e3, "kg": 1e6}


def figure_values(chart, key: str = "y") -> float:
    """The sum a chart draws, in base units (J, mg): the axis title says the scale, e.g. "Energy (kJ)"."""
    spec = json.loads(chart.proto.spec)
    total = 0.0
    for trace in spec["data"]:
        values = trace.get(key)
        if isinstance(values, dict) and "bdata" in values:
            values = np.frombuffer(base64.b64decode(values["bdata"]), dtype=np.dtype(values["dtype"]))
        total += float(np.nansum(np.asarray(values, dtype=float)))
    title = spec["layout"][f"{key}axis"]["title"]["text"]
    unit = title.rsplit("(", 1)[-1].split(")")[0].split()[0]
    return total * UNIT_FACTORS[unit]


def charts_by_id(at) -> dict[str, object]:
    return {c.proto.id.rsplit("-", 1)[-1]: c for c in at.get("plotly_chart")}


@pytest.fixture
def isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("JOULE_OTEL_DB", raising=False)
    monkeypatch.delenv("JOULE_OTEL_BUDGETS", raising=False)
    monkeypatch.delenv("JOULE_OTEL_TRACE_URL", raising=False)
    return tmp_path


def run_app() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=90).run()
    assert not at.exception, at.exception
    return at


def url_list(at: AppTest, key: str) -> list[str]:
    value = at.query_params[key]
    return [value] if isinstance(value, str) else list(value)


def test_app_on_sample_data_obeys_every_filter(isolated_home):
    at = run_app()
    assert "Bundled sample data" in at.sidebar.caption[0].value
    sample = Source(SAMPLE_PATH, "sample", "")
    with sample.connect() as con:
        total = con.execute("SELECT sum(energy_j), count(*) FROM inference_calls").fetchone()
        opts = queries.options(con)
    charts = charts_by_id(at)
    assert {
        "energy_over_time",
        "by_workload",
        "by_model",
        "by_region",
        "by_tier",
        "treemap",
        "router_flows",
        "carbon_regions",
        "energy_histogram",
        "latency_energy",
        "budget_burn",
        "j_per_output_token",
        "j_per_input_token",
    } <= set(charts)
    assert at.selectbox(key="f_range_select").value in ("Last 30 days", "All data")
    assert figure_values(charts["energy_over_time"]) == pytest.approx(total[0])
    assert figure_values(charts["by_workload"], "x") == pytest.approx(total[0])
    assert at.metric[2].value == f"{total[1]:,}"
    assert int(at.metric[6].value.replace(",", "")) > 0, "the sample's batch job ran out of budget"

    for key, values in (
        ("workload", ["support-bot"]),
        ("model", ["gpt-oss-120b"]),
        ("region", ["eu-fi"]),
        ("tier", ["standard"]),
        ("service", ["support-api"]),
    ):
        at.multiselect(key=f"f_{key}_select").set_value(values).run()
        assert not at.exception
        assert url_list(at, key) == values, "the address bar is a link to this view"
        filters = queries.Filters(**{key + "s": tuple(values)})
        with sample.connect() as con:
            expected = queries.kpis(con, filters)["energy_j"]
        charts = charts_by_id(at)
        assert figure_values(charts["energy_over_time"]) == pytest.approx(expected), key
        assert figure_values(charts["by_workload"], "x") == pytest.approx(expected), key
        at.multiselect(key=f"f_{key}_select").set_value([]).run()

    at.selectbox(key="f_status_select").set_value("402 only").run()
    assert not at.exception
    assert at.warning, "a selection of only refused calls explains itself"
    at.selectbox(key="f_status_select").set_value("all").run()
    first = opts["first"].astimezone(timezone.utc)
    at.selectbox(key="f_range_select").set_value("Custom").run()
    at.date_input(key="start_day").set_value(first.date()).run()
    at.time_input(key="start_time").set_value(time(0, 0)).run()
    at.date_input(key="end_day").set_value(first.date() + timedelta(days=1)).run()
    at.time_input(key="end_time").set_value(time(0, 0)).run()
    assert not at.exception
    day_start = datetime.combine(first.date(), time(0, 0), timezone.utc)
    with sample.connect() as con:
        one_day = queries.kpis(con, queries.Filters(start=day_start, end=day_start + timedelta(days=1)))["energy_j"]
    assert figure_values(charts_by_id(at)["energy_over_time"]) == pytest.approx(one_day)
    assert url_list(at, "from") == [day_start.strftime("%Y-%m-%dT%H:%M")]
    at.radio(key="f_split").set_value("region").run()
    assert not at.exception
    at.text_input(key="search").set_value("rcpt_").run()
    assert not at.exception
    at.toggle(key="live").set_value(True).run()
    assert not at.exception


def test_the_sample_splits_and_filters_by_any_tag_and_its_chargeback_table_is_the_reports(isolated_home):
    from joule_otel._report import compute, dimensions, period

    sample = Source(SAMPLE_PATH, "sample", "")
    with sample.connect() as con:
        opts = queries.options(con)
        acme = con.execute(
            "SELECT sum(energy_j), count(*) FROM inference_calls WHERE tags['customer'] = 'acme'"
        ).fetchone()
        by_team = dict(
            con.execute(
                "SELECT coalesce(tags['team'], '(untagged)'), sum(energy_j) FROM inference_calls GROUP BY 1"
            ).fetchall()
        )
    assert set(opts["tags"]) == {"team", "customer"} and "acme" in opts["tags"]["customer"]
    at = AppTest.from_file(APP, default_timeout=90)
    at.query_params.update({"range": "All data"})
    at.run()
    assert not at.exception, at.exception
    assert {"tag: team", "tag: customer"} <= set(at.radio(key="f_split").options)
    at.radio(key="f_split").set_value("tag: team").run()
    assert not at.exception, at.exception
    assert at.query_params["split"] == "tag: team", "a link keeps the split by tag"
    table = next(df.value for df in at.dataframe if "share of energy" in df.value.columns)
    assert set(table["team"]) == set(by_team)
    assert figure_values(charts_by_id(at)["energy_over_time"]) == pytest.approx(sum(by_team.values()))
    assert "chargeback_team_csv" in {b.key for b in at.get("download_button")}

    at.multiselect(key="f_tag_select").set_value(["customer=acme"]).run()
    assert not at.exception, at.exception
    assert url_list(at, "tag") == ["customer=acme"]
    assert at.metric[2].value == f"{acme[1]:,}"
    assert figure_values(charts_by_id(at)["energy_over_time"]) == pytest.approx(acme[0])
    table = next(df.value for df in at.dataframe if "share of energy" in df.value.columns)
    assert list(table["team"]) == ["support", "search"] or list(table["team"]) == ["search", "support"]

    # the same figures as `joule-otel report --by team` over the sample's whole span
    with sample.connect() as con:
        whole = queries.chargeback(con, queries.Filters(), "tag: team").set_index("group")
    span = period(f"{opts['first']:%Y-%m-%d}..{opts['last'] + timedelta(days=1):%Y-%m-%d}")
    with sample.connect() as con:
        report = compute(con, dimensions("team"), span)
    assert {g["team"]: g["energy_j"] for g in report.groups} == pytest.approx(whole["energy_j"].to_dict())
    assert report.total["calls"] == int(whole["calls"].sum())


def test_a_link_with_values_no_widget_can_show_opens_the_default_view(isolated_home):
    at = AppTest.from_file(APP, default_timeout=90)
    at.query_params.update({"range": "Last century", "split": "colour", "status": "x", "tz": "Mars/Olympus_Mons"})
    at.run()
    assert not at.exception, at.exception
    assert at.radio(key="f_split").value == "workload"
    assert at.selectbox(key="f_tz_select").value == "UTC"
    assert "Mars/Olympus_Mons" not in at.selectbox(key="f_tz_select").options


def test_a_shared_link_restores_the_view(isolated_home):
    """Query parameters (what the address bar held when a link was shared) set every filter on arrival."""
    sample = Source(SAMPLE_PATH, "sample", "")
    with sample.connect() as con:
        first = queries.options(con)["first"].astimezone(timezone.utc)
    day = first.date()
    at = AppTest.from_file(APP, default_timeout=90)
    at.query_params.update(
        {
            "range": "Custom",
            "from": f"{day}T00:00",
            "to": f"{day + timedelta(days=2)}T00:00",
            "workload": ["support-bot", "nightly-summaries"],
            "status": "ok",
            "tz": "UTC",
        }
    )
    at.run()
    assert not at.exception, at.exception
    assert at.selectbox(key="f_range_select").value == "Custom"
    assert at.date_input(key="start_day").value == day
    assert at.multiselect(key="f_workload_select").value == ["support-bot", "nightly-summaries"]
    assert at.selectbox(key="f_status_select").value == "ok"
    start = datetime.combine(day, time(0, 0), timezone.utc)
    filters = queries.Filters(
        start=start,
        end=start + timedelta(days=2),
        workloads=("support-bot", "nightly-summaries"),
        status="ok",
    )
    with sample.connect() as con:
        expected = queries.kpis(con, filters)
    assert at.metric[2].value == f"{expected['calls']:,}"
    assert figure_values(charts_by_id(at)["energy_over_time"]) == pytest.approx(expected["energy_j"])


def test_app_on_a_fresh_ledger_with_trace_links(isolated_home, monkeypatch, joule_simulator):
    import openai

    import joule_otel

    db = isolated_home / "fresh.duckdb"
    joule_otel.instrument(db=db, flush_interval=0.2)
    try:
        client = openai.OpenAI(base_url=joule_simulator.base_url, api_key="k", max_retries=0)
        with joule_otel.workload("fresh"):
            for _ in range(5):
                client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}])
        joule_otel.flush()
    finally:
        joule_otel.uninstrument()
    monkeypatch.setenv("JOULE_OTEL_DB", str(db))
    monkeypatch.setenv("JOULE_OTEL_TRACE_URL", "http://127.0.0.1:3000/trace/{trace_id}")
    at = run_app()
    assert units.plain(str(db)) in at.sidebar.caption[0].value  # shown as text, markup escaped
    assert at.metric[2].value == "5" and at.metric[2].label == "Calls"
    assert {m.proto.delta for m in at.metric} == {"no earlier data"}  # said, rather than a blank or a cut-off label
    expected = sum(r.energy_j for r in joule_simulator.receipts)
    assert figure_values(charts_by_id(at)["energy_over_time"]) == pytest.approx(expected)
    frames = [df.value for df in at.dataframe]
    receipts_table = next(f for f in frames if "receipt_id" in f.columns)
    assert set(receipts_table.receipt_id) == {r.receipt_id for r in joule_simulator.receipts}
    shown = next(df for df in at.dataframe if "receipt_id" in df.value.columns)
    assert list(shown.proto.column_order) == [  # what a person reads first, in view; the rest on demand
        "started_at", "workload", "routed_to", "energy_j", "status_code", "receipt_id", "trace"
    ]  # fmt: skip
    at.toggle(key="receipts_all").set_value(True).run()
    assert not list(next(df for df in at.dataframe if "receipt_id" in df.value.columns).proto.column_order)
    assert "trace" in receipts_table.columns  # the template is applied (no spans here, so no ids to link)


def test_empty_ledger_and_missing_path_show_help_not_tracebacks(isolated_home, monkeypatch):
    monkeypatch.setenv("JOULE_OTEL_DB", str(isolated_home / "empty.duckdb"))
    at = run_app()
    assert any("No inference calls" in i.value for i in at.info)
    at.text_input(key="source_path").set_value(str(isolated_home / "missing.parquet")).run()
    assert not at.exception
    assert at.sidebar.error


def test_source_for_picks_the_reader_by_suffix(tmp_path):
    assert source_for(tmp_path / "a.parquet", "").kind == "parquet"
    assert source_for(tmp_path / "a.csv", "").kind == "csv"
    assert source_for(tmp_path / "a.duckdb", "").kind == "ledger"


@pytest.fixture(scope="module")
def rollup_and_raw(tmp_path_factory):
    """The same calls twice: a ledger (rollup, built over several compactions, plus spooled rows) and a
    Parquet export of it (read row by row)."""
    import random

    rng = random.Random(11)
    tmp = tmp_path_factory.mktemp("rollup")
    db = tmp / "ledger.duckdb"
    spool = Spool(db)
    start = datetime(2026, 11, 2, 0, 0, tzinfo=timezone.utc)
    batches = []
    for batch in range(4):
        rows = []
        for i in range(600):
            status = rng.choice([200] * 8 + [402, 500])
            energy = None if status != 200 else rng.choice([None, rng.lognormvariate(4, 1.5)])
            rows.append(
                row(
                    receipt_id=f"r{batch}-{i}" if status == 200 else None,
                    started_at=start + timedelta(minutes=rng.uniform(0, 3 * 24 * 60)),
                    service=rng.choice(["api", "worker"]),
                    workload=rng.choice(["bot", "batch", "search", None]),
                    operation=rng.choice(["chat", "embeddings"]),
                    requested_model=rng.choice(["auto", "llama-3.3-405b-instruct"]),
                    routed_to=None if status != 200 else rng.choice(["gpt-oss-120b", "llama-3.3-70b-instruct"]),
                    region=rng.choice(["eu-fi", "us-east", None]),
                    tier=rng.choice(["batch", "standard", "priority"]),
                    energy_j=energy,
                    carbon_mg=None if energy is None or rng.random() < 0.1 else energy * 0.02,
                    input_tokens=rng.randint(1, 500),
                    output_tokens=rng.choice([None, 0, rng.randint(1, 900)]),
                    status_code=status,
                    error_type={402: "insufficient_balance", 500: "500"}.get(status),
                    duration_ms=rng.uniform(50, 5000),
                    stream=rng.random() < 0.5,
                )
            )
        batches.append(rows)
    for rows in batches[:3]:  # three compactions that touch the same hours: the rollup merges them
        spool.write_segment(rows_to_arrow(rows))
        compact(db)
    spool.write_segment(rows_to_arrow(batches[3]))  # spooled, not compacted
    export = tmp / "export.parquet"
    with reader.connect(db) as con:
        con.execute(f"COPY (SELECT * FROM inference_calls) TO '{export}' (FORMAT parquet)")
        assert con.execute("SELECT count(*) FROM calls_rollup").fetchone()[0] < 2400
    return db, export, start


def _frames_equal(a, b, keys):

    a = a.sort_values(keys).reset_index(drop=True)
    b = b.sort_values(keys).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b, check_dtype=False, check_exact=False, rtol=1e-9)


@pytest.mark.parametrize("case", range(12))
def test_rollup_answers_equal_row_by_row_answers(rollup_and_raw, case):
    """Whole hours from the rollup, edges and spooled rows from single calls: the same figures exactly."""
    import random

    db, export, start = rollup_and_raw
    rng = random.Random(case)
    zone = timezone(timedelta(hours=5, minutes=30)) if case % 2 else timezone.utc  # hours that are not UTC hours
    begin = (start + timedelta(minutes=rng.uniform(-60, 2 * 24 * 60))).astimezone(zone) if case % 4 else None
    end = (begin or start) + timedelta(minutes=rng.uniform(1, 2 * 24 * 60)) if case % 3 else None
    filters = queries.Filters(
        start=begin,
        end=end,
        workloads=tuple(rng.sample(["bot", "batch", "search"], rng.randint(0, 2))),
        regions=tuple(rng.sample(["eu-fi", "us-east"], rng.randint(0, 1))),
        status=rng.choice(queries.STATUSES),
    )
    raw_source = Source(export, "parquet", "test")
    with reader.connect(db) as rolled, raw_source.connect() as raw:
        assert queries._has_rollup(rolled) and not queries._has_rollup(raw)
        k1, k2 = queries.kpis(rolled, filters), queries.kpis(raw, filters)
        for name in ("energy_j", "carbon_mg", "calls", "refused_402", "errors"):
            assert k1[name] == pytest.approx(k2[name]), name
        for name in ("mean_j_per_call", "j_per_1k_output", "auto_share"):
            assert k1[name] == pytest.approx(k2[name], nan_ok=True) if k1[name] is not None else k2[name] is None
        for by in ("workload", "model", "region", "tier"):
            _frames_equal(queries.breakdown(rolled, filters, by), queries.breakdown(raw, filters, by), ["group"])
        for bucket in ("1 hour", "1 day", "7 days"):
            _frames_equal(
                queries.energy_over_time(rolled, filters, "workload", bucket),
                queries.energy_over_time(raw, filters, "workload", bucket),
                ["bucket", "group"],
            )
        weeks = queries.energy_over_time(rolled, filters, "workload", "7 days").bucket
        assert all(week.weekday() == 0 and week.hour == 0 for week in weeks)  # naive, in the zone asked (UTC)
        for zone in ("Asia/Kolkata", "America/St_Johns", "Europe/Helsinki"):
            days = queries.energy_over_time(rolled, filters, "workload", "1 day", zone)
            _frames_equal(days, queries.energy_over_time(raw, filters, "workload", "1 day", zone), ["bucket", "group"])
            assert all(day.hour == 0 and day.minute == 0 for day in days.bucket)  # midnight in that zone
            assert days.energy_j.sum() == pytest.approx(
                queries.kpis(raw, filters)["energy_j"] if not days.empty else 0.0
            )
        for query, keys in (
            (queries.energy_histogram, ["bin_start_j"]),
            (queries.carbon_by_region, ["region"]),
            (queries.router_flows, ["requested", "routed"]),
            (queries.model_efficiency, ["model", "kind"]),
        ):
            _frames_equal(query(rolled, filters), query(raw, filters), keys)
        as_of = start + timedelta(days=2, minutes=17)
        budgets = {"bot": 5000.0, "batch": 9000.0}
        _frames_equal(
            queries.budget_status(rolled, filters, budgets, as_of),
            queries.budget_status(raw, filters, budgets, as_of),
            ["workload"],
        )
        _frames_equal(
            queries.budget_burn(rolled, filters, list(budgets), as_of),
            queries.budget_burn(raw, filters, list(budgets), as_of),
            ["workload", "day"],
        )
        assert list(queries.receipts(rolled, filters).receipt_id) == list(queries.receipts(raw, filters).receipt_id)


def test_a_rollup_that_disagrees_with_the_rows_is_not_used(known_ledger, caplog):
    import duckdb

    from joule_otel.ledger._maintenance import compact_now

    with duckdb.connect(str(known_ledger)) as con:  # a row deleted by hand: the rollup still counts it
        con.execute("DELETE FROM inference_calls WHERE receipt_id = 'rcpt_3'")
    window = queries.Filters(start=T0, end=T0 + timedelta(hours=1))
    with reader.connect(known_ledger) as con:
        assert not queries._has_rollup(con)
        assert queries.kpis(con, window)["energy_j"] == 450.0  # 1450 J less the deleted 1000 J
    assert "--rebuild-rollup" in caplog.text
    compact_now(known_ledger, timeout_s=10, rebuild_rollup=True)
    with reader.connect(known_ledger) as con:
        assert queries._has_rollup(con)
        assert queries.kpis(con, window)["energy_j"] == 450.0


def test_budgets_tab_says_what_the_service_enforced(known_ledger, isolated_home, monkeypatch):
    """A workload that got 402s never reads "lasts the month", though the file's budget is far from spent."""
    budgets = isolated_home / "budgets.json"
    budgets.write_text(json.dumps({"batch": 1_000_000.0, "bot": 100_000.0}))
    monkeypatch.setenv("JOULE_OTEL_DB", str(known_ledger))
    monkeypatch.setenv("JOULE_OTEL_BUDGETS", str(budgets))
    at = run_app()
    table = next(df.value for df in at.dataframe if "runs out" in df.value.columns).set_index("workload")
    assert table.loc["batch", "runs out"].startswith("402 since")
    assert table.loc["batch", "402 refusals"] == 1
    assert table.loc["bot", "runs out"] == "lasts the month"
    assert table.loc["batch", "spent this month"] == "1.00 kJ"
    assert any("`batch` (1 call)" in w.value for w in at.warning), [w.value for w in at.warning]
    assert table.loc["bot", "used"].endswith("%") and "." not in table.loc["bot", "used"]  # whole percentages
    assert any(units.plain(str(budgets)) in c.value for c in at.caption)  # the budgets file is named
    burn = _spec(charts_by_id(at)["budget_burn"])
    projected = [t for t in burn["data"] if t.get("name") == "projection"]
    assert projected and all(t["line"]["dash"] == "dash" for t in projected)


def test_migration_what_if_and_efficiency_on_real_traffic(isolated_home, monkeypatch, joule_simulator):
    """OpenAI calls (the simulator's stand-in) are counted, estimated as a labelled range, never summed in."""
    import openai

    import joule_otel

    db = isolated_home / "mixed.duckdb"
    joule_otel.instrument(db=db, flush_interval=0.2)
    try:
        legacy = openai.OpenAI(
            base_url=joule_simulator.base_url.replace("/v1", "/openai/v1"), api_key="sk", max_retries=0
        )
        joule = openai.OpenAI(base_url=joule_simulator.base_url, api_key="k", max_retries=0)
        with joule_otel.workload("bot"):
            for _ in range(3):
                legacy.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
            for tier in ("standard", "batch"):
                for _ in range(2):
                    joule.chat.completions.create(
                        model="llama-3.3-70b-instruct",
                        messages=[{"role": "user", "content": "hi"}],
                        extra_headers={"X-Tier": tier, "X-Region": "eu-se"},
                    )
        with joule_otel.workload("index"):
            joule.embeddings.create(model="auto", input=["one two three", "four five"])
        joule_otel.flush()
    finally:
        joule_otel.uninstrument()
    receipts = joule_simulator.receipts
    assert len(receipts) == 5, "the OpenAI stand-in bills nothing"
    monkeypatch.setenv("JOULE_OTEL_DB", str(db))
    at = run_app()
    assert at.metric[2].value == "8" and at.metric[2].label == "Calls, all providers"
    assert at.metric[2].proto.help.startswith("5 served by Joule Cloud, 3 by other providers")
    assert "its 5 calls with a figure" in at.metric[3].proto.help  # energy per call: Joule's energy over Joule's calls
    measured = sum(r.energy_j for r in receipts)
    assert figure_values(charts_by_id(at)["by_workload"], "x") == pytest.approx(measured), "estimates never summed"
    migration = next(df.value for df in at.dataframe if "share of calls" in df.value.columns)
    openai_row = migration[(migration.workload == "bot") & (migration.provider == "OpenAI")].iloc[0]
    assert openai_row["calls"] == 3 and openai_row["share of calls"] == "43 %"
    assert openai_row["energy per call"].startswith("≈ ") and "–" in openai_row["energy per call"]
    joule_row = migration[(migration.workload == "bot") & (migration.provider == "Joule Cloud")].iloc[0]
    bot = [r for r in receipts if r.operation != "embeddings"]
    assert joule_row["energy per call"] == units.energy(sum(r.energy_j for r in bot) / len(bot))
    bot_tokens = sum(r.input_tokens + r.output_tokens for r in bot)
    assert joule_row["energy per 1k tokens"] == units.energy(sum(r.energy_j for r in bot) / bot_tokens * 1000)
    efficiency = next(df.value for df in at.dataframe if "J per output token" in df.value.columns).set_index("kind")
    assert efficiency.loc["embeddings", "J per output token"] == "–"  # one unit per column: none mixed in
    embedding_receipts = [r for r in receipts if r.operation == "embeddings"]
    rate = sum(r.energy_j for r in embedding_receipts) / sum(r.input_tokens for r in embedding_receipts)
    assert float(efficiency.loc["embeddings", "J per input token"]) == float(f"{rate:.3g}")  # three figures
    receipts_table = next(df.value for df in at.dataframe if "receipt_id" in df.value.columns)
    for table in (efficiency, receipts_table):  # a person reads "–" where there is no value, never None or nan
        cells = table.drop(columns=[c for c in ("started_at",) if c in table]).astype(str)
        assert not cells.isin(["None", "nan", "NaN", "<NA>"]).any().any(), table

    at.selectbox(key="wi_workload").set_value("bot").run()
    at.selectbox(key="wi_tier").set_value("batch").run()
    assert not at.exception
    standard = [r for r in receipts if r.tier == "standard"]
    batch = [r for r in receipts if r.tier == "batch"]
    rate_batch = sum(r.energy_j for r in batch) / sum(r.output_tokens for r in batch)
    tokens = sum(r.output_tokens for r in standard + batch)
    saved = sum(r.energy_j for r in standard + batch) - tokens * rate_batch
    headline = next(m.value for m in at.markdown if "would have saved" in m.value or "would have cost" in m.value)
    words = f"saved {units.energy(saved)}" if saved >= 0 else f"cost +{units.energy(-saved)} more"
    assert f"would have {words} (" in headline, headline


def test_opening_a_path_never_writes_or_echoes_it(isolated_home):
    """The "open another ledger" box: any path typed is read only; a bad file's contents never reach the page."""
    folder = isolated_home / "typed"
    folder.mkdir()
    secret = folder / "secret.csv"
    secret.write_text('password=hunter2,token=abc\n\x00\x01 not csv at all "\n')
    passwd = folder / "passwd"
    passwd.write_text("root:x:0:0:root:/root:/bin/bash\n")
    before = sorted(p.relative_to(isolated_home) for p in isolated_home.rglob("*"))
    at = run_app()
    for typed in (secret, passwd, folder / "missing" / "deeper" / "ledger.duckdb", folder / "gone.parquet"):
        at.text_input(key="source_path").set_value(str(typed)).run()
        assert not at.exception, typed
        shown = " ".join(e.value for e in [*at.error, *at.sidebar.error])
        assert "hunter2" not in shown and "root:x" not in shown, shown
    assert sorted(p.relative_to(isolated_home) for p in isolated_home.rglob("*")) == before


def test_the_ranked_savings_are_the_what_if_answers_and_open_on_one_click(isolated_home):
    sample = Source(SAMPLE_PATH, "sample", "")
    with sample.connect() as con:
        found = queries.moves(con, queries.Filters())
        assert {m.change for m in found} == {"model", "tier", "region"}
        for move in found:  # every move priced as the What-if table prices the same choice
            result = queries.what_if(con, queries.Filters(), move.workload, **{move.change: move.to})
            assert not [m for m in result.missing if m[0] != "carbon"], move
            assert (result.energy_now_j, result.carbon_now_mg) == pytest.approx(
                (move.energy_now_j, move.carbon_now_mg), rel=1e-9
            )
            assert (result.energy_then_j, result.carbon_then_mg) == pytest.approx(
                (move.energy_then_j, move.carbon_then_mg), rel=1e-9
            ), move
    sure, _ = queries.recommendations(found)
    assert sure and all(m.basis_calls >= queries.MIN_RATE_CALLS for m in sure)
    gains = [m.energy_now_j - m.energy_then_j for m in sure]
    assert gains == sorted(gains, reverse=True) and all(
        (m.carbon_now_mg > m.carbon_then_mg) if m.change == "region" else (m.energy_now_j > m.energy_then_j)
        for m in sure
    )
    assert len({(m.workload, m.change) for m in sure}) == len(sure)  # the best of each kind of move, once
    none_sure, all_held = queries.recommendations(found, min_calls=10**9)
    assert none_sure == [] and {(m.workload, m.change) for m in all_held} == {(m.workload, m.change) for m in sure}

    at = run_app()
    table = next(df.value for df in at.dataframe if "energy saved" in df.value.columns)
    top = sure[0]
    assert table.iloc[0]["energy saved"] == units.energy(top.energy_now_j - top.energy_then_j)
    assert table.iloc[0]["measured over"] == f"{top.basis_calls:,} calls"
    # every change reads as what the workload would do: "pin …", "move to the … tier", "run in …"
    assert all(re.fullmatch(r"pin \S+|move to the \S+ tier|run in \S+", c) for c in table["change"]), table["change"]
    opens = [b.label for b in at.button if b.key.startswith("wi_open_")]  # "Details: `wl`, move to the `batch` tier"
    assert opens and all(re.fullmatch(r"Details: `[^`]+`, (pin|move to the|run in) `[^`]+`( tier)?", b) for b in opens)
    next(b for b in at.button if b.key.startswith("wi_open_")).click().run()
    assert not at.exception
    assert at.selectbox(key="wi_workload").value == top.workload
    assert at.selectbox(key=f"wi_{top.change}").value == top.to
    # the Carbon tab, on the same page: the bars carry their numbers, and a line says what the cleanest region saves
    with sample.connect() as con:
        cleanest = queries.carbon_savings(con, queries.Filters())["cleanest_region"].iloc[0]
    chart = _spec(charts_by_id(at)["carbon_savings"])
    assert all(t["text"] and t["textposition"] == "outside" for t in chart["data"])
    assert f"Served from {units.plain(cleanest)}" in next(
        m.value for m in at.markdown if "would have emitted" in m.value
    )
    detail = next(m.value for m in at.markdown if "would have saved" in m.value)
    assert f"saved {units.energy(top.energy_now_j - top.energy_then_j)}" in detail
    assert f"({units.energy(top.energy_then_j)} in all, against {units.energy(top.energy_now_j)}" in detail


def _spec(chart) -> dict:
    return json.loads(chart.proto.spec)


def test_one_colour_per_workload_and_model_on_every_chart_and_range_and_the_router_shows_auto(isolated_home):
    at = run_app()

    def workload_colours() -> dict[str, str]:
        charts = charts_by_id(at)
        bars = {t["name"]: t["marker"]["color"] for t in _spec(charts["energy_over_time"])["data"]}
        tree = _spec(charts["treemap"])["data"][0]
        nodes = {i.removeprefix("w/"): c for i, c in zip(tree["ids"], tree["marker"]["colors"], strict=True)}
        for name, colour in bars.items():  # the same workload, the same colour, in both charts
            assert nodes[name] == colour, name
        by = _spec(charts["by_workload"])["data"][0]
        assert dict(zip(by["y"], by["marker"]["color"], strict=True)) == {n: bars[n] for n in by["y"]}
        return bars

    first = workload_colours()
    assert len(set(first.values())) == len(first)  # no two workloads share a colour
    at.selectbox(key="f_range_select").set_value("Last 7 days").run()
    assert not at.exception
    again = workload_colours()
    assert again and all(first[name] == colour for name, colour in again.items())  # across ranges and reruns

    flows = _spec(charts_by_id(at)["router_flows"])["data"][0]
    labels = flows["node"]["label"]
    pairs = [(labels[s], labels[t]) for s, t in zip(flows["link"]["source"], flows["link"]["target"], strict=True)]
    assert pairs and all(a.removeprefix("asked: ") != b.removeprefix("served: ") for a, b in pairs)
    served = {lab.removeprefix("served: "): c for lab, c in zip(labels, flows["node"]["color"], strict=True)}
    scatter = {t["name"]: t["marker"]["color"] for t in _spec(charts_by_id(at)["latency_energy"])["data"]}
    assert all(served[m] == c for m, c in scatter.items() if m in served)  # a model's colour on both tabs
    at.toggle(key="router_pinned").set_value(True).run()
    at.radio(key="router_by").set_value("calls").run()
    flows = _spec(charts_by_id(at)["router_flows"])["data"][0]
    labels = flows["node"]["label"]
    greyed = [
        colour
        for s, t, colour in zip(flows["link"]["source"], flows["link"]["target"], flows["link"]["color"], strict=True)
        if labels[s].removeprefix("asked: ") == labels[t].removeprefix("served: ")
    ]
    assert greyed and set(greyed) == {"rgba(160,160,160,0.35)"}
    assert _spec(charts_by_id(at)["router_flows"])["layout"]["title"]["text"].endswith("by calls")


@pytest.mark.parametrize("tz_name", ["UTC", "Asia/Kolkata", "America/St_Johns"])
@pytest.mark.parametrize(
    ("bucket", "span"),
    [("5 minutes", timedelta(hours=1)), ("1 hour", timedelta(hours=24)), ("1 day", timedelta(days=7)),
     ("1 day", timedelta(days=30)), ("7 days", timedelta(days=180))],
)  # fmt: skip
def test_time_axes_tick_at_whole_steps_readably_in_every_zone(bucket, span, tz_name):
    end = datetime(2026, 3, 9, 13, 17, tzinfo=timezone.utc)  # a fixed moment: the axis, not today, is under test
    axis = charts.time_axis(bucket, end - span, end, tz_name)
    step = next(ms for ms, dtick in charts.TICK_STEPS if dtick == axis["dtick"])
    assert step >= charts.BUCKET_MS[bucket]  # never finer than the bucket
    first, last = (pd.Timestamp(t) for t in axis["range"])
    anchor, every = pd.Timestamp(axis["tick0"]), pd.Timedelta(milliseconds=step)
    ticks = math.floor((last - anchor) / every) - math.ceil((first - anchor) / every) + 1  # those inside the range
    assert 4 <= ticks <= charts.MAX_TICKS, ticks
    assert anchor.minute == 0 and anchor.second == 0 and anchor <= first  # a whole hour of the zone shown
    assert first == pd.Timestamp(end - span).tz_convert(tz_name).tz_localize(None)
