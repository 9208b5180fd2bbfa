"""ClickHouse (deploy/clickhouse) on ClickHouse's own engine: chdb runs every DDL statement and every Grafana panel.

Rows reach it exactly as the Collector's contrib ``clickhouse`` exporter inserts them: real OTLP exports (a Python
app's call events, Node's undici spans and the Vercel AI SDK's) are captured on loopback and mapped column by column
as the exporter's ``pushLogsData``/``pushTraceData`` do (exporter_logs.go, exporter_traces.go), into the tables of
its ``internal/sqltemplates`` (``otel-tables.sql`` says which commit). The figures must equal the DuckDB ledgers
that joule-otel itself wrote for the same calls (the app's own, and ``joule-otel collect``'s for Node).

``JOULE_OTEL_CLICKHOUSE_URL=http://user:password@host:8123`` runs the same checks against a live server too (in a
database of their own, dropped afterwards).
"""

from __future__ import annotations

import base64
import fcntl
import gzip
import json
import math
import os
import pickle
import re
import subprocess
import sys
import textwrap
import threading
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

import joule_otel

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "clickhouse"
sys.path.insert(0, str(DEPLOY))
import build_dashboard  # noqa: E402 - deploy/clickhouse is not a package

# -- the engines ---------------------------------------------------------------------------------------------------


def statements(sql: str) -> list[str]:
    """The statements of a .sql file (its comments are whole lines; each statement ends with ``;`` at a line's end)."""
    text = re.sub(r"(?m)^\s*--.*\n", "", sql)
    return [s.strip() for s in re.split(r";\s*\n", text) if s.strip()]


class Engine:
    """SQL on chdb in-process, or on a live server's HTTP interface; rows come back as dicts."""

    def __init__(self, run: Any, database: str = "otel") -> None:
        self._run, self.database = run, database

    def sql(self, query: str) -> str:
        """``query`` in this engine's database (a live server's tests get one of their own)."""
        named = query.replace("otel.", f"{self.database}.")
        return named.replace("DATABASE IF NOT EXISTS otel", f"DATABASE IF NOT EXISTS {self.database}")

    def execute(self, query: str) -> None:
        self._run(self.sql(query), None)

    def rows(self, query: str) -> list[dict[str, Any]]:
        out = self._run(self.sql(query) + " SETTINGS output_format_json_quote_64bit_integers = 0", "JSONEachRow")
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def apply(self, *names: str) -> None:
        for name in names:
            for statement in statements((DEPLOY / name).read_text()):
                self.execute(statement)

    def insert(self, table: str, rows: list[dict[str, Any]]) -> None:
        """One INSERT of ``rows``, as the exporter makes one per batch."""
        if rows:
            data = "\n".join(json.dumps(row) for row in rows)
            self.execute(f"INSERT INTO otel.{table} FORMAT JSONEachRow\n{data}")

    def refresh(self, view: str) -> None:
        self.execute(f"SYSTEM REFRESH VIEW otel.{view}")
        self.execute(f"SYSTEM WAIT VIEW otel.{view}")


def chdb_engine(path: Path) -> tuple[Engine, Any]:
    from chdb import session

    chs = session.Session(str(path))

    def run(query: str, fmt: str | None) -> str:
        return str(chs.query(query, fmt or "CSV"))

    return Engine(run), chs


def live_engine(url: str) -> Engine:
    parts = urllib.parse.urlsplit(url)
    base = f"{parts.scheme}://{parts.hostname}:{parts.port or 8123}/"
    auth = base64.b64encode(f"{parts.username or 'default'}:{parts.password or ''}".encode()).decode()

    def run(query: str, fmt: str | None) -> str:
        body = query + (f" FORMAT {fmt}" if fmt else "")
        request = urllib.request.Request(base, data=body.encode(), headers={"Authorization": f"Basic {auth}"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.read().decode()

    return Engine(run, database=f"joule_test_{uuid.uuid4().hex[:8]}")


@pytest.fixture(params=["chdb", "live"])
def clickhouse(request, tmp_path) -> Iterator[Engine]:
    """The shipped SQL applied to a fresh database: chdb always, a live server when one is named."""
    if request.param == "chdb":
        try:
            engine, chs = chdb_engine(tmp_path / "clickhouse")
        except ImportError:
            if os.environ.get("CI"):
                pytest.fail("chdb-core is needed for the ClickHouse tests (pip install -e '.[test]')")
            pytest.skip("chdb-core is not installed")
        engine.apply("otel-tables.sql", "joule.sql")
        yield engine
        chs.close()
        return
    url = os.environ.get("JOULE_OTEL_CLICKHOUSE_URL")
    if not url:
        pytest.skip("JOULE_OTEL_CLICKHOUSE_URL names no live ClickHouse server")
    engine = live_engine(url)
    engine.apply("otel-tables.sql", "joule.sql")
    try:
        yield engine
    finally:
        engine.execute(f"DROP DATABASE IF EXISTS {engine.database}")


# -- what the exporter inserts ----------------------------------------------------------------------------------------


def as_string(value: Any) -> str:
    """pcommon.Value.AsString, which the exporter's attributesToMap applies to every attribute value."""
    kind = value.WhichOneof("value")
    if kind is None:
        return ""
    if kind == "string_value":
        return str(value.string_value)
    if kind == "bool_value":
        return "true" if value.bool_value else "false"
    if kind == "int_value":
        return str(value.int_value)
    if kind == "double_value":
        return _es6_number(value.double_value)
    if kind == "bytes_value":
        return base64.b64encode(value.bytes_value).decode()
    return json.dumps(_raw(value), separators=(",", ":"), ensure_ascii=False)


def _raw(value: Any) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_raw(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _raw(kv.value) for kv in value.kvlist_value.values}
    if kind == "bytes_value":
        return base64.b64encode(value.bytes_value).decode()
    return getattr(value, kind) if kind else None


def _es6_number(number: float) -> str:
    """Go's float64AsString: the shortest digits that round-trip, fixed notation between 1e-6 and 1e21."""
    if not math.isfinite(number):
        return f"json: unsupported value: {number}"
    if number == 0 or 1e-6 <= abs(number) < 1e21:
        import numpy as np

        return str(np.format_float_positional(number, trim="-"))
    mantissa, exponent = repr(number).split("e")
    return f"{mantissa}e{'-' if exponent.startswith('-') else '+'}{int(exponent.lstrip('+-'))}"


def _attributes(attributes: Any) -> dict[str, str]:
    return {kv.key: as_string(kv.value) for kv in attributes}


def _time(ns: int) -> str:
    """A DateTime64(9) as the exporter's time.Time reaches it: the instant, whatever the server's time zone."""
    return f"{ns // 1_000_000_000}.{ns % 1_000_000_000:09d}"


def log_rows(body: bytes) -> list[dict[str, Any]]:
    """The rows of otel_logs that pushLogsData inserts for one ExportLogsServiceRequest."""
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

    request = ExportLogsServiceRequest.FromString(body)
    rows = []
    for resource_logs in request.resource_logs:
        resource = _attributes(resource_logs.resource.attributes)
        for scope_logs in resource_logs.scope_logs:
            for record in scope_logs.log_records:
                rows.append(
                    {
                        "Timestamp": _time(record.time_unix_nano or record.observed_time_unix_nano),
                        "TraceId": record.trace_id.hex(),
                        "SpanId": record.span_id.hex(),
                        "TraceFlags": record.flags & 0xFF,
                        "SeverityText": record.severity_text,
                        "SeverityNumber": int(record.severity_number),
                        "ServiceName": resource.get("service.name", ""),
                        "Body": as_string(record.body),
                        "ResourceSchemaUrl": resource_logs.schema_url,
                        "ResourceAttributes": resource,
                        "ScopeSchemaUrl": scope_logs.schema_url,
                        "ScopeName": scope_logs.scope.name,
                        "ScopeVersion": scope_logs.scope.version,
                        "ScopeAttributes": _attributes(scope_logs.scope.attributes),
                        "LogAttributes": _attributes(record.attributes),
                        "EventName": record.event_name,
                    }
                )
    return rows


SPAN_KINDS = ["SPAN_KIND_UNSPECIFIED", "SPAN_KIND_INTERNAL", "SPAN_KIND_SERVER", "SPAN_KIND_CLIENT"]
SPAN_KINDS += ["SPAN_KIND_PRODUCER", "SPAN_KIND_CONSUMER"]
STATUS_CODES = ["STATUS_CODE_UNSET", "STATUS_CODE_OK", "STATUS_CODE_ERROR"]


def span_rows(body: bytes) -> list[dict[str, Any]]:
    """The rows of otel_traces that pushTraceData inserts for one ExportTraceServiceRequest."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    request = ExportTraceServiceRequest.FromString(body)
    rows = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                rows.append(
                    {
                        "Timestamp": _time(span.start_time_unix_nano),
                        "TraceId": span.trace_id.hex(),
                        "SpanId": span.span_id.hex(),
                        "ParentSpanId": span.parent_span_id.hex(),
                        "TraceState": span.trace_state,
                        "SpanName": span.name,
                        "SpanKind": SPAN_KINDS[span.kind],
                        "ServiceName": resource.get("service.name", ""),
                        "ResourceAttributes": resource,
                        "ScopeName": scope_spans.scope.name,
                        "ScopeVersion": scope_spans.scope.version,
                        "SpanAttributes": _attributes(span.attributes),
                        "Duration": span.end_time_unix_nano - span.start_time_unix_nano,
                        "StatusCode": STATUS_CODES[span.status.code],
                        "StatusMessage": span.status.message,
                        "Events.Timestamp": [_time(e.time_unix_nano) for e in span.events],
                        "Events.Name": [e.name for e in span.events],
                        "Events.Attributes": [_attributes(e.attributes) for e in span.events],
                        "Links.TraceId": [link.trace_id.hex() for link in span.links],
                        "Links.SpanId": [link.span_id.hex() for link in span.links],
                        "Links.TraceState": [link.trace_state for link in span.links],
                        "Links.Attributes": [_attributes(link.attributes) for link in span.links],
                    }
                )
    return rows


def deliver(engine: Engine, exports: list[tuple[str, bytes]]) -> None:
    """Each captured export as the exporter writes it: one INSERT per batch."""
    for path, body in exports:
        if path.endswith("/v1/logs"):
            engine.insert("otel_logs", log_rows(body))
        elif path.endswith("/v1/traces"):
            engine.insert("otel_traces", span_rows(body))


# -- real exports, captured on loopback -------------------------------------------------------------------------------


class _Sink(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":  # Node's exporters send chunks
            body = b""
            while size := int(self.rfile.readline().split(b";")[0], 16):
                body += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
        else:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
        if self.headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        self.server.exports.append((self.path, body))  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="session")
def exports(tmp_path_factory, worker_id) -> dict[str, Any]:
    """Real OTLP exports of a Python app (call events and spans) and of Node (openai, Vercel AI SDK), with the
    DuckDB ledgers joule-otel wrote for the same calls: the app's own, and collect's from Node's exports.

    Made once a run: under xdist the first worker to ask makes them in the run's shared folder, the others read them.
    """
    if worker_id == "master":
        return make_exports(tmp_path_factory.mktemp("exports"))
    shared = tmp_path_factory.getbasetemp().parent / "clickhouse-exports"
    shared.mkdir(exist_ok=True)
    with open(shared / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        made = shared / "exports.pickle"
        if not made.exists():
            made.write_bytes(pickle.dumps(make_exports(shared)))
        return pickle.loads(made.read_bytes())  # written by this run, just above


def make_exports(tmp: Path) -> dict[str, Any]:
    from test_collect import node_clients_path, start_collect, stop

    from joule_otel.simulator import running

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    server.exports = []  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sink = f"http://127.0.0.1:{server.server_address[1]}"
    script = tmp / "app.py"
    script.write_text(textwrap.dedent(PYTHON_APP))
    with running(seed=7) as sim:
        sim.set_energy_budget("jc_broke", 0.0)
        env = {
            # (the suite's clock, moved a month on in CI's second run, moves the app too: see tests/clock)
            **{k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "JOULE_OTEL_")) or "CLOCK" in k},
            "OTEL_EXPORTER_OTLP_ENDPOINT": sink,
            "OTEL_SERVICE_NAME": "py-shop",
            "OTEL_METRICS_EXPORTER": "none",
            "JOULE_OTEL_CALL_EVENTS": "true",
            "JOULE_OTEL_TAGS": "env=prod",
        }
        app = subprocess.run(
            [sys.executable, str(script), sim.base_url, str(tmp / "app.duckdb")],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert app.returncode == 0, app.stderr[-3000:]
        python_exports = list(server.exports)
        node = node_clients_path()
        for mode in ("openai", "ai-sdk"):
            node_env = {**env, "OTEL_SERVICE_NAME": f"node-{mode}"}
            ran = subprocess.run(
                ["node", str(node), sim.base_url, mode], env=node_env, capture_output=True, text=True, timeout=180
            )
            assert ran.returncode == 0, ran.stderr[-3000:]
        receipts = list(sim.receipts)
    server.shutdown()
    node_exports = [e for e in server.exports[len(python_exports) :] if e[0].endswith("/v1/traces")]
    assert node_exports, f"Node exported nothing: {[p for p, _ in server.exports]}"
    collector = start_collect(tmp / "central.duckdb")
    try:
        for path, body in node_exports:
            status, _ = collector.post(path, body, "application/x-protobuf")
            assert status == 200
    finally:
        stop(collector)
    return {
        "python": python_exports,
        "node": node_exports,
        "ledgers": [tmp / "app.duckdb", tmp / "central.duckdb"],
        "receipts": receipts,
    }


PYTHON_APP = """
import sys
import openai
import joule_otel

joule_otel.instrument(db=sys.argv[2])
client = openai.OpenAI(base_url=sys.argv[1], api_key="jc_shop", max_retries=0)
ask = [{"role": "user", "content": "Where do my joules go?"}]
with joule_otel.workload("support"), joule_otel.tags(team="search", customer="acme"):
    client.chat.completions.create(model="auto", messages=ask)
    for _ in client.chat.completions.create(
        model="auto", messages=ask, stream=True, stream_options={"include_usage": True}
    ):
        pass
with joule_otel.workload("indexing"), joule_otel.tags(team="data"):
    client.embeddings.create(model="auto", input="joules per token")
    client.chat.completions.create(model="llama-3.3-70b-instruct", messages=ask, extra_headers={"X-Region": "eu-se"})
broke = openai.OpenAI(base_url=sys.argv[1], api_key="jc_broke", max_retries=0)
with joule_otel.workload("nightly"):
    try:
        broke.chat.completions.create(model="auto", messages=ask)  # refused: 402, a row without a receipt
    except openai.APIStatusError as exc:
        assert exc.status_code == 402, exc
"""


# -- the figures ---------------------------------------------------------------------------------------------------

COMPARED = (
    "receipt_id", "duration_ms", "ttft_ms", "service", "workload", "operation", "server_address", "status_code",
    "error_type", "requested_model", "routed_to", "tier", "region", "energy_j", "carbon_mg", "input_tokens",
    "output_tokens", "stream", "trace_id", "span_id", "provider", "tags",
)  # fmt: skip


def duckdb_rows(ledgers: list[Path]) -> list[dict[str, Any]]:
    rows = []
    for ledger in ledgers:
        frame = joule_otel.read_ledger(ledger)
        for record in frame.to_dict("records"):
            record["started_us"] = int(record["started_at"].timestamp() * 1_000_000)
            record["tags"] = dict(record["tags"] or {})
            rows.append({k: (None if _missing(v) else v) for k, v in record.items()})
    return rows


def _missing(value: Any) -> bool:
    try:
        return bool(value is None or (isinstance(value, float) and math.isnan(value)))
    except TypeError:
        return False


def clickhouse_rows(engine: Engine) -> list[dict[str, Any]]:
    return engine.rows(
        "SELECT *, toUnixTimestamp64Micro(started_at) AS started_us FROM otel.joule_calls_final ORDER BY started_at"
    )


def key(row: dict[str, Any]) -> str:
    return row["receipt_id"] or f"{row['trace_id']}/{row['span_id']}"


def same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-6)
    return a == b


def panel_sql(sql: str, since: datetime, until: datetime, **chosen: list[str]) -> str:
    """A panel's SQL as Grafana's ClickHouse data source sends it: its macros and variables expanded."""
    frm, to = int(since.timestamp()), int(until.timestamp())
    sql = re.sub(r"\$__timeFilter\((\w+)\)", rf"\1 >= toDateTime({frm}) AND \1 <= toDateTime({to})", sql)
    for name in build_dashboard.VARIABLES:
        values = chosen.get(name, ["__all"])
        sql = sql.replace(f"${{{name}:singlequote}}", ", ".join("'" + v.replace("'", "\\'") + "'" for v in values))
    assert "$" not in sql, sql
    return sql


def panels() -> dict[str, str]:
    return {panel["title"]: panel["targets"][0]["rawSql"] for panel in build_dashboard.build()["panels"]}


# -- the tests -----------------------------------------------------------------------------------------------------


def test_every_statement_runs_and_makes_the_ledger_and_its_views(clickhouse):
    tables = {
        r["name"] for r in clickhouse.rows(f"SELECT name FROM system.tables WHERE database = '{clickhouse.database}'")
    }
    assert {
        "otel_logs",
        "otel_traces",
        "joule_calls",
        "joule_calls_hourly",
        "joule_hours",
        "joule_calls_final",
    } <= tables
    assert {"joule_calls_from_events", "joule_calls_from_spans", "joule_calls_hourly_refresh"} <= tables
    from joule_otel.ledger._schema import COLUMN_NAMES

    where = f"database = '{clickhouse.database}' AND table = 'joule_calls_final'"
    columns = [r["name"] for r in clickhouse.rows(f"SELECT name FROM system.columns WHERE {where} ORDER BY position")]
    assert columns == [*COLUMN_NAMES, "source"], "the ledger's columns, in the DuckDB ledger's order"


def test_the_ledger_in_clickhouse_equals_the_duckdb_ledgers_and_every_panel_adds_up(clickhouse, exports):
    deliver(clickhouse, exports["python"] + exports["node"])
    clickhouse.refresh("joule_calls_from_spans")  # spans land within a minute: now, for the test
    truth = {key(r): r for r in duckdb_rows(exports["ledgers"])}
    found = {key(r): r for r in clickhouse_rows(clickhouse)}
    python_calls = [r for r in truth.values() if r["service"] == "py-shop"]
    assert len(python_calls) == 5 and len(truth) > 5  # the app's 5 calls (one refused with 402), and Node's
    assert set(found) == set(truth)
    for call, expected in truth.items():
        got = found[call]
        differ = {c: (expected[c], got[c]) for c in COMPARED if not same(expected[c], got[c])}
        assert differ == {}, f"{call} ({got['source']})"
        assert abs(got["started_us"] - expected["started_us"]) <= 1
    assert {r["source"] for r in found.values()} == {"call_event", "span"}

    # the Collector sends every batch again (a retry after a timeout): nothing counts twice, before or after merges
    deliver(clickhouse, exports["python"] + exports["node"])
    clickhouse.refresh("joule_calls_from_spans")
    assert len(clickhouse_rows(clickhouse)) == len(truth)
    # the dashboard's range: every call (Node keeps the real date when the suite's clock is moved: tests/clock)
    window = (
        datetime.fromtimestamp(min(r["started_us"] for r in truth.values()) / 1e6, timezone.utc) - timedelta(hours=1),
        datetime.fromtimestamp(max(r["started_us"] for r in truth.values()) / 1e6, timezone.utc) + timedelta(hours=1),
    )
    figures = _panel_figures(clickhouse, *window)
    clickhouse.execute("OPTIMIZE TABLE otel.joule_calls FINAL")
    assert_same_figures(_panel_figures(clickhouse, *window), figures)  # (sums in another order: equal to the last bits)

    rows = list(truth.values())
    energy = sum(r["energy_j"] or 0 for r in rows)
    assert figures["Energy"] == pytest.approx(energy / 1000)
    assert figures["Carbon"] == pytest.approx(sum(r["carbon_mg"] or 0 for r in rows) / 1000)
    assert figures["Calls"] == len(rows)
    assert figures["Refused for budget (402)"] == sum(r["status_code"] == 402 for r in rows) == 1
    assert figures["Hours from totals only"] == 0
    out_tokens = sum(r["output_tokens"] or 0 for r in rows)
    assert figures["Energy per 1k output tokens"] == pytest.approx(energy / out_tokens * 1000)
    by_workload: dict[str, float] = {}
    for r in rows:
        by_workload[r["workload"] or "(none)"] = by_workload.get(r["workload"] or "(none)", 0) + (r["energy_j"] or 0)
    assert figures["Energy by workload"] == pytest.approx(by_workload)
    router: dict[tuple[str, str], int] = {}
    for r in rows:
        pair = (r["requested_model"] or "(none)", r["routed_to"] or "(none)")
        router[pair] = router.get(pair, 0) + 1
    assert figures["The router: what was asked, what served"] == router
    assert figures["Receipts"] == len(rows)

    # a variable narrows every panel: the workload "support" alone
    narrowed = _panel_figures(clickhouse, *window, workload=["support"])
    assert narrowed["Energy"] == pytest.approx(by_workload["support"] / 1000)


def assert_same_figures(got: Any, expected: Any) -> None:
    if isinstance(expected, dict):
        assert set(got) == set(expected)
        for name, value in expected.items():
            assert_same_figures(got[name], value)
    else:
        assert got == pytest.approx(expected, rel=1e-12)


def _panel_figures(engine: Engine, since: datetime, until: datetime, **chosen: list[str]) -> dict[str, Any]:
    """Each panel's answer, as one figure (stats), per-series sums (time series) or a count/map (tables)."""
    figures: dict[str, Any] = {}
    for title, sql in panels().items():
        rows = engine.rows(panel_sql(sql, since, until, **chosen))
        if "time" in (rows[0] if rows else {}):
            split = [c for c in rows[0] if c not in ("time", "value")]
            if "value" in rows[0]:
                totals: dict[str, float] = {}
                for row in rows:
                    totals[row[split[0]]] = totals.get(row[split[0]], 0) + row["value"]
                figures[title] = totals
            else:
                figures[title] = {c: sum(row[c] for row in rows) for c in split}
        elif title.startswith("The router"):
            figures[title] = {(r["requested"], r["served"]): r["calls"] for r in rows}
        elif title == "Receipts":
            figures[title] = len(rows)
        else:
            assert len(rows) == 1, (title, rows)
            figures[title] = next(iter(rows[0].values())) or 0
    return figures


def test_a_span_whose_genai_parent_arrives_in_a_later_batch_gains_its_tokens(clickhouse, exports):
    node = exports["node"]
    rows = [row for _, body in node for row in span_rows(body)]
    children = [r for r in rows if any(k.startswith("http.response.header.x-") for k in r["SpanAttributes"])]
    parents = [r for r in rows if r not in children]  # the AI SDK's GenAI spans and the agents' above them
    assert any("gen_ai.usage.input_tokens" in r["SpanAttributes"] for r in parents)
    clickhouse.insert("otel_traces", children)
    clickhouse.refresh("joule_calls_from_spans")
    first = {r["span_id"]: r for r in clickhouse_rows(clickhouse) if r["source"] == "span"}
    assert first and any(r["input_tokens"] is None for r in first.values()), "no parent yet: no tokens"
    clickhouse.insert("otel_traces", parents)  # the later batch
    clickhouse.refresh("joule_calls_from_spans")
    later = {r["span_id"]: r for r in clickhouse_rows(clickhouse) if r["source"] == "span"}
    assert set(later) == set(first), "still one row a call"
    truth = {r["span_id"]: r for r in duckdb_rows(exports["ledgers"][1:])}
    for span_id, row in later.items():
        assert (row["input_tokens"], row["output_tokens"]) == (
            truth[span_id]["input_tokens"],
            truth[span_id]["output_tokens"],
        )
        assert row["requested_model"] == truth[span_id]["requested_model"]


def test_rows_the_ttl_removes_keep_their_totals_in_every_panel(clickhouse, exports):
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

    log_exports = [body for path, body in exports["python"] if path.endswith("/v1/logs")]
    # the engine's clock decides what is settled and what the TTL removes: the calls are dated by it, now and five
    # days ago (other receipts then), whatever the clock of the app that sent them
    now_ns = clickhouse.rows("SELECT toUnixTimestamp64Nano(now64(9)) AS now")[0]["now"]
    recent_bodies, old_bodies = [], []
    for days_ago, bodies in ((0, recent_bodies), (5, old_bodies)):
        for body in log_exports:
            request = ExportLogsServiceRequest.FromString(body)
            for resource_logs in request.resource_logs:
                for scope_logs in resource_logs.scope_logs:
                    for n, record in enumerate(scope_logs.log_records):
                        record.time_unix_nano = now_ns - days_ago * 86_400 * 10**9 - (n + 1) * 10**9
                        for attribute in record.attributes:
                            if days_ago and attribute.key == "joule.receipt_id":
                                attribute.value.string_value = "old_" + attribute.value.string_value
                        if days_ago:
                            record.span_id = bytes(8)  # the 402 (no receipt) is then keyed by its record's hash
            bodies.append(("/v1/logs", request.SerializeToString()))
    deliver(clickhouse, recent_bodies)
    recent = clickhouse_rows(clickhouse)
    deliver(clickhouse, old_bodies)
    clickhouse.refresh("joule_calls_hourly_refresh")
    since = datetime.fromtimestamp(now_ns / 1e9, timezone.utc) - timedelta(days=30)
    until = datetime.fromtimestamp(now_ns / 1e9, timezone.utc) + timedelta(hours=1)
    totals_sql = panel_sql(panels()["Calls"], since, until)
    energy_sql = panel_sql(panels()["Energy"], since, until)
    before = (clickhouse.rows(totals_sql), clickhouse.rows(energy_sql))
    assert before[0] == [{"calls": 2 * len(recent)}]

    # retention shortened to 3 days, as the SQL's header says to change it: the old days' rows go at once
    clickhouse.execute("ALTER TABLE otel.joule_calls MODIFY TTL toDate(started_at) + INTERVAL 3 DAY")
    clickhouse.execute("OPTIMIZE TABLE otel.joule_calls FINAL")
    left = clickhouse_rows(clickhouse)
    assert sorted(key(r) for r in left) == sorted(key(r) for r in recent), "only the recent rows are kept"
    assert (clickhouse.rows(totals_sql), clickhouse.rows(energy_sql)) == before, "the totals stay"
    hours = clickhouse.rows(panel_sql(panels()["Hours from totals only"], since, until))
    assert hours[0]["hours"] >= 1
    clickhouse.refresh("joule_calls_hourly_refresh")  # refreshed again: each hour is written once
    assert (clickhouse.rows(totals_sql), clickhouse.rows(energy_sql)) == before


def test_a_duckdb_ledger_exported_loads_once_however_often_and_keeps_its_pruned_totals(clickhouse, tmp_path):
    from test_retention import NOW, _ledger, _totals

    from joule_otel.ledger._retention import prune

    db = tmp_path / "ledger.duckdb"
    _ledger(db, [50.0, 2.0])
    prune(db, NOW - timedelta(days=30))
    out = tmp_path / "calls.parquet"
    result = subprocess.run(
        [sys.executable, "-m", "joule_otel._cli", "ledger", "export", str(out), "--clickhouse", "--db", str(db)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "wrote 200 rows" in result.stdout and "calls.hourly.parquet" in result.stdout
    hourly = out.with_name("calls.hourly.parquet")
    for _ in range(2):  # loaded twice: a call stays one row
        clickhouse.execute(f"INSERT INTO otel.joule_calls SELECT * FROM file('{out}', Parquet)")
    clickhouse.execute(f"INSERT INTO otel.joule_calls_hourly SELECT * FROM file('{hourly}', Parquet)")
    figures = clickhouse.rows(
        "SELECT sum(calls) AS calls, sum(energy_j) AS energy_j, countDistinctIf(hour, from_totals) AS hours "
        "FROM otel.joule_hours"
    )[0]
    calls, energy = _totals(db)
    assert (figures["calls"], figures["energy_j"]) == (calls, pytest.approx(energy))
    assert figures["hours"] >= 1


def test_the_committed_dashboard_is_what_the_builder_makes():
    built = json.dumps(build_dashboard.build(), indent=2) + "\n"
    assert (DEPLOY / "joule-otel-clickhouse.json").read_text() == built


def test_the_collector_config_uses_the_stock_exporter_with_a_queue_on_disk_and_compose_runs_the_stack():
    import yaml

    config = yaml.safe_load((DEPLOY / "otel-collector.yaml").read_text())
    clickhouse = config["exporters"]["clickhouse"]
    assert clickhouse["create_schema"] is False and clickhouse["database"] == "otel"
    queue = clickhouse["sending_queue"]
    assert queue["storage"] in config["extensions"] and queue["storage"] in config["service"]["extensions"]
    assert queue["batch"]["min_size"] >= 1000
    pipelines = config["service"]["pipelines"]
    assert "clickhouse" in pipelines["logs/clickhouse"]["exporters"]
    assert "clickhouse" in pipelines["traces/clickhouse"]["exporters"]
    assert "prometheus" in pipelines["metrics"]["exporters"] and "otlp/tempo" in pipelines["traces"]["exporters"]
    for pipeline in pipelines.values():
        assert set(pipeline["exporters"]) <= set(config["exporters"])
        assert set(pipeline.get("processors", [])) <= set(config["processors"])
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    mounted = [v.split(":")[0] for service in compose["services"].values() for v in service.get("volumes", [])]
    for source in mounted:
        if source.startswith("./"):
            assert (DEPLOY.parent / source).exists(), f"{source} (relative to deploy/, the first compose file's)"
    init = [v for v in compose["services"]["clickhouse"]["volumes"] if "initdb" in v]
    assert [v.split(":")[1] for v in init] == sorted(v.split(":")[1] for v in init), "tables first, then the views"


def test_the_sql_reads_the_attributes_joule_otel_sends():
    """The call events' attribute names (joule_otel/_events.py) are the ones the SQL reads."""
    from joule_otel._events import FIELDS

    sql = (DEPLOY / "joule.sql").read_text()
    for column, attribute in FIELDS.items():
        assert f"LogAttributes['{attribute}']" in sql, (column, attribute)


ODD_VALUES = [
    "12.5", " 1.25e1 ", "+5", "1.", ".5", "0", "-0", "-1", "abc", "NaN", "nan", "inf", "-inf", "1e400", "1_000",
    "１２", "١٢", "", " ", "1e7", "10000001", "3.4028235e38", "0x10", "1,5", "\t7\t", "2e-3",
]  # fmt: skip


def test_the_sql_functions_read_odd_values_as_joule_otel_does(clickhouse):
    """Every value a server can send, read by the SQL as the Python ledger reads it (headers, routes)."""
    from joule_otel._genai import INFERENCE_OPERATIONS, route_operation
    from joule_otel._headers import parse_energy
    from joule_otel.collect._spans import _header

    values = ", ".join("'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'" for v in ODD_VALUES)
    got = clickhouse.rows(f"SELECT v, joule_quantity(v, 1e7) AS q FROM (SELECT arrayJoin([{values}]) AS v)")
    assert {r["v"]: r["q"] for r in got} == {v: parse_energy(v) for v in ODD_VALUES}

    headers = ['["a","0.5"]', "0.5", "1, 2", " 3 ", "[]", "", '["only"]']
    listed = ", ".join("'" + h.replace("'", "\\'") + "'" for h in headers)
    got = clickhouse.rows(f"SELECT h, joule_header(h) AS v FROM (SELECT arrayJoin([{listed}]) AS h)")
    python = {h: _header({"k": json.loads(h) if h.startswith("[") else h}, "k") or "" for h in headers}
    assert {r["h"]: r["v"] for r in got} == python

    paths = [
        "/v1/chat/completions", "/openai/v1/chat/completions/", "/v1/completions?x=1", "/v1/embeddings",
        "/v1/responses/resp_1", "/v1/models", "/v1/files/f", "/v1/threads/t/runs", "/v1/unknown", "/health",
        "/v1/images/generations", "/v1/audio/speech", "/v1/chat/completionsX",
    ]  # fmt: skip
    listed = ", ".join(f"'{p}'" for p in paths)
    got = clickhouse.rows(f"SELECT p, joule_operation(p) AS op FROM (SELECT arrayJoin([{listed}]) AS p)")

    def python_operation(
        path: str,
    ) -> str:  # span_row's rule: no known route is "other"; one that bills nothing, no row
        operation = route_operation(path)
        return "other" if operation is None else operation if operation in INFERENCE_OPERATIONS else ""

    assert {r["p"]: r["op"] for r in got} == {p: python_operation(p) for p in paths}
