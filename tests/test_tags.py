"""Chargeback tags: ``tags()`` blocks, baggage, the process's tags, their bounds, and the ledger's ``tags`` column
(schema version 4: older files migrate in place, newer ones are refused by readers).

Real parts throughout: the simulator on loopback, the openai SDK, a real DuckDB file.
"""

from __future__ import annotations

import asyncio
import logging
import threading

import duckdb
import openai
import pytest
from opentelemetry import baggage, context
from support import HI, ledger_rows

import joule_otel
from joule_otel.ledger import LedgerTooNew
from joule_otel.ledger import _schema as schema


def test_blocks_nest_the_inner_wins_and_baggage_and_the_process_are_beneath(ledger_path, joule_simulator):
    joule_otel.instrument(db=ledger_path, flush_interval=0.1, tags={"env": "prod", "team": "platform"})
    try:
        client = openai.OpenAI(base_url=joule_simulator.base_url, api_key="k", max_retries=0)

        def ask(label: str) -> None:
            with joule_otel.workload(label):
                client.chat.completions.create(model="auto", messages=HI)

        ask("process-only")
        with joule_otel.tags(team="search", customer="acme"):
            ask("outer")
            with joule_otel.tags(customer="globex", feature="summaries"):
                ask("inner")
            ask("outer-again")
        token = context.attach(baggage.set_baggage("joule.tag.customer", "from-upstream-service"))
        try:
            ask("baggage")
            with joule_otel.tags(customer="mine"):
                ask("block-over-baggage")
        finally:
            context.detach(token)

        @joule_otel.tags(feature="decorated")
        def decorated() -> None:
            ask("decorated")

        @joule_otel.tags(feature="async")
        async def in_a_task() -> None:
            aclient = openai.AsyncOpenAI(base_url=joule_simulator.base_url, api_key="k", max_retries=0)
            with joule_otel.workload("async"):
                await aclient.chat.completions.create(model="auto", messages=HI)
            await aclient.close()

        decorated()
        asyncio.run(in_a_task())
        assert joule_otel.flush(timeout_s=10)
    finally:
        joule_otel.uninstrument()
    found = {r["workload"]: r["tags"] for r in ledger_rows(ledger_path)}
    base = {"env": "prod", "team": "platform"}
    assert found == {
        "process-only": base,
        "outer": {**base, "team": "search", "customer": "acme"},
        "inner": {**base, "team": "search", "customer": "globex", "feature": "summaries"},
        "outer-again": {**base, "team": "search", "customer": "acme"},
        "baggage": {**base, "customer": "from-upstream-service"},
        "block-over-baggage": {**base, "customer": "mine"},
        "decorated": {**base, "feature": "decorated"},
        "async": {**base, "feature": "async"},
    }


def test_one_tags_object_entered_by_threads_at_once_keeps_each_ones_nesting(ledger_path, joule_simulator):
    shared = joule_otel.tags(team="shared")
    joule_otel.instrument(db=ledger_path, flush_interval=0.1)
    try:
        client = openai.OpenAI(base_url=joule_simulator.base_url, api_key="k", max_retries=0)
        barrier = threading.Barrier(3)

        def worker(n: int) -> None:
            with shared:
                barrier.wait(timeout=10)
                with joule_otel.tags(worker=str(n)), joule_otel.workload(f"w{n}"):
                    client.chat.completions.create(model="auto", messages=HI)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        with joule_otel.workload("after"):
            client.chat.completions.create(model="auto", messages=HI)
        assert joule_otel.flush(timeout_s=10)
    finally:
        joule_otel.uninstrument()
    found = {r["workload"]: r["tags"] for r in ledger_rows(ledger_path)}
    assert found == {
        "w0": {"team": "shared", "worker": "0"},
        "w1": {"team": "shared", "worker": "1"},
        "w2": {"team": "shared", "worker": "2"},
        "after": None,
    }


def test_past_sixteen_tags_the_closest_are_kept_and_the_rest_counted(ledger_path, joule_simulator):
    process = {f"p{i:02}": "x" for i in range(10)}
    block = {f"b{i:02}": "y" for i in range(10)}
    joule_otel.instrument(db=ledger_path, flush_interval=0.1, tags=process)
    try:
        client = openai.OpenAI(base_url=joule_simulator.base_url, api_key="k", max_retries=0)
        with joule_otel.tags(**block):
            client.chat.completions.create(model="auto", messages=HI)
        assert joule_otel.flush(timeout_s=10)
        dropped = joule_otel.stats()["tags_dropped"]
    finally:
        joule_otel.uninstrument()
    (row,) = ledger_rows(ledger_path)
    assert len(row["tags"]) == 16 and set(block) <= set(row["tags"]) and dropped == 4


def test_what_cannot_be_a_tag_is_an_error_in_code_and_a_warning_from_the_environment(
    ledger_path, joule_simulator, monkeypatch, caplog
):
    for bad in ({"Team Name": "x"}, {"team": ""}, {"team": 3}, {"": "x"}):
        with pytest.raises(ValueError, match="tag"):
            joule_otel.tags(**bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="tag"):
            joule_otel.instrument(db=ledger_path, tags=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at most 16"):
        joule_otel.tags(**{f"k{i}": "v" for i in range(17)})
    monkeypatch.setenv("JOULE_OTEL_TAGS", "team=search, Env = Prod ,region=eu")
    joule_otel.instrument(db=ledger_path, flush_interval=0.1)
    try:
        openai.OpenAI(base_url=joule_simulator.base_url, api_key="k", max_retries=0).chat.completions.create(
            model="auto", messages=HI
        )
        assert joule_otel.flush(timeout_s=10)
    finally:
        joule_otel.uninstrument()
    assert ledger_rows(ledger_path)[0]["tags"] == {"team": "search", "env": "Prod", "region": "eu"}
    monkeypatch.setenv("JOULE_OTEL_TAGS", "team=search,oops")
    with caplog.at_level(logging.WARNING, logger="joule_otel"):
        joule_otel.instrument(db=ledger_path, flush_interval=0.1)
        joule_otel.uninstrument()
    assert "JOULE_OTEL_TAGS" in caplog.text and "ignored" in caplog.text


def _version_3_ledger(path) -> None:
    """A ledger as joule-otel wrote it at schema version 3: no ``tags`` column."""
    path.parent.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(path))
    columns = ", ".join(f"{name} {kind}" for name, kind in schema.COLUMNS if name != "tags")
    con.execute(f"CREATE TABLE inference_calls ({columns})")
    con.execute(
        "INSERT INTO inference_calls (receipt_id, started_at, workload, provider, energy_j) "
        "VALUES ('rcpt_old', TIMESTAMPTZ '2026-11-02 10:00:00+00', 'legacy', 'joule_cloud', 5.0)"
    )
    con.execute("CREATE TABLE joule_meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
    con.execute("INSERT INTO joule_meta VALUES ('schema_version', '3')")
    con.close()


def test_a_version_3_ledger_is_read_then_migrated_in_place_and_a_newer_one_is_refused(ledger_path, joule_simulator):
    _version_3_ledger(ledger_path)
    (old,) = ledger_rows(ledger_path)  # read as it is: tags missing, nothing else changed
    assert old["receipt_id"] == "rcpt_old" and old["tags"] is None
    joule_otel.instrument(db=ledger_path, flush_interval=0.1)
    try:
        with joule_otel.tags(team="search"):
            openai.OpenAI(base_url=joule_simulator.base_url, api_key="k", max_retries=0).chat.completions.create(
                model="auto", messages=HI
            )
        assert joule_otel.flush(timeout_s=10)
    finally:
        joule_otel.uninstrument()
    rows = ledger_rows(ledger_path)
    assert sorted(((r["receipt_id"], r["tags"]) for r in rows), key=lambda pair: pair[0] != "rcpt_old") == [
        ("rcpt_old", None),
        (joule_simulator.receipts[0].receipt_id, {"team": "search"}),
    ]
    con = duckdb.connect(str(ledger_path), read_only=True)
    assert con.execute("SELECT value FROM joule_meta WHERE key = 'schema_version'").fetchone() == ("4",)
    assert ("tags", "MAP(VARCHAR, VARCHAR)") in con.execute(
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'inference_calls'"
    ).fetchall()
    con.close()

    con = duckdb.connect(str(ledger_path))
    con.execute("UPDATE joule_meta SET value = '5' WHERE key = 'schema_version'")
    con.close()
    with pytest.raises(LedgerTooNew, match=r"schema version 5.*upgrade joule-otel"):
        joule_otel.read_ledger(ledger_path)


def _ledger_with_tags(path) -> list[dict]:
    """Calls of November 2026 with and without tags, and two just outside it; some compacted, some still spooled."""
    from datetime import datetime, timezone

    from joule_otel.ledger._compact import compact
    from joule_otel.ledger._spool import Spool
    from joule_otel.ledger._writer import rows_to_arrow

    def at(text: str) -> int:
        return int(datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp() * 1_000_000)

    specs = [
        ("2026-10-31T23:59:59", "support", {"team": "search"}, 1000.0),  # the month before
        ("2026-11-01T00:00:00", "support", {"team": "search", "customer": "acme"}, 10.0),
        ("2026-11-03T12:00:00", "support", {"team": "search", "customer": "globex"}, 20.0),
        ("2026-11-10T08:00:00", "batch", {"team": "data"}, 40.0),
        ("2026-11-20T08:00:00", "batch", None, 5.0),
        ("2026-11-30T23:59:59", "support", {"team": "search", "customer": "acme"}, 25.0),
        ("2026-12-01T00:00:00", "batch", {"team": "data"}, 2000.0),  # the month after
    ]
    records = []
    for i, (when, workload, tags, energy) in enumerate(specs):
        record = dict.fromkeys(schema.COLUMN_NAMES)
        record.update(
            receipt_id=f"rcpt_{i}",
            started_at=at(when),
            service="svc",
            workload=workload,
            provider="joule_cloud",
            routed_to="llama-3.3-70b-instruct",
            energy_j=energy,
            carbon_mg=energy / 10,
            input_tokens=10 * (i + 1),
            output_tokens=20 * (i + 1),
            status_code=200,
            tags=tags,
        )
        records.append(record)
    spool = Spool(path)
    spool.write_segment(rows_to_arrow([tuple(r[n] for n in schema.COLUMN_NAMES) for r in records[:4]]))
    compact(path)
    spool.write_segment(rows_to_arrow([tuple(r[n] for n in schema.COLUMN_NAMES) for r in records[4:]]))
    return records


def _report(path, *args: str, tz: str = "UTC") -> str:
    import os
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "joule_otel._cli", "report", "--db", str(path), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TZ": tz},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_report_by_tag_sums_to_the_ledgers_total_for_the_period_in_any_time_zone(tmp_path):
    import csv
    import io
    import json

    db = tmp_path / "tagged.duckdb"
    records = _ledger_with_tags(db)
    november = [r for r in records if r["receipt_id"] not in ("rcpt_0", "rcpt_6")]
    document = json.loads(_report(db, "--by", "team", "--period", "2026-11", "--format", "json", tz="Pacific/Auckland"))
    groups = {g["team"]: g for g in document["groups"]}
    assert set(groups) == {"search", "data", "(untagged)"}
    assert groups["search"]["energy_j"] == 55.0 and groups["search"]["calls"] == 3
    assert groups["data"]["energy_j"] == 40.0 and groups["(untagged)"]["energy_j"] == 5.0
    assert document["total"]["energy_j"] == sum(r["energy_j"] for r in november) == 100.0
    assert document["total"]["calls"] == len(november)
    assert document["total"]["input_tokens"] == sum(r["input_tokens"] for r in november)
    assert groups["search"]["share"] == pytest.approx(0.55)

    by_two = list(
        csv.DictReader(io.StringIO(_report(db, "--by", "team,customer", "--period", "2026-11", "--format", "csv")))
    )
    cells = {(r["team"], r["customer"]): r for r in by_two}
    assert float(cells[("search", "acme")]["energy_j"]) == 35.0 and cells[("search", "acme")]["calls"] == "2"
    assert ("data", "(untagged)") in cells and cells[("TOTAL", "")]["energy_j"] == "100.000000"
    assert float(cells[("TOTAL", "")]["energy_kwh"]) == pytest.approx(100 / 3.6e6, rel=1e-4)
    assert {r["period_start"] for r in by_two} == {"2026-11-01"} and {r["period_end"] for r in by_two} == {"2026-12-01"}

    table = _report(db, "--by", "workload,week", "--period", "2026-11-01..2026-11-08")
    assert "2026-W44" in table and "2026-W45" in table and "30.0 J" in table
    markdown = _report(db, "--by", "customer", "--period", "2026-11-30", "--format", "markdown")
    assert "| acme |" in markdown and "**25.0 J**" in markdown


def test_report_options_that_cannot_be_read_are_clear_errors(tmp_path):
    import subprocess
    import sys

    db = tmp_path / "tagged.duckdb"
    _ledger_with_tags(db)
    for args, said in (
        (["--by", "Team Name", "--period", "2026-11"], "not a tag key"),
        (["--by", "team,team", "--period", "2026-11"], "twice"),
        (["--by", "team", "--period", "November"], "use a month"),
        (["--by", "team", "--period", "2026-11-09..2026-11-02"], "after the start"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "joule_otel._cli", "report", "--db", str(db), *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 2 and said in done.stderr, (args, done.stderr)


def test_tags_are_on_spans_and_on_metrics_only_when_named_each_key_bounded(ledger_path, joule_simulator):
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    reader, exporter = InMemoryMetricReader(), InMemorySpanExporter()
    meter_provider, tracer_provider = MeterProvider(metric_readers=[reader]), TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    joule_otel.instrument(
        db=ledger_path,
        flush_interval=0.1,
        metric_tags=["team"],
        max_workloads=2,
        tags={"env": "prod"},
        meter_provider=meter_provider,
        tracer_provider=tracer_provider,
    )
    try:
        client = openai.OpenAI(base_url=joule_simulator.base_url, api_key="k", max_retries=0)
        for team in ("search", "data", "support", "support"):
            with joule_otel.tags(team=team, customer="acme"):
                client.chat.completions.create(model="auto", messages=HI)
        assert joule_otel.flush(timeout_s=10)
        energy = [
            point
            for rm in reader.get_metrics_data().resource_metrics
            for sm in rm.scope_metrics
            for metric in sm.metrics
            if metric.name == "joule.client.energy"
            for point in metric.data.data_points
        ]
    finally:
        joule_otel.uninstrument()
        meter_provider.shutdown()
        tracer_provider.shutdown()
    by_team: dict[str | None, float] = {}
    for point in energy:  # one point per attribute set: the router may have chosen different models
        team = point.attributes.get("joule.tag.team")
        by_team[team] = by_team.get(team, 0.0) + point.value
    assert set(by_team) == {"search", "data", "other"}, "two values a key, then other (as workloads)"
    assert not any("joule.tag.customer" in p.attributes or "joule.tag.env" in p.attributes for p in energy)
    billed = [r.energy_j for r in joule_simulator.receipts]
    assert by_team["other"] == pytest.approx(billed[2] + billed[3]), (by_team, billed)
    spans = [s for s in exporter.get_finished_spans() if "joule.receipt_id" in (s.attributes or {})]
    assert len(spans) == 4
    assert all(s.attributes["joule.tag.customer"] == "acme" and s.attributes["joule.tag.env"] == "prod" for s in spans)


def test_the_tag_filters_come_from_counts_kept_at_compaction_plus_the_spooled_rows(tmp_path):
    from joule_otel.dashboard import _queries as queries
    from joule_otel.ledger import _reader as reader

    db = tmp_path / "tagged.duckdb"
    records = _ledger_with_tags(db)  # four rows compacted, three still spooled
    con = duckdb.connect(str(db), read_only=True)
    kept = dict(((k, v), n) for k, v, n in con.execute("SELECT key, value, calls FROM joule_tag_values").fetchall())
    con.close()
    assert kept == {("team", "search"): 3, ("customer", "acme"): 1, ("customer", "globex"): 1, ("team", "data"): 1}
    with reader.connect(db) as con:
        options = queries.tag_options(con)
    every: dict[str, dict[str, int]] = {}
    for record in records:
        for key, value in (record["tags"] or {}).items():
            every.setdefault(key, {})[value] = every.setdefault(key, {}).get(value, 0) + 1
    assert options == {k: sorted(v, key=lambda value: (-v[value], value)) for k, v in sorted(every.items())}
