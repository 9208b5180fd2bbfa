"""The ledger under concurrency and faults: many processes, a polling reader, crashes, bad files."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

import joule_otel
from joule_otel.ledger import _maintenance as maintenance
from joule_otel.ledger import _reader as reader
from joule_otel.ledger import _schema as schema
from joule_otel.ledger._compact import compact
from joule_otel.ledger._spool import Spool
from joule_otel.ledger._writer import LedgerWriter, rows_to_arrow

WORKER = textwrap.dedent("""
    import sys, time
    import openai
    import joule_otel

    base_url, calls, pause = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    joule_otel.instrument(flush_interval=0.2)
    client = openai.OpenAI(base_url=base_url, api_key="jc_worker", max_retries=0)
    print("ready", flush=True)
    for i in range(calls):
        started = time.perf_counter()
        client.chat.completions.create(model="auto", messages=[{"role": "user", "content": str(i)}], max_tokens=5)
        if time.perf_counter() - started > 5:
            print("slow call", flush=True)
        if pause:
            time.sleep(pause)
    print("done", flush=True)
    if len(sys.argv) > 4:
        time.sleep(60)
""")


def make_row(receipt: str | None, energy: float = 1.0, started_us: int | None = None) -> tuple:
    values = dict.fromkeys(schema.COLUMN_NAMES)
    values.update(
        receipt_id=receipt,
        started_at=started_us or time.time_ns() // 1000,
        energy_j=energy,
        workload="w",
        operation="chat",
        status_code=200,
        stream=False,
    )
    return tuple(values[name] for name in schema.COLUMN_NAMES)


def count(db: Path) -> tuple[int, int]:
    with reader.connect(db) as con:
        return con.execute("SELECT count(*), count(DISTINCT receipt_id) FROM inference_calls").fetchone()


@pytest.fixture
def worker_script(tmp_path: Path) -> Path:
    path = tmp_path / "worker.py"
    path.write_text(WORKER)
    return path


def spawn(script: Path, base_url: str, db: Path, calls: int, pause: float = 0.0, linger: bool = False):
    env = dict(os.environ, JOULE_OTEL_DB=str(db))
    args = [sys.executable, str(script), base_url, str(calls), str(pause)] + (["linger"] if linger else [])
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_four_writer_processes_and_a_polling_reader(worker_script, ledger_path, joule_simulator):
    stop = threading.Event()
    seen: list[int] = []
    reader_errors: list[BaseException] = []

    def poll() -> None:
        while not stop.is_set():
            try:
                seen.append(count(ledger_path)[0])
            except Exception as exc:  # any failure of the reader is a test failure
                reader_errors.append(exc)
            time.sleep(0.1)

    poller = threading.Thread(target=poll)
    poller.start()
    procs = [spawn(worker_script, joule_simulator.base_url, ledger_path, 500) for _ in range(4)]
    outputs = [p.communicate(timeout=300) for p in procs]
    stop.set()
    poller.join()
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
        assert "slow call" not in out
    assert not reader_errors
    rows, receipts = count(ledger_path)
    issued = {r.receipt_id for r in joule_simulator.receipts}
    assert len(issued) == 2000
    assert rows == receipts == 2000
    with duckdb.connect(str(ledger_path), read_only=True) as con:
        stored = {r[0] for r in con.execute("SELECT receipt_id FROM inference_calls").fetchall()}
    assert stored == issued  # all compacted into the DuckDB file itself at exit
    assert seen == sorted(seen), "the reader never saw rows disappear"
    assert any(0 < n < 2000 for n in seen), "the reader saw rows while the writers were running"


@pytest.mark.slow
def test_fresh_data_is_visible_while_writers_run(worker_script, ledger_path, joule_simulator):
    proc = spawn(worker_script, joule_simulator.base_url, ledger_path, 1000, pause=0.01, linger=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not joule_simulator.receipts:
            time.sleep(0.01)
        first = joule_simulator.receipts[0].receipt_id
        started = time.monotonic()
        while time.monotonic() - started < 5:
            with reader.connect(ledger_path) as con:
                if con.execute("SELECT count(*) FROM inference_calls WHERE receipt_id = ?", [first]).fetchone()[0]:
                    break
            time.sleep(0.1)
        visible_after = time.monotonic() - started
        assert visible_after < 3, f"a call took {visible_after:.1f}s to reach readers"
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_kill_9_loses_at_most_the_last_flush_interval_and_sigterm_loses_nothing(
    worker_script, ledger_path, joule_simulator, tmp_path
):
    killed = spawn(worker_script, joule_simulator.base_url, ledger_path, 300, linger=True)
    assert killed.stdout.readline().strip() == "ready"
    assert killed.stdout.readline().strip() == "done"
    time.sleep(0.6)  # > flush interval (0.2 s): everything reached a segment
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert count(ledger_path) == (300, 300)

    term_db = tmp_path / "term" / "l.duckdb"
    termed = spawn(worker_script, joule_simulator.base_url, term_db, 200, linger=True)
    assert termed.stdout.readline().strip() == "ready"
    assert termed.stdout.readline().strip() == "done"
    termed.send_signal(signal.SIGTERM)  # immediately: rows still in memory must be flushed by the handler
    termed.wait(timeout=30)
    assert termed.returncode == -signal.SIGTERM
    with duckdb.connect(str(term_db), read_only=True) as con:
        assert con.execute("SELECT count(DISTINCT receipt_id) FROM inference_calls").fetchone()[0] == 200


def test_torn_and_corrupt_segments_are_skipped_not_fatal(ledger_path):
    spool = Spool(ledger_path)
    spool.write_segment(rows_to_arrow([make_row("r1"), make_row("r2")]))
    spool.ensure()
    (spool.dir / "00000000000000000001-1-000001-abcdef.parquet").write_bytes(b"PAR1 torn garbage")
    torn_tmp = spool.dir / ".00000000000000000002-1-000002-abcdef.parquet.tmp"
    torn_tmp.write_bytes(b"half")
    age(torn_tmp, 3600)
    result = compact(ledger_path)
    assert result.rows_inserted == 2
    assert len(result.quarantined) == 1
    assert not torn_tmp.exists()
    assert count(ledger_path) == (2, 2)
    assert maintenance.ledger_stats(ledger_path)["quarantined_segments"] == 1


def age(path: Path, seconds: float) -> None:
    """Make a file ``seconds`` older by the filesystem's clock (the process's may be moved: tests/clock)."""
    written = path.stat().st_mtime
    os.utime(path, (written - seconds, written - seconds))


def test_a_segment_being_written_is_never_taken_for_a_torn_one_whatever_the_process_clock_says(ledger_path):
    """A process whose clock runs ahead (faketime, a container, skew on a shared volume) sweeps only torn files."""
    import time_machine

    spool = Spool(ledger_path)
    spool.ensure()
    in_progress = spool.dir / ".00000000000000000003-1-000003-abcdef.parquet.tmp"
    in_progress.write_bytes(b"being written")
    torn = spool.dir / ".00000000000000000004-1-000004-abcdef.parquet.tmp"
    torn.write_bytes(b"half")
    age(torn, 3600)
    with time_machine.travel(time.time() + 32 * 86400, tick=True):
        assert spool.sweep_torn() == 1
    assert in_progress.exists()
    assert not torn.exists()
    with time_machine.travel(time.time() - 32 * 86400, tick=True):  # and a clock that runs behind
        age(in_progress, 3600)
        assert spool.sweep_torn() == 1
    assert not in_progress.exists()


def test_compaction_is_idempotent_and_replay_never_duplicates(ledger_path):
    spool = Spool(ledger_path)
    segment = spool.write_segment(rows_to_arrow([make_row("a"), make_row("b"), make_row(None), make_row("a")]))
    replay = segment.read_bytes()
    compact(ledger_path)
    compact(ledger_path)
    assert count(ledger_path) == (3, 2)  # the NULL-receipt row is a row; "a" twice is one row
    (spool.dir / segment.name).write_bytes(replay)  # a compactor killed after commit, before unlink
    compact(ledger_path)
    assert count(ledger_path) == (3, 2)
    spool.write_segment(rows_to_arrow([make_row("b"), make_row("c")]))  # the same receipt in a new segment
    compact(ledger_path)
    assert count(ledger_path) == (4, 3)


def test_writers_sharing_a_ledger_compact_once_an_interval_between_them(ledger_path):
    """A writer compacts when the oldest segment (of any process) is an interval old, not on its own clock."""
    interval = 1.0
    first = LedgerWriter(ledger_path, compact_interval_s=interval)
    second = LedgerWriter(ledger_path, compact_interval_s=interval)
    time.sleep(interval)  # both writers' own clocks say a compaction is due from here on
    first.append([make_row("a")])
    assert first.write_segment()
    first.compact()
    second.compact()
    assert (first.stats.rows_compacted, second.stats.rows_compacted) == (0, 0)  # the segment is a moment old
    assert len(Spool(ledger_path).segments()) == 1
    time.sleep(interval)
    second.compact()  # the segment is an interval old now, whoever wrote it
    assert second.stats.rows_compacted == 1
    assert Spool(ledger_path).segments() == []
    second.append([make_row("b")])
    assert second.write_segment()
    first.compact()  # the spool was just compacted: a fresh segment waits for the next interval
    assert first.stats.rows_compacted == 0
    assert len(Spool(ledger_path).segments()) == 1
    assert count(ledger_path) == (2, 2)  # readers see the waiting segment all the same
    time.sleep(interval)
    first.compact()
    assert first.stats.rows_compacted == 1
    assert count(ledger_path) == (2, 2)


def test_file_held_by_another_process_for_10s_costs_no_row_and_no_latency(worker_script, ledger_path, joule_simulator):
    compact(ledger_path)  # create the file
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import duckdb, sys, time
        con = duckdb.connect({str(ledger_path)!r})
        print("holding", flush=True)
        time.sleep(10)
    """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "holding"
    with pytest.raises(duckdb.IOException):
        duckdb.connect(str(ledger_path), read_only=True)  # DuckDB: nobody else can open it at all
    proc = spawn(worker_script, joule_simulator.base_url, ledger_path, 200)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "slow call" not in out
    assert holder.poll() is None, "the writer finished while the file was still held"
    pending = maintenance.ledger_stats(ledger_path)  # readers fall back to the spool while the file is held
    assert pending["rows"] == 200
    holder.wait(timeout=30)
    compact(ledger_path, timeout_s=10)
    with duckdb.connect(str(ledger_path), read_only=True) as con:
        assert con.execute("SELECT count(DISTINCT receipt_id) FROM inference_calls").fetchone()[0] == 200


def test_corrupt_or_foreign_file_gives_one_clear_error_and_rows_wait(ledger_path, joule_simulator, caplog):
    import openai

    ledger_path.parent.mkdir(parents=True)
    ledger_path.write_bytes(b"this is not a duckdb file" * 100)
    joule_otel.instrument(db=ledger_path, flush_interval=0.1)
    try:
        client = openai.OpenAI(base_url=joule_simulator.base_url, api_key="k", max_retries=0)
        for _ in range(5):
            client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "x"}])
        joule_otel.flush()
        joule_otel.flush()
        stats = joule_otel.stats()
    finally:
        joule_otel.uninstrument()
    errors = [r for r in caplog.records if r.levelname == "ERROR" and "joule_otel" in r.getMessage()]
    assert len(errors) == 1
    assert str(ledger_path) in errors[0].getMessage()
    assert stats["rows_spooled"] == 5 and stats["pending_segments"] >= 1
    ledger_path.unlink()  # the user moves the bad file away: the waiting rows land
    compact(ledger_path)
    assert count(ledger_path) == (5, 5)


def test_unwritable_directory_keeps_the_app_working_and_counts_drops(tmp_path, joule_simulator, caplog):
    import openai

    if os.geteuid() == 0:
        # root ignores directory permissions; a path under a regular file can never be created
        blocker = tmp_path / "not-a-dir"
        blocker.write_text("")
        db = blocker / "sub" / "l.duckdb"
    else:
        locked = tmp_path / "ro"
        locked.mkdir(mode=0o500)
        db = locked / "l.duckdb"
    joule_otel.instrument(db=db, flush_interval=0.1)
    from joule_otel import _instrument

    _instrument._state.pipeline.writer.max_pending_rows = 3
    try:
        client = openai.OpenAI(base_url=joule_simulator.base_url, api_key="k", max_retries=0)
        for _ in range(5):
            assert client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "x"}])
        assert joule_otel.flush() is False  # the rows did not reach disk, and flush says so
        stats = joule_otel.stats()
    finally:
        joule_otel.uninstrument()
    assert stats["rows_dropped"] == 2
    assert stats["spool_errors"] >= 1
    messages = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("cannot write ledger segments" in m for m in messages)
    assert any("2 rows dropped" in m for m in messages)
    assert any("3 ledger rows could not be written" in m and "lost" in m for m in messages)  # said, not silent


def test_full_disk_is_simulated_and_survived(ledger_path, monkeypatch):
    writer = LedgerWriter(ledger_path, max_pending_rows=1000)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Spool, "write_segment", full_disk)
    writer.append([make_row(f"r{i}") for i in range(10)])
    assert writer.write_segment() is False
    assert writer.stats.pending_rows == 10
    monkeypatch.undo()
    assert writer.write_segment() is True
    writer.compact(force=True)
    assert count(ledger_path) == (10, 10)


def test_old_files_migrate_and_record_the_schema_version(ledger_path):
    ledger_path.parent.mkdir(parents=True)
    with duckdb.connect(str(ledger_path)) as con:  # a file from before ttft_ms and span_id existed
        con.execute("CREATE TABLE inference_calls (receipt_id VARCHAR, started_at TIMESTAMPTZ, energy_j DOUBLE)")
        con.execute("INSERT INTO inference_calls VALUES ('old', now(), 12.5)")
    Spool(ledger_path).write_segment(rows_to_arrow([make_row("new", 2.0)]))
    compact(ledger_path)
    with duckdb.connect(str(ledger_path), read_only=True) as con:
        columns = [r[0] for r in con.execute("DESCRIBE inference_calls").fetchall()]
        assert set(columns) == set(schema.COLUMN_NAMES)
        assert con.execute("SELECT value FROM joule_meta WHERE key = 'schema_version'").fetchone()[0] == str(
            schema.SCHEMA_VERSION
        )
        assert dict(con.execute("SELECT receipt_id, energy_j FROM inference_calls").fetchall()) == {
            "old": 12.5,
            "new": 2.0,
        }


def test_version_1_files_lose_the_unique_index_and_still_dedupe(ledger_path):
    ledger_path.parent.mkdir(parents=True)
    with duckdb.connect(str(ledger_path)) as con:  # what version 1 wrote
        for statement in schema.create_statements():
            con.execute(statement)
        con.execute("CREATE UNIQUE INDEX inference_calls_receipt ON inference_calls (receipt_id)")
        con.execute("INSERT INTO joule_meta VALUES ('schema_version', '1')")
    spool = Spool(ledger_path)
    spool.write_segment(rows_to_arrow([make_row("a"), make_row("b")]))
    compact(ledger_path)
    spool.write_segment(rows_to_arrow([make_row("b"), make_row("c")]))
    compact(ledger_path)
    with duckdb.connect(str(ledger_path), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM duckdb_indexes() WHERE table_name = 'inference_calls'").fetchone() == (
            0,
        )
        assert con.execute("SELECT value FROM joule_meta WHERE key = 'schema_version'").fetchone() == (
            str(schema.SCHEMA_VERSION),
        )
    assert count(ledger_path) == (3, 3)


def test_bounded_memory_under_a_burst_while_the_file_is_locked(ledger_path):
    """1M rows while another process holds the lock: they go to disk in segments, not to RAM."""
    import psutil

    writer = LedgerWriter(ledger_path, max_pending_rows=200_000)
    spool = Spool(ledger_path)
    fd = os.open(spool.lock_path if spool.lock_path.parent.exists() else _mk(spool), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a compactor elsewhere holds the ledger
    try:
        process = psutil.Process()
        batch = [make_row(None) for _ in range(50_000)]
        rss = []
        for _ in range(20):
            writer.append(batch)
            assert writer.write_segment()
            writer.compact(force=True)
            rss.append(process.memory_info().rss)
        assert writer.stats.rows_spooled == 1_000_000
        assert writer.stats.rows_dropped == 0
        assert len(spool.segments()) == 20
        assert max(rss[5:]) - rss[5] < 64 << 20, "RSS grew with the burst"
    finally:
        os.close(fd)
    writer.compact(force=True, timeout_s=5)
    assert count(ledger_path)[0] == 1_000_000


def _mk(spool: Spool) -> Path:
    spool.lock_path.parent.mkdir(parents=True, exist_ok=True)
    return spool.lock_path


def test_ledger_cli_stats_compact_export_query(ledger_path, tmp_path):
    Spool(ledger_path).write_segment(rows_to_arrow([make_row("x", 3.0), make_row("y", 4.0), make_row(None, 0.5)]))

    def cli(*args: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "joule_otel._cli", "ledger", "--db", str(ledger_path), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        return out.stdout

    stats = cli("stats")
    assert "pending_segments: 1" in stats and "rows: 3" in stats
    assert "compacted 1 segments, 3 new rows" in cli("compact")
    assert "pending_segments: 0" in cli("stats")
    assert "wrote 2 rows" in cli("export", str(tmp_path / "out.parquet"), "--where", "receipt_id IS NOT NULL")
    assert pa.parquet.read_table(tmp_path / "out.parquet").num_rows == 2
    assert "wrote 3 rows" in cli("export", str(tmp_path / "out.csv"))
    assert (tmp_path / "out.csv").read_text().startswith("receipt_id,")
    assert "7.5" in cli("query", "SELECT sum(energy_j) FROM inference_calls")
    with duckdb.connect(str(ledger_path)) as con:  # rows edited by hand: the rollup no longer matches
        con.execute("DELETE FROM inference_calls WHERE receipt_id = 'x'")
    assert "rollup rebuilt (2 rows)" in cli("compact", "--rebuild-rollup")
    with duckdb.connect(str(ledger_path), read_only=True) as con:
        assert con.execute("SELECT sum(calls), sum(energy_j) FROM joule_rollup").fetchone() == (2, 4.5)


def test_every_command_says_when_there_is_no_ledger_or_no_calls(tmp_path, capsys):
    """A mistaken path is said, never answered with None, an empty table or 0 %; the demo's ledger is named."""
    from joule_otel._cli import main
    from joule_otel.ledger._compact import open_writable

    home = tmp_path / "joule-otel"
    missing = home / "joule.duckdb"
    budgets = tmp_path / "budgets.json"
    budgets.write_text('{"support-bot": 1000}')
    for args in (
        ["ledger", "--db", str(missing), "stats"],
        ["ledger", "--db", str(missing), "query", "select 1"],
        ["ledger", "--db", str(missing), "export", str(tmp_path / "out.parquet")],
        ["ledger", "--db", str(missing), "compact"],
        ["budgets", "status", str(budgets), "--db", str(missing)],
    ):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert f"no ledger at {missing}: nothing has been recorded there yet" in err, args
        assert "demo" not in err
    assert not home.exists() and not (tmp_path / "out.parquet").exists(), "reading never creates anything"

    home.mkdir()
    demo = home / "demo.duckdb"
    open_writable(demo).close()  # type: ignore[attr-defined]
    assert main(["ledger", "--db", str(missing), "stats"]) == 2
    assert f"the demo's ledger is {demo}" in capsys.readouterr().err

    assert main(["ledger", "--db", str(demo), "stats"]) == 0
    out = capsys.readouterr().out
    assert "None" not in out and "rows: 0" in out and f"{demo} holds no calls yet" in out
    assert main(["budgets", "status", str(budgets), "--db", str(demo)]) == 0
    out = capsys.readouterr().out
    assert "support-bot" in out and "has no calls since" in out and "every budget is unused so far this month" in out
