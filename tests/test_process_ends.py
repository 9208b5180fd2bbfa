"""Every way a process ends (fork, multiprocessing, a full disk, SIGTERM) loses no row and doubles none.

Every test here drives real parts: the simulator or a scripted HTTP server on loopback, a real DuckDB file, real
child processes.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import duckdb
import pytest
from support import ROW, fill, ledger_rows, run_script

import joule_otel
from joule_otel import _instrument
from joule_otel.ledger._spool import Spool
from joule_otel.ledger._writer import LedgerWriter

# -- forks and multiprocessing -----------------------------------------------------------------------------------


def test_a_fork_while_the_ledger_lock_is_held_does_not_keep_it_locked(ledger_path):
    joule_otel.instrument(db=ledger_path, flush_interval=0.1)
    spool = Spool(ledger_path)
    holding, release = threading.Event(), threading.Event()

    def compactor():  # what the background thread does while it compacts
        with spool.locked(exclusive=True, timeout_s=5):
            holding.set()
            release.wait(10)

    thread = threading.Thread(target=compactor)
    thread.start()
    try:
        assert holding.wait(5)
        pid = os.fork()
        if pid == 0:  # the child lives on for a while, as a gunicorn worker would
            time.sleep(4)
            os._exit(0)
        release.set()
        thread.join(5)
        started = time.monotonic()
        with spool.locked(exclusive=True, timeout_s=2):  # a reader or compactor gets in while the child lives
            got_it_after = time.monotonic() - started
        assert os.waitpid(pid, os.WNOHANG) == (0, 0), "the child is still alive"
        assert got_it_after < 2
        os.waitpid(pid, 0)
    finally:
        release.set()
        joule_otel.uninstrument()


FORK_COUNTERS = """
import os, sys, time, json
import openai
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
import joule_otel

reader = InMemoryMetricReader()
joule_otel.instrument(db=sys.argv[2], flush_interval=60, meter_provider=MeterProvider(metric_readers=[reader]))
client = openai.OpenAI(base_url=sys.argv[1], api_key="jc_fork", max_retries=0)
for _ in range(3):
    client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}])
time.sleep(0.5)  # the background thread has summed the counters; with a 60 s interval it has not added them

def energy_total():
    total = 0.0
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data else []:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                if m.name == "joule.client.energy":
                    total += sum(p.value for p in m.data.data_points)
    return total

read, write = os.pipe()
pid = os.fork()
if pid == 0:
    try:
        joule_otel.flush(timeout_s=10)
        os.write(write, json.dumps(energy_total()).encode())
    finally:
        os._exit(0)
os.close(write)
os.waitpid(pid, 0)
child_total = json.loads(os.read(read, 1000))
joule_otel.flush(timeout_s=10)
print(json.dumps({"child": child_total, "parent": energy_total()}))
"""


def test_counter_sums_waiting_at_a_fork_are_added_once_by_the_parent(tmp_path, joule_simulator):
    out = run_script(FORK_COUNTERS, joule_simulator.base_url, str(tmp_path / "fork.duckdb"))
    totals = json.loads(out.stdout.strip().splitlines()[-1])
    issued = sum(r.energy_j for r in joule_simulator.receipts)
    assert totals["parent"] == pytest.approx(issued)
    assert totals["child"] == 0.0


MULTIPROCESSING = """
import multiprocessing, sys
import openai
import joule_otel

joule_otel.instrument(db=sys.argv[2], flush_interval=60)  # a long interval: only the exit paths write the rows

def call(i):
    client = openai.OpenAI(base_url=sys.argv[1], api_key="jc_mp", max_retries=0)
    client.chat.completions.create(model="auto", messages=[{"role": "user", "content": f"q{i}"}])
    return i

if __name__ == "__main__":
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=call, args=(i,)) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert all(p.exitcode == 0 for p in procs)
    with ctx.Pool(2) as pool:  # the context manager terminates the workers (SIGTERM)
        assert sorted(pool.map(call, range(3, 7))) == [3, 4, 5, 6]
    pool = ctx.Pool(2, maxtasksperchild=1)  # workers that return normally
    assert sorted(pool.map(call, range(7, 10))) == [7, 8, 9]
    pool.close()
    pool.join()
"""


def test_multiprocessing_children_that_return_lose_no_row(tmp_path, joule_simulator):
    db = tmp_path / "mp.duckdb"
    script = tmp_path / "mp_app.py"
    script.write_text(textwrap.dedent(MULTIPROCESSING))
    result = subprocess.run(
        [sys.executable, str(script), joule_simulator.base_url, str(db)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    issued = {r.receipt_id for r in joule_simulator.receipts}
    assert len(issued) == 10
    landed = [r["receipt_id"] for r in ledger_rows(db)]
    assert sorted(landed) == sorted(issued)


SIGNAL_MASKS = """
import json, multiprocessing, os, signal, sys, threading
import joule_otel
from joule_otel.simulator import running

def masks():
    found = {}
    for thread in threading.enumerate():
        with open(f"/proc/self/task/{thread.native_id}/status") as status:
            blocked = int(next(line for line in status if line.startswith("SigBlk:")).split()[1], 16)
        found[thread.name] = [s.name for s in (signal.SIGTERM, signal.SIGINT) if blocked >> (s - 1) & 1]
    return found

def child(queue):
    joule_otel.flush()  # the ledger thread started again in this child
    queue.put(masks())

if __name__ == "__main__":
    with running(seed=1) as sim:
        joule_otel.instrument(db=sys.argv[1])
        joule_otel.flush()
        parent = masks()
        queue = multiprocessing.get_context("fork").SimpleQueue()
        process = multiprocessing.get_context("fork").Process(target=child, args=(queue,))
        process.start()
        print(json.dumps({"parent": parent, "child": queue.get(), "main": threading.main_thread().name}))
        process.join()
"""


def test_the_apps_signals_never_land_on_a_thread_of_joule_otels(tmp_path):
    """A SIGTERM the kernel hands to a thread of ours would reach the app's handler only once its main thread runs
    Python again: a ``Pool`` worker blocked on its queue's lock never would, and its parent's ``join()`` hung."""
    env = {
        **os.environ,
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",  # SDK export threads exist (nothing listens there)
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_METRICS_EXPORTER": "otlp",
        "JOULE_OTEL_CALL_EVENTS": "true",
    }
    script = tmp_path / "masks.py"
    script.write_text(textwrap.dedent(SIGNAL_MASKS))
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "m.duckdb")], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    main = found["main"]
    for where in ("parent", "child"):
        threads = found[where]
        assert threads.pop(main) == [], f"the app's own main thread keeps its signals ({where})"
        assert "joule-otel-ledger" in threads, threads
        assert {name: mask for name, mask in threads.items() if mask != ["SIGTERM", "SIGINT"]} == {}, where
    assert "joule-simulator" in found["parent"]
    assert len(found["parent"]) >= 4, f"the SDK's span, log and metric export threads: {found['parent']}"


# -- a full disk ------------------------------------------------------------------------------------------------


def test_disk_full_at_the_first_compaction_recovers_by_itself_and_says_disk_full(small_disk, caplog):
    db = small_disk / "ledger" / "joule.duckdb"
    writer = LedgerWriter(db)
    row = ROW._replace(receipt_id="rcpt_0")
    writer.append([row._replace(receipt_id=f"rcpt_{i}") for i in range(50)])
    db.parent.mkdir()
    filler = fill(small_disk, 16 << 10)  # room for a segment, not for a DuckDB file
    assert writer.write_segment() is True
    with caplog.at_level(logging.ERROR, logger="joule_otel"):
        writer.compact(force=True, timeout_s=5)
        writer.compact(force=True, timeout_s=5)
    messages = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len([m for m in messages if "disk full" in m]) == 1, messages
    assert not any("no transaction is active" in m for m in messages)
    assert not db.exists() or db.stat().st_size > 0, "no empty ledger file may stay behind"
    # the CLI says the same in one line
    cli = subprocess.run(
        [sys.executable, "-m", "joule_otel._cli", "ledger", "--db", str(db), "compact"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 2
    assert "disk full" in cli.stderr and "Traceback" not in cli.stderr
    assert len(cli.stderr.strip().splitlines()) == 1
    filler.unlink()  # space returns
    writer.compact(force=True, timeout_s=5)
    assert writer.stats.rows_compacted == 50
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM inference_calls").fetchone()[0] == 50


def test_an_empty_ledger_file_left_behind_is_replaced(ledger_path):
    ledger_path.parent.mkdir(parents=True)
    ledger_path.write_bytes(b"")  # what a first compaction killed mid-way (or a full disk) leaves
    writer = LedgerWriter(ledger_path)
    writer.append([ROW._replace(receipt_id="rcpt_e")])
    assert writer.write_segment()
    writer.compact(force=True, timeout_s=5)
    assert writer.stats.rows_compacted == 1 and writer.stats.compact_errors == 0


# -- SIGTERM -----------------------------------------------------------------------------------------------------


SIGTERM_KEEPS_RUNNING = """
import os, signal, sys
import openai
import joule_otel

stopping = []
signal.signal(signal.SIGTERM, lambda *a: stopping.append(True))  # the app's graceful handler: it keeps running
joule_otel.instrument(db=sys.argv[2], flush_interval=60)
client = openai.OpenAI(base_url=sys.argv[1], api_key="jc_term", max_retries=0)
client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "before"}])
os.kill(os.getpid(), signal.SIGTERM)
assert stopping == [True]
n = len(joule_otel.read_ledger(sys.argv[2]))  # SIGTERM wrote the rows so far
for _ in range(2):  # the app drains its last requests: still captured
    client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "after"}])
assert joule_otel.flush(timeout_s=10)
print(n, len(joule_otel.read_ledger(sys.argv[2])))
"""


def test_sigterm_handed_to_a_handler_that_keeps_running_keeps_capturing(tmp_path, joule_simulator):
    out = run_script(SIGTERM_KEEPS_RUNNING, joule_simulator.base_url, str(tmp_path / "term.duckdb"))
    assert out.stdout.split() == ["1", "3"]


SIGTERM_EXPORTS = """
import os, signal, sys, time
import openai
import joule_otel

joule_otel.instrument(db=sys.argv[2], otlp_endpoint=sys.argv[3], flush_interval=60)
client = openai.OpenAI(base_url=sys.argv[1], api_key="jc_term", max_retries=0)
client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}])
print("ready", flush=True)
time.sleep(60)
"""


def test_sigterm_exports_the_last_metrics_and_spans_of_providers_joule_otel_set_up(tmp_path, joule_simulator):
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    received: dict[str, list] = {"metrics": [], "traces": []}

    class Receiver(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            kind = self.path.rsplit("/", 1)[-1]
            message = ExportMetricsServiceRequest() if kind == "metrics" else ExportTraceServiceRequest()
            message.ParseFromString(body)
            received.setdefault(kind, []).append(message)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {**os.environ, "OTEL_METRIC_EXPORT_INTERVAL": "600000", "OTEL_BSP_SCHEDULE_DELAY": "600000"}
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                textwrap.dedent(SIGTERM_EXPORTS),
                joule_simulator.base_url,
                str(tmp_path / "t.duckdb"),
                f"http://127.0.0.1:{server.server_address[1]}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert proc.stdout.readline().strip() == "ready"
        assert received["metrics"] == [] and received["traces"] == []  # nothing exported before the signal
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == -signal.SIGTERM
    finally:
        server.shutdown()
    names = {
        m.name
        for req in received["metrics"]
        for rm in req.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    }
    assert "joule.client.energy" in names
    spans = [s for req in received["traces"] for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans]
    assert any(a.key == "joule.receipt_id" for s in spans for a in s.attributes)
    assert len(joule_otel.read_ledger(tmp_path / "t.duckdb")) == 1


# -- one writer at a time ----------------------------------------------------------------------------------------


def test_shutdown_never_runs_a_cycle_beside_a_busy_background_thread(ledger_path, monkeypatch):
    joule_otel.instrument(db=ledger_path, flush_interval=0.05)
    writer = _instrument._state.pipeline.writer
    inside, overlaps = [0], []
    original = writer.write_segment

    def slow_write_segment():
        inside[0] += 1
        overlaps.append(inside[0])
        try:
            time.sleep(1.5)
            return original()
        finally:
            inside[0] -= 1

    monkeypatch.setattr(writer, "write_segment", slow_write_segment)
    time.sleep(0.3)  # the background thread is in a slow cycle
    started = time.monotonic()
    done = _instrument._state.pipeline.shutdown(0.3)
    assert time.monotonic() - started < 3
    assert max(overlaps) == 1, "two cycles ran at once"
    assert done is False  # it could not finish in time, and says so
    joule_otel.uninstrument()
