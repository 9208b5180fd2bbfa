"""Retention: `joule-otel ledger prune` and JOULE_OTEL_RETENTION delete old rows, the hourly rollup keeps their totals,
the file shrinks, and every reader (the dashboard, reports, read_ledger) says what is left. Real DuckDB files, real
processes; times are relative to now, never a date that ages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import duckdb
import pytest

import joule_otel
from joule_otel.dashboard import _queries as queries
from joule_otel.ledger import _reader as reader
from joule_otel.ledger import _schema as schema
from joule_otel.ledger._compact import compact
from joule_otel.ledger._retention import boundary, erase, parse_retention, prune
from joule_otel.ledger._spool import Spool
from joule_otel.ledger._writer import rows_to_arrow

NOW = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)


def _rows(days_ago: list[float], workload: str = "support", per_day: int = 200) -> list[tuple]:
    """Calls spread over the given days before now, with tags; energy 1 J + the day's index (known sums)."""
    rows = []
    for index, ago in enumerate(days_ago):
        for n in range(per_day):
            record = dict.fromkeys(schema.COLUMN_NAMES)
            moment = NOW - timedelta(days=ago, minutes=n % 600)
            record.update(
                receipt_id=f"rcpt_{workload}_{index}_{n}",
                started_at=int(moment.timestamp() * 1_000_000),
                service="svc",
                workload=workload,
                provider="joule_cloud",
                routed_to="llama-3.3-70b-instruct",
                region="eu-fi",
                tier="standard",
                energy_j=1.0 + index,
                carbon_mg=0.1,
                input_tokens=10,
                output_tokens=20,
                status_code=200,
                operation="chat",
                stream=False,
                tags={"team": "search" if n % 2 else "data"},
                duration_ms=100.0,
            )
            rows.append(tuple(record[name] for name in schema.COLUMN_NAMES))
    return rows


def _ledger(path, days_ago: list[float], per_day: int = 200) -> None:
    spool = Spool(path)
    rows = _rows(days_ago, per_day=per_day)
    for start in range(0, len(rows), 5000):
        spool.write_segment(rows_to_arrow(rows[start : start + 5000]))
    compact(path, timeout_s=30)


def _totals(path) -> tuple[int, float]:
    with reader.connect(path) as con:
        k = queries.kpis(con, queries.Filters())
    return k["calls"], k["energy_j"]


def test_prune_deletes_old_rows_keeps_their_totals_and_shrinks_the_file(tmp_path):
    db = tmp_path / "ledger.duckdb"
    days = [float(d) for d in range(100, 0, -3)]  # 34 days of calls, from 100 days ago to 1 day ago
    _ledger(db, days, per_day=3000)  # enough rows that their blocks, not the file's fixed overhead, are its size
    calls_before, energy_before = _totals(db)
    cut = boundary(NOW - timedelta(days=50))
    old = sum(1 for d in days for n in range(3000) if NOW - timedelta(days=d, minutes=n % 600) < cut)
    with reader.connect(db) as con:
        by_workload_before = queries.breakdown(con, queries.Filters(), "workload").set_index("group")["energy_j"]
    size_before = db.stat().st_size

    result = prune(db, NOW - timedelta(days=50) + timedelta(minutes=17))  # to the whole hour at or before
    assert result.pruned_before == cut and result.rows_deleted == old > 0
    assert result.rewritten and db.stat().st_size < size_before * 0.8, (size_before, db.stat().st_size)
    assert not db.with_name(db.name + ".rewrite").exists()
    frame = joule_otel.read_ledger(db)
    assert len(frame) == calls_before - old and frame["started_at"].min() >= cut
    # the dashboard's totals, from the rollup for the pruned hours, are what they were
    assert _totals(db) == (calls_before, pytest.approx(energy_before))
    with reader.connect(db) as con:
        assert queries.pruned_before(con) == cut
        after = queries.breakdown(con, queries.Filters(), "workload").set_index("group")["energy_j"]
    assert after.to_dict() == pytest.approx(by_workload_before.to_dict())
    # pruning again to the same day deletes nothing; a boundary is never moved back
    assert prune(db, cut).rows_deleted == 0 and prune(db, cut - timedelta(days=10)).pruned_before == cut


def test_a_late_row_from_before_the_boundary_joins_the_totals_not_the_rows(tmp_path):
    db = tmp_path / "ledger.duckdb"
    _ledger(db, [80.0, 10.0])
    prune(db, NOW - timedelta(days=40))
    calls, energy = _totals(db)
    late = _rows([81.0], workload="late", per_day=5)  # a spool that waited past the prune
    Spool(db).write_segment(rows_to_arrow(late))
    compact(db, timeout_s=30)
    assert _totals(db) == (calls + 5, pytest.approx(energy + 5 * 1.0))
    assert "late" not in set(joule_otel.read_ledger(db)["workload"])
    with duckdb.connect(str(db), read_only=True) as con:
        rows = con.execute("SELECT count(*) FROM inference_calls").fetchone()[0]
        kept = con.execute(
            "SELECT sum(calls) FROM joule_rollup WHERE hour >= (SELECT value::TIMESTAMPTZ FROM joule_meta "
            "WHERE key = 'pruned_before')"
        ).fetchone()[0]
    assert rows == kept, "the rollup's hours after the boundary sum the rows exactly"


def test_reports_by_rollup_columns_cover_pruned_months_and_tags_say_pruned(tmp_path):
    from joule_otel import _report

    db = tmp_path / "ledger.duckdb"
    _ledger(db, [70.0, 60.0, 5.0])
    span = _report.Period(NOW - timedelta(days=90), NOW + timedelta(hours=1), "last 90 days")
    before = _report.build(db, ["workload"], span)
    prune(db, NOW - timedelta(days=30))
    after = _report.build(db, ["workload"], span)
    assert after.total["calls"] == before.total["calls"] == 600
    assert after.total["energy_j"] == pytest.approx(before.total["energy_j"])
    assert after.groups[0]["energy_j"] == pytest.approx(before.groups[0]["energy_j"])
    by_tag = {g["team"]: g for g in _report.build(db, ["team"], span).groups}
    assert by_tag["(pruned)"]["calls"] == 400 and by_tag["search"]["calls"] + by_tag["data"]["calls"] == 200


def test_retention_from_the_environment_is_applied_by_compaction(tmp_path, monkeypatch):
    db = tmp_path / "ledger.duckdb"
    _ledger(db, [60.0, 2.0])
    calls, energy = _totals(db)
    monkeypatch.setenv("JOULE_OTEL_RETENTION", "30d")
    Spool(db).write_segment(rows_to_arrow(_rows([1.0], workload="new", per_day=3)))
    compact(db, timeout_s=30)
    frame = joule_otel.read_ledger(db)
    assert frame["started_at"].min() >= NOW - timedelta(days=31) and len(frame) == 203
    assert _totals(db) == (calls + 3, pytest.approx(energy + 3 * 1.0))
    assert parse_retention("12w") == timedelta(days=84)
    for bad in ("90", "0d", "soon"):
        with pytest.raises(ValueError, match="retention"):
            parse_retention(bad)


def test_the_prune_command_says_what_it_would_delete_and_needs_yes(tmp_path):
    db = tmp_path / "ledger.duckdb"
    _ledger(db, [40.0, 3.0])
    cut = (NOW - timedelta(days=20)).date().isoformat()

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "joule_otel._cli", "ledger", "prune", "--db", str(db), "--before", cut, *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    dry = run()
    assert dry.returncode == 1 and "200 rows" in dry.stdout and "--yes" in dry.stdout
    assert len(joule_otel.read_ledger(db)) == 400
    done = run("--yes", "--json")
    assert done.returncode == 0, done.stderr
    said = json.loads(done.stdout)
    assert said["rows_deleted"] == 200 and said["bytes_after"] <= said["bytes_before"]
    assert len(joule_otel.read_ledger(db)) == 200


WRITER = """
import sys, time
from pathlib import Path
from test_retention import _rows
from joule_otel.ledger._compact import compact
from joule_otel.ledger._spool import Spool
from joule_otel.ledger._writer import rows_to_arrow

spool = Spool(Path(sys.argv[1]))
for i in range(20):
    spool.write_segment(rows_to_arrow(_rows([1.0], workload=f"w{i}", per_day=10)))
    try:
        compact(spool.db_path, timeout_s=0)
    except Exception:
        pass  # busy: the next round compacts
    time.sleep(0.02)
"""


def start_writer(db) -> subprocess.Popen:
    """Another process appending 20 × 10 rows of workloads w0..w19 (a day old), compacting as it goes."""
    env = {**os.environ, "PYTHONPATH": os.path.dirname(__file__) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-c", WRITER, str(db)], env=env)


def test_prune_while_a_writer_appends_and_a_reader_polls_loses_nothing_else(tmp_path):
    db = tmp_path / "ledger.duckdb"
    _ledger(db, [45.0, 2.0])
    writer = start_writer(db)
    seen = []
    for _ in range(3):
        prune(db, NOW - timedelta(days=30), rewrite=True)
        seen.append(len(joule_otel.read_ledger(db)))
    assert writer.wait(timeout=120) == 0
    compact(db, timeout_s=30)
    frame = joule_otel.read_ledger(db)
    assert len(frame) == 200 + 20 * 10 and frame["started_at"].min() >= NOW - timedelta(days=30)
    assert _totals(db)[0] == 400 + 200


def _rollup_matches_rows(db) -> None:
    """The invariant: the rollup's hours after the retention boundary sum exactly the rows left."""
    with duckdb.connect(str(db), read_only=True) as con:
        cut = con.execute("SELECT value::TIMESTAMPTZ FROM joule_meta WHERE key = 'pruned_before'").fetchone()
        since = "WHERE hour >= ?" if cut else ""
        rolled = con.execute(
            f"SELECT coalesce(sum(calls), 0), coalesce(sum(energy_j), 0) FROM joule_rollup {since}", list(cut or [])
        ).fetchone()
        rows = con.execute("SELECT count(*), coalesce(sum(energy_j), 0) FROM inference_calls").fetchone()
    assert rolled[0] == rows[0] and rolled[1] == pytest.approx(rows[1])


def test_erase_a_workload_takes_its_totals_too_and_a_tag_re_sums_the_hours_it_touched(tmp_path):
    db = tmp_path / "ledger.duckdb"
    spool = Spool(db)
    spool.write_segment(rows_to_arrow(_rows([60.0, 5.0], workload="leaving") + _rows([60.0, 5.0], workload="staying")))
    compact(db, timeout_s=30)
    prune(db, NOW - timedelta(days=30))  # 60 days ago is totals only now

    def by_workload() -> dict[str, float]:
        with reader.connect(db) as con:
            frame = queries.breakdown(con, queries.Filters(), "workload")
        return dict(zip(frame["group"], frame["calls"], strict=True))

    assert by_workload() == {"leaving": 400, "staying": 400}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "joule_otel._cli", "ledger", "erase", "--db", str(db), *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    dry = run("--workload", "leaving")
    assert dry.returncode == 1 and "would erase 200 calls of workload leaving" in dry.stdout
    assert by_workload() == {"leaving": 400, "staying": 400}
    done = run("--workload", "leaving", "--yes")
    assert done.returncode == 0 and "erased 200 calls" in done.stdout, done.stderr
    assert by_workload() == {"staying": 400}, "its pruned months' totals went too"
    _rollup_matches_rows(db)

    # a tag is not a rollup key: its rows go, the hours they were in are re-summed, pruned totals stay (and it says so)
    done = run("--tag", "team=search", "--yes")
    assert done.returncode == 0 and "erased 100 calls of team=search" in done.stdout, done.stderr
    assert "keep no tags" in done.stdout
    assert by_workload() == {"staying": 300}
    _rollup_matches_rows(db)
    frame = joule_otel.read_ledger(db)
    assert set(frame["tags"].map(lambda t: t["team"])) == {"data"}
    with reader.connect(db) as con:
        assert queries.tag_options(con) == {"team": ["data"]}
    bad = run("--tag", "Team Name=x", "--yes")
    assert bad.returncode == 2 and "KEY=VALUE" in bad.stderr


def test_a_rewrite_killed_midway_leaves_the_ledger_whole_and_the_next_prune_cleans_up(tmp_path):
    db = tmp_path / "ledger.duckdb"
    _ledger(db, [50.0, 2.0])
    leftover = db.with_name(db.name + ".rewrite")
    leftover.write_bytes(b"half a copy")  # what a prune killed during its rewrite leaves beside the ledger
    assert len(joule_otel.read_ledger(db)) == 400  # the ledger itself was never touched
    result = prune(db, NOW - timedelta(days=30), rewrite=True)
    assert result.rows_deleted == 200 and not leftover.exists()
    assert len(joule_otel.read_ledger(db)) == 200
    _rollup_matches_rows(db)


def test_a_rewrite_that_cannot_be_written_leaves_the_prune_done_and_says_so(tmp_path, caplog):
    import logging

    db = tmp_path / "ledger.duckdb"
    _ledger(db, [50.0, 2.0])
    blocked = db.with_name(db.name + ".rewrite")
    blocked.mkdir()  # the copy cannot be written there (as on a full disk): only the shrinking fails
    (blocked / "keep").write_text("x")
    with caplog.at_level(logging.WARNING, logger="joule_otel"):
        result = prune(db, NOW - timedelta(days=30), rewrite=True)
    assert result.rows_deleted == 200 and not result.rewritten
    assert "could not be rewritten" in caplog.text
    assert len(joule_otel.read_ledger(db)) == 200
    _rollup_matches_rows(db)


KILLED_PRUNE = """
import os, signal, sys, threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from joule_otel.ledger import _compact, _retention

db, point = Path(sys.argv[1]), sys.argv[2]
armed = False


def die():
    os.kill(os.getpid(), signal.SIGKILL)


class Dying:  # the prune's connection, killed at one of its steps
    def __init__(self, con):
        self._con = con

    def execute(self, sql, *args):
        if armed and point == "before-commit" and sql == "COMMIT":
            die()
        result = self._con.execute(sql, *args)
        if armed and (point, sql) in {("after-commit", "COMMIT"), ("after-checkpoint", "CHECKPOINT")}:
            die()
        return result

    def __getattr__(self, name):
        return getattr(self._con, name)


open_writable, prune_rows, replace = _compact.open_writable, _retention.prune_rows, os.replace
_compact.open_writable = lambda path: Dying(open_writable(path))


def arm(*args):
    global armed
    armed = True  # the compaction before the prune is not the step under test
    return prune_rows(*args)


def replacing(source, target):
    if point == "before-rename":
        die()
    replace(source, target)
    if point == "after-rename":
        die()


def watch_copy():  # somewhere in the middle of the copy
    fresh = db.with_name(db.name + ".rewrite")
    while not (fresh.exists() and fresh.stat().st_size):
        pass
    die()


_retention.prune_rows, os.replace = arm, replacing
if point == "mid-copy":
    threading.Thread(target=watch_copy, daemon=True).start()
_retention.prune(db, datetime.now(timezone.utc) - timedelta(days=30), rewrite=True)
"""


@pytest.mark.parametrize(
    "point", ["before-commit", "after-commit", "after-checkpoint", "mid-copy", "before-rename", "after-rename"]
)
def test_a_prune_killed_at_any_step_loses_nothing_and_counts_nothing_twice(tmp_path, point):
    db = tmp_path / "ledger.duckdb"
    _ledger(db, [50.0, 2.0])
    killed = subprocess.run([sys.executable, "-c", KILLED_PRUNE, str(db), point], capture_output=True, timeout=120)
    assert killed.returncode == -9, killed.stderr[-2000:]
    rows = len(joule_otel.read_ledger(db))
    assert rows == (400 if point == "before-commit" else 200)
    assert _totals(db) == (400, pytest.approx(200 * 1.0 + 200 * 2.0)), "every call counted once, rows or totals"
    _rollup_matches_rows(db)
    again = prune(db, NOW - timedelta(days=30), rewrite=True)  # the next prune finishes the work
    assert again.rows_deleted == (200 if point == "before-commit" else 0)
    assert len(joule_otel.read_ledger(db)) == 200 and _totals(db)[0] == 400
    _rollup_matches_rows(db)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ledger.duckdb.rewrite")) == []


def test_erase_while_a_writer_appends_takes_only_what_was_asked(tmp_path):
    db = tmp_path / "ledger.duckdb"
    spool = Spool(db)
    spool.write_segment(rows_to_arrow(_rows([3.0, 2.0], workload="leaving") + _rows([3.0], workload="staying")))
    compact(db, timeout_s=30)
    writer = start_writer(db)
    erased = [erase(db, workload="leaving", apply=True).rows for _ in range(3)]
    assert writer.wait(timeout=120) == 0
    compact(db, timeout_s=30)
    assert erased[0] == 400 and erased[1:] == [0, 0], "erased once, never twice"
    frame = joule_otel.read_ledger(db)
    assert "leaving" not in set(frame["workload"])
    assert len(frame) == 200 + 20 * 10, "the writer's rows and the workload kept are all there"
    assert _totals(db)[0] == 200 + 20 * 10
    _rollup_matches_rows(db)


@pytest.mark.parametrize("small_disk", ["24m"], indirect=True)
@pytest.mark.parametrize(
    ("left", "outcome"), [(4 << 10, "refused"), (64 << 10, "not checkpointed"), (1 << 20, "not rewritten")]
)
def test_a_full_disk_at_each_step_of_a_prune_loses_nothing_and_says_why(small_disk, left, outcome, caplog):
    """Room for nothing (the commit is refused), for the commit but not the checkpoint, for both but not the copy."""
    import logging

    from support import fill

    from joule_otel.ledger._compact import is_disk_full

    db = small_disk / "ledger.duckdb"
    _ledger(db, [50.0, 2.0], per_day=2000)
    filler = fill(small_disk, left)
    with caplog.at_level(logging.WARNING, logger="joule_otel"):
        if outcome == "refused":
            with pytest.raises(Exception) as refused:  # DuckDB's own error, whose class varies
                prune(db, NOW - timedelta(days=30), rewrite=True)
            assert is_disk_full(refused.value), refused.value
        else:
            result = prune(db, NOW - timedelta(days=30), rewrite=True)
            assert result.rows_deleted == 2000 and not result.rewritten
            said = "could not be checkpointed" if outcome == "not checkpointed" else "could not be rewritten"
            assert said in caplog.text
    filler.unlink()
    assert len(joule_otel.read_ledger(db)) == (4000 if outcome == "refused" else 2000)
    assert _totals(db) == (4000, pytest.approx(2000 * 1.0 + 2000 * 2.0)), "nothing lost, nothing counted twice"
    _rollup_matches_rows(db)
    assert [p.name for p in small_disk.iterdir() if ".rewrite" in p.name] == [], "a refused copy leaves nothing"
    again = prune(db, NOW - timedelta(days=30), rewrite=True)  # with room again, the next prune finishes the work
    assert again.rewritten and len(joule_otel.read_ledger(db)) == 2000 and _totals(db)[0] == 4000
    _rollup_matches_rows(db)
