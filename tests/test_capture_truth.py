"""The ledger you can reconcile: no odd response, fork, exit path or shared object loses, doubles or mislabels a call.

Every test here drives real parts: the simulator or a scripted HTTP server on loopback, a real DuckDB file, real
child processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import duckdb
import httpx
import openai
import pytest

import joule_otel
from joule_otel import _instrument
from joule_otel._cli import main as cli_main
from joule_otel.ledger._row import LedgerRow, problem
from joule_otel.ledger._schema import SCHEMA_VERSION
from joule_otel.ledger._spool import Spool
from joule_otel.ledger._writer import LedgerWriter

HI = [{"role": "user", "content": "hi"}]
ROW = LedgerRow(
    receipt_id="rcpt_good",
    started_at_us=1_700_000_000_000_000,
    duration_ms=1.0,
    ttft_ms=None,
    service="svc",
    workload="w",
    operation="chat",
    server_address="h",
    status_code=200,
    error_type=None,
    requested_model="auto",
    routed_to="m",
    tier="standard",
    region="eu-fi",
    energy_j=1.0,
    carbon_mg=1.0,
    input_tokens=1,
    output_tokens=2,
    stream=False,
    trace_id=None,
    span_id=None,
    provider="joule_cloud",
)
"""A ledger row every column of which can be written."""


def ledger_rows(db: Path) -> list[dict]:
    frame = joule_otel.read_ledger(db)
    return [{k: (None if v is None or v != v else v) for k, v in r.items()} for r in frame.to_dict("records")]


class Scripted(BaseHTTPRequestHandler):
    """Answers every POST with what the test scripted: status, headers, body (bytes, or JSON)."""

    status = 200
    headers_to_send: dict[str, str] = {}
    body: bytes | dict = b"{}"
    content_type = "application/json"

    def log_message(self, *args):
        pass

    def _answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        cls = type(self)
        payload = cls.body if isinstance(cls.body, bytes) else json.dumps(cls.body).encode()
        self.send_response(cls.status)
        for name, value in cls.headers_to_send.items():
            self.send_header(name, value)
        self.send_header("Content-Type", cls.content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_POST = _answer
    do_GET = _answer


def completion(usage: dict | None = None, model: str = "m") -> dict:
    return {
        "id": "c1",
        "object": "chat.completion",
        "created": 1,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": usage if usage is not None else {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
    }


@pytest.fixture
def scripted():
    Scripted.status, Scripted.headers_to_send, Scripted.body = 200, {}, completion()
    Scripted.content_type = "application/json"
    server = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def run_script(source: str, *args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(source), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


# -- 1. one odd response never stops the ledger ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("usage", "model", "expected_tokens"),
    [
        ({"prompt_tokens": 2**70, "completion_tokens": 5}, "m", (None, 5)),  # beyond BIGINT
        ({"prompt_tokens": True, "completion_tokens": False}, "m", (None, None)),  # JSON booleans
        ({"prompt_tokens": 1.5, "completion_tokens": "7"}, "m", (None, None)),
        ({"prompt_tokens": -3, "completion_tokens": 9}, "m", (None, 9)),
    ],
)
def test_odd_usage_is_missing_and_the_rows_around_it_land(scripted, ledger_path, usage, model, expected_tokens):
    joule_otel.instrument(db=ledger_path, flush_interval=0.1)
    try:
        client = openai.OpenAI(base_url=scripted, api_key="k", max_retries=0)
        Scripted.headers_to_send = {"X-Energy-Joules": "3", "X-Receipt-Id": "rcpt_before"}
        client.chat.completions.create(model="auto", messages=HI)
        Scripted.headers_to_send = {"X-Energy-Joules": "4", "X-Receipt-Id": "rcpt_odd"}
        Scripted.body = completion(usage)
        client.chat.completions.with_raw_response.create(model=model, messages=HI)
        Scripted.headers_to_send = {"X-Energy-Joules": "5", "X-Receipt-Id": "rcpt_after"}
        Scripted.body = completion()
        client.chat.completions.create(model="auto", messages=HI)
        assert joule_otel.flush(timeout_s=20) is True
        stats = joule_otel.stats()
    finally:
        joule_otel.uninstrument()
    rows = {r["receipt_id"]: r for r in ledger_rows(ledger_path)}
    assert set(rows) == {"rcpt_before", "rcpt_odd", "rcpt_after"}
    assert (rows["rcpt_odd"]["input_tokens"], rows["rcpt_odd"]["output_tokens"]) == expected_tokens
    assert rows["rcpt_after"]["energy_j"] == 5
    assert stats["capture_errors"] == 0 and stats["rows_invalid"] == 0


def test_a_lone_surrogate_in_the_request_model_is_written_cleaned(scripted, ledger_path):
    Scripted.headers_to_send = {"X-Energy-Joules": "2", "X-Receipt-Id": "rcpt_surrogate"}
    joule_otel.instrument(db=ledger_path, flush_interval=0.1)
    try:
        # the JSON escape reaches the parser as a lone surrogate, which UTF-8 storage cannot hold
        httpx.post(f"{scripted}/chat/completions", content=b'{"model": "llama\\ud800-70b", "messages": []}')
        Scripted.headers_to_send = {"X-Energy-Joules": "3", "X-Receipt-Id": "rcpt_next"}
        httpx.post(f"{scripted}/chat/completions", json={"model": "auto", "messages": []})
        assert joule_otel.flush(timeout_s=20) is True
    finally:
        joule_otel.uninstrument()
    rows = {r["receipt_id"]: r for r in ledger_rows(ledger_path)}
    assert set(rows) == {"rcpt_surrogate", "rcpt_next"}
    model = rows["rcpt_surrogate"]["requested_model"]
    assert model.startswith("llama") and model.endswith("-70b")
    # and the file itself holds it, after compaction at exit
    with duckdb.connect(str(ledger_path), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM inference_calls").fetchone()[0] == 2


def test_a_row_no_column_can_hold_is_dropped_counted_and_the_rest_are_written(ledger_path, caplog):
    good = ROW._replace(receipt_id="rcpt_good")
    bad_tokens = good._replace(receipt_id="rcpt_bad", input_tokens=2**70)
    bad_text = good._replace(receipt_id="rcpt_bad_text", workload="w\ud800")
    bad_bool = good._replace(receipt_id="rcpt_bool", output_tokens=True)
    assert problem(good) is None
    assert "BIGINT" in (problem(bad_tokens) or "")
    assert "UTF-8" in (problem(bad_text) or "")
    assert problem(bad_bool) is not None
    writer = LedgerWriter(ledger_path)
    writer.append([good, bad_tokens, good._replace(receipt_id="rcpt_good2"), bad_text, bad_bool])
    with caplog.at_level(logging.ERROR, logger="joule_otel"):
        assert writer.write_segment() is True
        writer.append([good._replace(receipt_id="rcpt_good3"), bad_tokens._replace(receipt_id="rcpt_bad2")])
        assert writer.write_segment() is True
    assert writer.stats.rows_invalid == 4
    assert writer.stats.pending_rows == 0
    assert sorted(r["receipt_id"] for r in ledger_rows(ledger_path)) == ["rcpt_good", "rcpt_good2", "rcpt_good3"]
    dropped = [r for r in caplog.records if "could not be written and was dropped" in r.getMessage()]
    assert len(dropped) == 3  # once per kind of problem (tokens, text, bool), not once per row


# -- 2. implausible figures -----------------------------------------------------------------------------------------


def test_a_figure_no_call_could_cost_is_missing_and_counted(scripted, ledger_path):
    huge = "1" * 300  # finite: 1.1e299 J
    Scripted.headers_to_send = {"X-Energy-Joules": huge, "X-Carbon-mg": huge, "X-Receipt-Id": "rcpt_huge"}
    joule_otel.instrument(db=ledger_path, flush_interval=0.1)
    try:
        openai.OpenAI(base_url=scripted, api_key="k", max_retries=0).chat.completions.create(model="auto", messages=HI)
        assert joule_otel.flush(timeout_s=20)
        stats = joule_otel.stats()
    finally:
        joule_otel.uninstrument()
    [row] = ledger_rows(ledger_path)
    assert row["energy_j"] is None and row["carbon_mg"] is None
    assert stats["invalid_headers"] == 2


def test_a_stream_final_event_beyond_the_ceiling_is_missing(scripted, ledger_path):
    events = [
        {
            "id": "c",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "m",
            "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}],
        },
        {
            "id": "c",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "m",
            "choices": [],
            "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
            "joule": {"energy_joules": 1e300, "carbon_mg": True},
        },
    ]
    Scripted.content_type = "text/event-stream"
    Scripted.body = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    Scripted.headers_to_send = {"X-Energy-Joules": "12", "X-Carbon-mg": "1", "X-Receipt-Id": "rcpt_stream"}
    joule_otel.instrument(db=ledger_path, flush_interval=0.1)
    try:
        stream = openai.OpenAI(base_url=scripted, api_key="k", max_retries=0).chat.completions.create(
            model="auto", messages=HI, stream=True
        )
        assert [c.choices[0].delta.content for c in stream if c.choices] == ["hi"]
        assert joule_otel.flush(timeout_s=20)
    finally:
        joule_otel.uninstrument()
    [row] = ledger_rows(ledger_path)
    # the final event's figure is implausible, so the header's stands; the tokens are fine
    assert (row["energy_j"], row["carbon_mg"]) == (12.0, 1.0)
    assert (row["input_tokens"], row["output_tokens"]) == (3, 4)


# -- 3. forks and multiprocessing -----------------------------------------------------------------------------------


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


# -- 3b. a full disk ------------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs: a real device that runs out of space."""
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"cannot mount a tmpfs for the disk-full test: {result.stderr!r}")
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(mount: Path, leave_bytes: int) -> Path:
    filler = mount / "filler"
    free = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
    filler.write_bytes(b"\0" * max(free - leave_bytes, 0))
    return filler


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


# -- 4. SIGTERM -----------------------------------------------------------------------------------------------------


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


# -- 5, 6. never destroy or downgrade a user's ledger ---------------------------------------------------------------


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
    assert [c[1] for c in commands] == ["ledger", "ledger", "budgets"]
    for command in commands:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert cli_main(command[1:]) == 0, command
        assert "None" not in out.getvalue()
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
    assert len(ledger_rows(ledger_path)) == 3  # and readers see them


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


# -- 7. one writer at a time ----------------------------------------------------------------------------------------


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


# -- 8. workloads ---------------------------------------------------------------------------------------------------


def test_one_workload_object_shared_by_concurrent_tasks(ledger_path, joule_simulator):
    support = joule_otel.workload("support")
    joule_otel.instrument(db=ledger_path, flush_interval=0.1)
    try:
        client = openai.AsyncOpenAI(base_url=joule_simulator.base_url, api_key="k", max_retries=0)

        async def task(n):
            async with support:
                await asyncio.sleep(0.01 * n)
                await client.chat.completions.create(model="auto", messages=HI)
                with support:  # nested re-entry of the same object
                    await asyncio.sleep(0.01)

        async def main():
            await asyncio.gather(*(task(n) for n in (3, 1, 2)))
            await client.close()

        asyncio.run(main())
        with support:
            pass

        def in_thread():
            with support:
                time.sleep(0.05)

        threads = [threading.Thread(target=in_thread) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert joule_otel.flush(timeout_s=10)
    finally:
        joule_otel.uninstrument()
    assert [r["workload"] for r in ledger_rows(ledger_path)] == ["support"] * 3


def test_the_default_workload_is_cleaned_and_capped_like_workload(ledger_path, joule_simulator, monkeypatch):
    joule_otel.instrument(db=ledger_path, flush_interval=0.1, workload="night\nly" + "x" * 1_000_000)
    try:
        openai.OpenAI(base_url=joule_simulator.base_url, api_key="k", max_retries=0).chat.completions.create(
            model="auto", messages=HI
        )
        assert joule_otel.flush(timeout_s=10)
    finally:
        joule_otel.uninstrument()
    [row] = ledger_rows(ledger_path)
    assert row["workload"].startswith("nightly") and len(row["workload"]) == 256
    with pytest.raises(ValueError, match="workload"):
        joule_otel.instrument(db=ledger_path, workload="\n\t")
    monkeypatch.setenv("JOULE_OTEL_WORKLOAD", "cron\x07job")
    from joule_otel._config import Settings

    assert Settings.resolve().workload == "cronjob"


# -- 8b, 8c. the exposition and the spans stay clean ----------------------------------------------------------------


PROMETHEUS_APP = """
import sys, urllib.request
import openai
import joule_otel
from prometheus_client.parser import text_string_to_metric_families

joule_otel.instrument(db=sys.argv[2], prometheus_port=int(sys.argv[3]), flush_interval=60)
client = openai.OpenAI(base_url=sys.argv[1], api_key="jc_prom", max_retries=0)
for _ in range(3):
    client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}])
    joule_otel.flush(timeout_s=10)
joule_otel.flush(timeout_s=10)
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[3]}/metrics").read().decode()
seen, duplicates = set(), []
for family in text_string_to_metric_families(text):
    for sample in family.samples:
        key = (sample.name, tuple(sorted(sample.labels.items())))
        if key in seen:
            duplicates.append(key)
        seen.add(key)
print(len(duplicates), sum(1 for name, _ in seen if name == "joule_client_energy_joules_total"))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_flush_never_duplicates_series_in_the_prometheus_exposition(tmp_path, joule_simulator):
    out = run_script(PROMETHEUS_APP, joule_simulator.base_url, str(tmp_path / "p.duckdb"), str(free_port()))
    duplicates, energy_series = out.stdout.split()
    assert duplicates == "0"
    assert int(energy_series) >= 1


def test_credentials_in_a_query_string_never_reach_a_span(telemetry, joule_simulator):
    url = f"{joule_simulator.base_url}/chat/completions?api-key=SECRET1&key=SECRET2&api-version=2024-10-21"
    httpx.post(url, json={"model": "auto", "messages": HI}, headers={"Authorization": "Bearer k"})
    assert joule_otel.flush(timeout_s=10)
    [span] = [s for s in telemetry.spans.get_finished_spans() if "joule.receipt_id" in (s.attributes or {})]
    text = json.dumps(dict(span.attributes))
    assert "SECRET" not in text
    full = span.attributes.get("url.full") or span.attributes.get("http.url")
    assert "api-key=REDACTED" in full and "key=REDACTED" in full and "api-version=2024-10-21" in full


# -- 9. aiohttp, through the clients people use ---------------------------------------------------------------------


AIOHTTP_CLIENTS = """
import asyncio, os, sys
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # litellm must not fetch its price list
import openai
import joule_otel

early = openai.AsyncOpenAI(base_url=sys.argv[1], api_key="jc_aio", max_retries=0,
                           http_client=openai.DefaultAioHttpClient())  # made before instrument()
joule_otel.instrument(db=sys.argv[2], flush_interval=0.1)
import litellm

HI = [{"role": "user", "content": "hi"}]

async def main():
    await early.chat.completions.create(model="auto", messages=HI)
    stream = await early.chat.completions.create(model="auto", messages=HI, stream=True,
                                                 stream_options={"include_usage": True})
    async for _ in stream:
        pass
    closed = await early.chat.completions.create(model="auto", messages=HI, stream=True)
    async for _ in closed:
        break
    await closed.close()
    await early.embeddings.create(model="auto", input="hi")
    await early.close()
    await litellm.acompletion(model="openai/auto", api_base=sys.argv[1], api_key="jc_lite", messages=HI)
    s = await litellm.acompletion(model="openai/auto", api_base=sys.argv[1], api_key="jc_lite", messages=HI,
                                  stream=True, stream_options={"include_usage": True})
    async for _ in s:
        pass

asyncio.run(main())
assert joule_otel.flush(timeout_s=20)
"""


def test_aiohttp_calls_of_openai_and_litellm_land_exactly_once(tmp_path, joule_simulator):
    db = tmp_path / "aio.duckdb"
    run_script(AIOHTTP_CLIENTS, joule_simulator.base_url, str(db), timeout=240)
    issued = {r.receipt_id: r for r in joule_simulator.receipts}
    assert len(issued) == 6
    rows = ledger_rows(db)
    assert sorted(r["receipt_id"] for r in rows) == sorted(issued)
    for row in rows:
        receipt = issued[row["receipt_id"]]
        assert row["energy_j"] == receipt.energy_j
        assert row["provider"] == "joule_cloud"
    with_usage = [r for r in rows if r["stream"] and r["input_tokens"] is not None]
    assert len(with_usage) == 2  # the two streams that asked for usage
    assert {r["operation"] for r in rows} == {"chat", "embeddings"}


# -- 10. providers --------------------------------------------------------------------------------------------------


def test_other_providers_are_rows_but_never_joules_and_non_inference_routes_are_not_rows(
    telemetry, joule_simulator, scripted
):
    oai = openai.OpenAI(base_url=joule_simulator.base_url, api_key="k", max_retries=0)
    oai.chat.completions.create(model="auto", messages=HI)
    oai.models.list()
    httpx.post(f"{joule_simulator.base_url}/moderations", json={"input": "x"})
    other = openai.OpenAI(base_url=scripted, api_key="k", max_retries=0)  # an OpenAI-compatible server, no headers
    other.chat.completions.create(model="gpt-4o-mini", messages=HI)
    other.models.list()
    assert joule_otel.flush(timeout_s=10)
    rows = ledger_rows(telemetry.db)
    assert sorted((r["provider"], r["operation"]) for r in rows) == [("127.0.0.1", "chat"), ("joule_cloud", "chat")]
    foreign = next(r for r in rows if r["provider"] == "127.0.0.1")
    assert foreign["energy_j"] is None and foreign["input_tokens"] == 1
    span_providers = {
        s.attributes.get("gen_ai.provider.name")
        for s in telemetry.spans.get_finished_spans()
        if "gen_ai.provider.name" in (s.attributes or {})
    }
    assert span_providers == {"joule_cloud", "127.0.0.1"}
    durations = telemetry.metric_points("gen_ai.client.operation.duration")
    metric_providers = {dict(p.attributes).get("gen_ai.provider.name") for p in durations}
    assert metric_providers == {"joule_cloud", "127.0.0.1"}
    assert {dict(p.attributes)["gen_ai.provider.name"] for p in telemetry.metric_points("joule.client.energy")} == {
        "joule_cloud"
    }


def test_provider_rule():
    from joule_otel._genai import provider_for

    assert provider_for("api.greenjoules.cloud", False) == "joule_cloud"
    assert provider_for("EU.API.GreenJoules.Cloud.", False) == "joule_cloud"
    assert provider_for("api.openai.com", False) == "openai"
    assert provider_for("api.openai.com", True) == "joule_cloud"  # it carried Joule's headers
    assert provider_for("notgreenjoules.cloud", False) == "notgreenjoules.cloud"
    assert provider_for(None, False) == "unknown"


@pytest.mark.parametrize(
    ("headers", "provider"),
    [
        ({"X-Tier": "standard"}, "joule_cloud"),  # any of Joule's response headers, even alone
        ({"x-receipt-id": "r"}, "joule_cloud"),
        ({"X-Region": "eu-fi"}, "llm.example"),  # a region alone is not Joule's: a request sends it too
        ({"OpenAI-Version": "2020-10-01"}, "openai"),  # OpenAI's API behind a gateway
        ({"openai-processing-ms": "12", "x-energy-joules": "1"}, "joule_cloud"),
        ({"content-type": "application/json"}, "llm.example"),
    ],
)
def test_provider_of_a_response(headers, provider):
    from joule_otel._genai import provider_of_scanned
    from joule_otel._headers import scan_headers

    assert provider_of_scanned("llm.example", scan_headers(httpx.Headers(headers))) == provider


# -- 11. the app's own provider, whatever its class -----------------------------------------------------------------


def test_an_api_level_tracer_provider_that_is_not_the_sdks_is_used_not_replaced(
    ledger_path, joule_simulator, monkeypatch
):
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from joule_otel._config import Settings
    from joule_otel._exporters import resolve_providers

    exporter = InMemorySpanExporter()
    sdk = TracerProvider()
    sdk.add_span_processor(SimpleSpanProcessor(exporter))

    class VendorProxyTracerProvider(trace.TracerProvider):  # Logfire's ProxyTracerProvider is of this kind
        def get_tracer(self, *args, **kwargs):
            return sdk.get_tracer(*args, **kwargs)

    vendor = VendorProxyTracerProvider()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")  # would tempt a private pipeline
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")  # (no global MeterProvider left behind for other tests)
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: vendor)
    providers = resolve_providers(Settings.resolve(db=ledger_path), None, None)
    assert providers.tracer_provider is vendor
    assert providers.created == [] or all(not hasattr(p, "get_tracer") for p in providers.created)
    joule_otel.instrument(db=ledger_path, flush_interval=0.1)
    try:
        openai.OpenAI(base_url=joule_simulator.base_url, api_key="k", max_retries=0).chat.completions.create(
            model="auto", messages=HI
        )
        assert joule_otel.flush(timeout_s=10)
    finally:
        joule_otel.uninstrument()
        for provider in providers.created:
            provider.shutdown()
    spans = [s for s in exporter.get_finished_spans() if "joule.receipt_id" in (s.attributes or {})]
    assert len(spans) == 1


# -- 13, 14. options mirror the environment; metrics can be lighter -------------------------------------------------


def test_unknown_options_name_the_valid_ones(ledger_path):
    with pytest.raises(ValueError, match=r"flush_intervall.*valid options: .*flush_interval"):
        joule_otel.instrument(db=ledger_path, flush_intervall=1)
    with pytest.raises(ValueError, match="metrics must be one of all, energy, none"):
        joule_otel.instrument(db=ledger_path, metrics="some")
    with pytest.raises(ValueError, match="not both"):
        joule_otel.instrument(db=ledger_path, flush_interval=1, flush_interval_s=1)
    assert joule_otel.stats() == {"instrumented": False}


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        (
            "all",
            {
                "joule.client.energy",
                "joule.client.carbon",
                "joule.client.request.energy",
                "gen_ai.client.operation.duration",
                "gen_ai.client.token.usage",
                "gen_ai.client.operation.time_to_first_chunk",
            },
        ),
        ("energy", {"joule.client.energy", "joule.client.carbon", "joule.client.request.energy"}),
        ("none", set()),
    ],
)
def test_joule_otel_metrics_chooses_what_is_recorded(ledger_path, joule_simulator, monkeypatch, mode, expected):
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    monkeypatch.setenv("JOULE_OTEL_METRICS", mode)
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    joule_otel.instrument(db=ledger_path, flush_interval=0.1, meter_provider=provider)
    try:
        client = openai.OpenAI(base_url=joule_simulator.base_url, api_key="k", max_retries=0)
        client.chat.completions.create(model="auto", messages=HI)
        for _ in client.chat.completions.create(
            model="auto", messages=HI, stream=True, stream_options={"include_usage": True}
        ):
            pass
        assert joule_otel.flush(timeout_s=10)
        assert joule_otel.stats()["metrics"] == mode
    finally:
        joule_otel.uninstrument()
    data = reader.get_metrics_data()
    names = {
        m.name
        for rm in (data.resource_metrics if data else [])
        for sm in rm.scope_metrics
        for m in sm.metrics
        if sm.scope.name == "joule_otel"
    }
    assert names == expected
    assert len(ledger_rows(ledger_path)) == 2  # the ledger is the same whatever the metrics
    provider.shutdown()
