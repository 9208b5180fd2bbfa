"""``joule-otel collect``: a real receiver process, real OTLP bytes, a real ledger file."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceResponse
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan

import joule_otel


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Collector:
    url: str
    db: Path
    proc: subprocess.Popen[str]
    grpc_port: int

    def post(self, path: str, body: bytes, content_type: str, **headers: str) -> tuple[int, bytes]:
        request = urllib.request.Request(
            self.url + path, data=body, method="POST", headers={"Content-Type": content_type, **headers}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def health(self) -> dict:
        with urllib.request.urlopen(self.url + "/healthz", timeout=10) as response:
            return json.loads(response.read())

    def rows(self) -> list[dict]:
        frame = joule_otel.read_ledger(self.db)
        return [{k: (None if v is None or v != v else v) for k, v in r.items()} for r in frame.to_dict("records")]


GRPC_KEEPS_THE_REAL_CLOCK = pytest.mark.skipif(
    bool(os.environ.get("JOULE_OTEL_TEST_CLOCK")),
    reason="gRPC's C core waits on the real clock while Python's is moved; nothing of gRPC depends on the date",
)


def start_collect(db: Path, **env: str) -> Collector:
    port = free_port()
    grpc_port = 0 if os.environ.get("JOULE_OTEL_TEST_CLOCK") else free_port()  # see GRPC_KEEPS_THE_REAL_CLOCK
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "joule_otel._cli",
            "collect",
            "--port",
            str(port),
            "--grpc-port",
            str(grpc_port),
            "--db",
            str(db),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "JOULE_OTEL_FLUSH_INTERVAL": "0.2", **env},
    )
    collector = Collector(f"http://127.0.0.1:{port}", db, proc, grpc_port)
    deadline = time.monotonic() + 30
    while True:
        try:
            collector.health()
            return collector
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"collect did not start: {proc.stderr.read() if proc.stderr else ''}") from None
            time.sleep(0.1)


def stop(collector: Collector) -> str:
    collector.proc.send_signal(signal.SIGTERM)
    _, err = collector.proc.communicate(timeout=60)
    assert collector.proc.returncode == 0, err
    return err


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[Collector]:
    found = start_collect(tmp_path / "central.duckdb")
    try:
        yield found
    finally:
        if found.proc.poll() is None:
            stop(found)


# -- OTLP as Node's undici instrumentation and the Vercel AI SDK send it ------------------------------------------


def kv(key: str, value) -> KeyValue:
    if isinstance(value, bool):
        return KeyValue(key=key, value=AnyValue(bool_value=value))
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    if isinstance(value, float):
        return KeyValue(key=key, value=AnyValue(double_value=value))
    if isinstance(value, list):
        return KeyValue(
            key=key, value=AnyValue(array_value=ArrayValue(values=[AnyValue(string_value=v) for v in value]))
        )
    return KeyValue(key=key, value=AnyValue(string_value=value))


TRACE = bytes.fromhex("0af7651916cd43dd8448eb211c80319c")
PARENT = bytes.fromhex("b7ad6b7169203331")
CHILD = bytes.fromhex("00f067aa0ba902b7")
T0 = 1_764_000_000_000_000_000


def fetch_span(span_id: bytes = CHILD, receipt: str = "rcpt_node_1", parent: bytes = PARENT, joined: bool = False):
    headers = {
        "http.response.header.x-energy-joules": ["123.5"],
        "http.response.header.x-carbon-mg": ["8.9"],
        "http.response.header.x-routed-to": ["llama-3.3-70b-instruct"],
        "http.response.header.x-tier": ["Standard"],
        "http.response.header.x-region": ["eu-fi"],
        "http.response.header.x-receipt-id": [receipt],
    }
    if joined:  # Node's http instrumentation joins repeated headers with ", "
        headers = {k: ", ".join(v * 2) for k, v in headers.items()}
    attributes = [kv(k, v) for k, v in headers.items()] + [
        kv("url.full", "http://127.0.0.1:8088/v1/chat/completions"),
        kv("server.address", "127.0.0.1"),
        kv("http.request.method", "POST"),
        kv("http.response.status_code", 200),
    ]
    return PbSpan(
        trace_id=TRACE,
        span_id=span_id,
        parent_span_id=parent,
        name="POST",
        kind=PbSpan.SPAN_KIND_CLIENT,
        start_time_unix_nano=T0,
        end_time_unix_nano=T0 + 250_000_000,
        attributes=attributes,
    )


def generate_span(span_id: bytes = PARENT):
    return PbSpan(
        trace_id=TRACE,
        span_id=span_id,
        name="ai.generateText.doGenerate",
        kind=PbSpan.SPAN_KIND_INTERNAL,
        start_time_unix_nano=T0 - 1_000_000,
        end_time_unix_nano=T0 + 260_000_000,
        attributes=[
            kv("ai.usage.inputTokens", 12),
            kv("ai.usage.outputTokens", 345),
            kv("gen_ai.request.model", "auto"),
            kv("ai.telemetry.functionId", "support-bot"),
        ],
    )


def export(*spans, service: str = "node-shop") -> bytes:
    request = ExportTraceServiceRequest(
        resource_spans=[
            ResourceSpans(
                resource=Resource(attributes=[kv("service.name", service)]),
                scope_spans=[ScopeSpans(spans=list(spans))],
            )
        ]
    )
    return request.SerializeToString()


def test_what_a_decoding_process_prepares_arrives_intact():
    """Calls cross from a decoding process flattened for pickling: they arrive as they were made."""
    from joule_otel.collect._server import prepare_traces

    calls = [fetch_span(span_id=bytes([n]) * 8, receipt=f"rcpt_{n}") for n in range(1, 9)]
    prepared = prepare_traces(export(generate_span(), *calls), "", "application/x-protobuf")
    assert len(prepared.calls) == 8 and len(prepared.parents) == 1
    arrived = pickle.loads(pickle.dumps(prepared, protocol=pickle.HIGHEST_PROTOCOL))
    assert arrived == prepared
    assert [type(call.row) for call in arrived.calls] == [type(call.row) for call in prepared.calls]
    assert arrived.calls[0].row.receipt_id == "rcpt_1" and arrived.calls[0].row.energy_j == 123.5


def test_a_node_call_span_and_its_ai_sdk_parent_from_a_later_export_make_one_full_row(collector):
    status, body = collector.post("/v1/traces", export(fetch_span()), "application/x-protobuf")
    assert status == 200
    assert ExportTraceServiceResponse.FromString(body).partial_success.rejected_spans == 0
    assert collector.health()["waiting_for_parent_span"] == 1
    status, _ = collector.post(
        "/v1/traces", gzip.compress(export(generate_span())), "application/x-protobuf", **{"Content-Encoding": "gzip"}
    )
    assert status == 200
    # the same export again (a sender's retry), and the pair in one export: still one row
    collector.post("/v1/traces", export(fetch_span(), generate_span()), "application/x-protobuf")
    [row] = collector.rows()
    assert row["receipt_id"] == "rcpt_node_1"
    assert (row["energy_j"], row["carbon_mg"]) == (123.5, 8.9)
    assert (row["routed_to"], row["tier"], row["region"]) == ("llama-3.3-70b-instruct", "standard", "eu-fi")
    assert (row["input_tokens"], row["output_tokens"], row["requested_model"]) == (12, 345, "auto")
    assert (row["service"], row["workload"], row["operation"], row["provider"]) == (
        "node-shop",
        "support-bot",
        "chat",
        "joule_cloud",
    )
    assert row["status_code"] == 200 and row["duration_ms"] == 250.0
    assert (row["trace_id"], row["span_id"]) == (TRACE.hex(), CHILD.hex())


def test_comma_joined_headers_and_spans_without_joule_headers(collector):
    plain = PbSpan(
        trace_id=TRACE,
        span_id=bytes.fromhex("1111111111111111"),
        name="GET",
        kind=PbSpan.SPAN_KIND_CLIENT,
        start_time_unix_nano=T0,
        end_time_unix_nano=T0 + 1,
        attributes=[kv("url.full", "http://127.0.0.1/v1/chat/completions")],
    )
    root = fetch_span(span_id=bytes.fromhex("2222222222222222"), receipt="rcpt_joined", parent=b"", joined=True)
    status, _ = collector.post("/v1/traces", export(plain, root), "application/x-protobuf")
    assert status == 200
    [row] = collector.rows()
    assert row["receipt_id"] == "rcpt_joined" and row["energy_j"] == 123.5
    assert row["workload"] == "node-shop"  # no joule.workload, no functionId: the service


def test_a_parent_that_never_comes_still_gives_the_row_at_shutdown(tmp_path):
    collector = start_collect(tmp_path / "c.duckdb")
    collector.post("/v1/traces", export(fetch_span(receipt="rcpt_orphan")), "application/x-protobuf")
    stop(collector)
    [row] = collector.rows()
    assert row["receipt_id"] == "rcpt_orphan" and row["input_tokens"] is None


def otlp_json(span_id: str, trace_id: str = TRACE.hex()) -> bytes:
    return json.dumps(
        {
            "resourceSpans": [
                {
                    "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "js"}}]},
                    "scopeSpans": [
                        {
                            "spans": [
                                {
                                    "traceId": trace_id,
                                    "spanId": span_id,
                                    "name": "POST",
                                    "kind": 3,
                                    "startTimeUnixNano": str(T0),
                                    "endTimeUnixNano": str(T0 + 5_000_000),
                                    "attributes": [
                                        {"key": "url.full", "value": {"stringValue": "http://h/v1/embeddings"}},
                                        {"key": "http.response.status_code", "value": {"intValue": "200"}},
                                        {
                                            "key": "http.response.header.x-energy-joules",
                                            "value": {"arrayValue": {"values": [{"stringValue": "0.75"}]}},
                                        },
                                        {
                                            "key": "http.response.header.x-receipt-id",
                                            "value": {"arrayValue": {"values": [{"stringValue": "rcpt_" + span_id}]}},
                                        },
                                    ],
                                }
                            ]
                        }
                    ],
                }
            ]
        }
    ).encode()


def test_otlp_json_with_hex_ids_and_a_record_with_base64_ids_is_refused_alone(collector):
    good = json.loads(otlp_json("a1b2c3d4e5f60718"))
    bad = json.loads(otlp_json("AAECAwQFBgc=", trace_id="CvdlGRbNQ92ESOshHIAxnA=="))  # protobuf's JSON mapping
    good["resourceSpans"][0]["scopeSpans"][0]["spans"] += bad["resourceSpans"][0]["scopeSpans"][0]["spans"]
    status, body = collector.post("/v1/traces", json.dumps(good).encode(), "application/json")
    assert status == 200
    answer = json.loads(body)
    assert answer["partialSuccess"]["rejectedSpans"] == 1
    assert "hex" in answer["partialSuccess"]["errorMessage"]
    [row] = collector.rows()
    assert row["receipt_id"] == "rcpt_a1b2c3d4e5f60718" and row["operation"] == "embeddings"
    assert row["energy_j"] == 0.75 and row["service"] == "js"


def test_a_resource_with_unreadable_attributes_keeps_its_good_spans(collector):
    """A resource's attributes are shared by every span below: a bad one is skipped and said, never a 500 that
    loses the export's good spans; shapes no OTLP sender makes are skipped the same way."""
    export_json = json.loads(otlp_json("a1b2c3d4e5f60718"))
    export_json["resourceSpans"][0]["resource"]["attributes"] += [
        {"key": "bad.int", "value": {"intValue": "twelve"}},
        {"key": "bad.kvlist", "value": {"kvlistValue": {"values": [{"value": {"stringValue": "no key"}}]}}},
        {"key": "bad.array", "value": {"arrayValue": 7}},
    ]
    odd = [{"resource": "not an object", "scopeSpans": "not a list"}, 42, {"scopeSpans": [{"spans": {"a": 1}}]}]
    export_json["resourceSpans"] += odd
    status, body = collector.post("/v1/traces", json.dumps(export_json).encode(), "application/json")
    assert status == 200, body
    assert "bad.int" in json.loads(body)["partialSuccess"]["errorMessage"]
    [row] = collector.rows()
    assert row["receipt_id"] == "rcpt_a1b2c3d4e5f60718" and row["service"] == "js"


def test_bad_payloads_get_the_documented_answers(collector):
    truncated = export(fetch_span())[:-7]
    assert collector.post("/v1/traces", truncated, "application/x-protobuf")[0] == 400
    assert collector.post("/v1/traces", b"{not json", "application/json")[0] == 400
    assert collector.post("/v1/traces", b"x", "text/plain")[0] == 415
    bomb = gzip.compress(b"\0" * (64 << 20))  # 64 MiB of zeros in ~64 KB
    status, body = collector.post("/v1/traces", bomb, "application/x-protobuf", **{"Content-Encoding": "gzip"})
    assert status == 413 and b"decompressed" in body
    assert collector.proc.poll() is None  # alive
    assert collector.health()["bad_payloads"] == 4
    with pytest.raises(FileNotFoundError, match="nothing has been recorded"):
        collector.rows()  # not a row, not even an empty file


def test_a_token_is_required_when_set_and_off_loopback(tmp_path):
    guarded = start_collect(tmp_path / "t.duckdb", JOULE_OTEL_COLLECT_TOKEN="s3cret")
    try:
        assert guarded.post("/v1/traces", export(fetch_span()), "application/x-protobuf")[0] == 401
        for wrong in ("Bearer s3cre", "Bearer s3cret2", "Basic s3cret", "s3cret", "Bearer"):
            assert guarded.post("/v1/traces", b"", "application/x-protobuf", Authorization=wrong)[0] == 401, wrong
        for scheme in ("Bearer", "bearer", "BEARER"):  # auth schemes are case-insensitive (RFC 9110)
            status, _ = guarded.post(
                "/v1/traces", export(fetch_span()), "application/x-protobuf", Authorization=f"{scheme} s3cret"
            )
            assert status == 200, scheme
        # a stranger learns that it is alive, never where the ledger is
        with urllib.request.urlopen(guarded.url + "/healthz", timeout=10) as response:
            assert json.loads(response.read()) == {"status": "ok"}
        request = urllib.request.Request(guarded.url + "/healthz", headers={"Authorization": "Bearer s3cret"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert json.loads(response.read())["ledger"] == str(tmp_path / "t.duckdb")
    finally:
        stop(guarded)
    open_to_all = subprocess.run(
        [sys.executable, "-m", "joule_otel._cli", "collect", "--host", "0.0.0.0", "--db", str(tmp_path / "x.duckdb")],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k != "JOULE_OTEL_COLLECT_TOKEN"},
    )
    assert open_to_all.returncode == 2
    assert "JOULE_OTEL_COLLECT_TOKEN" in open_to_all.stderr


# -- Python apps in containers: call events ---------------------------------------------------------------------


APP = textwrap.dedent("""
    import asyncio, sys
    import openai
    import joule_otel

    joule_otel.instrument()
    client = openai.OpenAI(base_url=sys.argv[1], api_key="jc_events", max_retries=0)
    with joule_otel.workload("fleet"):
        client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}])
        for _ in client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "s"}],
                                                stream=True, stream_options={"include_usage": True}):
            pass
        client.embeddings.create(model="auto", input="x")
    async def main():
        aclient = openai.AsyncOpenAI(base_url=sys.argv[1], api_key="jc_events", max_retries=0)
        await aclient.chat.completions.create(model="auto", messages=[{"role": "user", "content": "a"}])
        await aclient.close()
    asyncio.run(main())
    import httpx
    assert httpx.post(sys.argv[1] + "/chat/completions", json={"model": "auto", "messages": []}).status_code == 401
""")


def run_app(tmp_path: Path, base_url: str, collector: Collector, **env: str) -> None:
    script = tmp_path / "app.py"
    script.write_text(APP)
    result = subprocess.run(
        [sys.executable, str(script), base_url],
        capture_output=True,
        text=True,
        timeout=120,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")},
            "JOULE_OTEL_CALL_EVENTS": "true",
            "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url,
            "OTEL_METRICS_EXPORTER": "none",
            "OTEL_TRACES_EXPORTER": "none",
            "OTEL_SERVICE_NAME": "py-fleet",
            **env,
        },
    )
    assert result.returncode == 0, result.stderr


COMPARED = (
    "receipt_id",
    "started_at",
    "duration_ms",
    "ttft_ms",
    "service",
    "workload",
    "operation",
    "server_address",
    "status_code",
    "error_type",
    "requested_model",
    "routed_to",
    "tier",
    "region",
    "energy_j",
    "carbon_mg",
    "input_tokens",
    "output_tokens",
    "stream",
    "trace_id",
    "span_id",
    "provider",
)


def test_python_apps_without_a_local_ledger_reach_collect_through_call_events(tmp_path, collector):
    from joule_otel.simulator import running

    with running(require_auth=True) as sim:
        run_app(tmp_path, sim.base_url, collector, JOULE_OTEL_DB="off")
        run_app(tmp_path, sim.base_url, collector, JOULE_OTEL_DB="off")  # a second host
        issued = {r.receipt_id: r for r in sim.receipts}
    assert len(issued) == 8
    rows = collector.rows()
    billed = {r["receipt_id"]: r for r in rows if r["receipt_id"]}
    assert set(billed) == set(issued)
    for receipt_id, receipt in issued.items():
        assert billed[receipt_id]["energy_j"] == receipt.energy_j
        assert billed[receipt_id]["input_tokens"] == receipt.input_tokens
        assert billed[receipt_id]["operation"] == receipt.operation
    refused = [r for r in rows if r["receipt_id"] is None]
    assert [(r["status_code"], r["service"], r["workload"]) for r in refused] == [(401, "py-fleet", "py-fleet")] * 2
    workloads = sorted(r["workload"] for r in billed.values())
    assert workloads == ["fleet"] * 6 + ["py-fleet"] * 2  # the async call was made outside the workload block
    assert not Path(tmp_path / "joule.duckdb").exists()


def test_with_both_ledgers_they_hold_the_same_rows(tmp_path, collector):
    from joule_otel.simulator import running

    local = tmp_path / "local.duckdb"
    with running(require_auth=True) as sim:
        run_app(tmp_path, sim.base_url, collector, JOULE_OTEL_DB=str(local))
    mine = joule_otel.read_ledger(local)
    theirs = joule_otel.read_ledger(collector.db)
    assert len(mine) == len(theirs) == 5

    def key(frame):
        records = frame[list(COMPARED)].astype(object).where(frame[list(COMPARED)].notna(), None)
        return sorted((tuple(r) for r in records.itertuples(index=False)), key=lambda r: (str(r[0]), str(r[1])))

    assert key(mine) == key(theirs)


def test_collect_answers_protobuf_logs_with_protobuf(collector):
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

    status, body = collector.post("/v1/logs", ExportLogsServiceRequest().SerializeToString(), "application/x-protobuf")
    assert status == 200
    ExportLogsServiceResponse.FromString(body)


# -- real Node programs: the openai npm package and the Vercel AI SDK ----------------------------------------------

NODE_DIR = Path(__file__).parent / "node"


@pytest.fixture(scope="module")
def node_clients() -> Path:
    """The npm packages of tests/node, installed from its lock file (``npm ci``) when missing."""
    return node_clients_path()


def node_clients_path() -> Path:
    """tests/node/clients.mjs, its packages installed (``npm ci``) when missing; skips (fails in CI) without Node."""
    import shutil

    if shutil.which("node") is None or shutil.which("npm") is None:
        if os.environ.get("CI"):
            pytest.fail("Node.js and npm are needed for the Node client tests")
        pytest.skip("Node.js and npm are not installed")
    if not (NODE_DIR / "node_modules" / ".package-lock.json").exists():
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True, capture_output=True, timeout=600
        )
    return NODE_DIR / "clients.mjs"


def run_node(script: Path, base_url: str, mode: str, collector: Collector) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")},
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url,
        "OTEL_SERVICE_NAME": f"node-{mode}",
    }
    result = subprocess.run(["node", str(script), base_url, mode], env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]


def test_the_openai_npm_package_traced_with_undici_lands_once_per_receipt(node_clients, collector):
    from joule_otel.simulator import running

    with running() as sim:
        run_node(node_clients, sim.base_url, "openai", collector)
        issued = {r.receipt_id: r for r in sim.receipts}
    stop(collector)  # calls without a GenAI parent are written when their parent span is known not to come
    rows = {r["receipt_id"]: r for r in collector.rows()}
    assert set(rows) == set(issued) and len(issued) == 3
    for receipt_id, receipt in issued.items():
        row = rows[receipt_id]
        assert (row["energy_j"], row["carbon_mg"]) == (receipt.energy_j, receipt.carbon_mg)
        assert (row["routed_to"], row["tier"], row["region"]) == (receipt.routed_to, receipt.tier, receipt.region)
        assert (row["service"], row["provider"], row["status_code"]) == ("node-openai", "joule_cloud", 200)
        assert row["operation"] == receipt.operation
        assert row["stream"] is receipt.stream
    assert {r["region"] for r in rows.values() if r["operation"] == "embeddings"} == {"eu-se"}  # pinned


def test_the_vercel_ai_sdk_generate_and_stream_land_with_their_tokens(node_clients, collector):
    from joule_otel.simulator import running

    with running() as sim:
        run_node(node_clients, sim.base_url, "ai-sdk", collector)
        issued = {r.receipt_id: r for r in sim.receipts}
    stop(collector)
    rows = {r["receipt_id"]: r for r in collector.rows()}
    assert set(rows) == set(issued) and len(issued) == 3
    for receipt_id, receipt in issued.items():
        row = rows[receipt_id]
        assert row["energy_j"] == receipt.energy_j
        assert (row["input_tokens"], row["output_tokens"]) == (receipt.input_tokens, receipt.output_tokens)
        assert row["requested_model"] == "auto" and row["stream"] is receipt.stream
    by_operation = sorted((r["operation"], r["workload"]) for r in rows.values())
    assert by_operation == [("chat", "summaries"), ("responses", "support-bot"), ("responses", "support-bot")]


def test_calls_from_other_languages_get_metrics_under_their_service_and_call_events_never_twice(tmp_path):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

    received: list[ExportMetricsServiceRequest] = []

    class Receiver(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.path == "/v1/metrics":
                received.append(ExportMetricsServiceRequest.FromString(body))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

    backend = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    try:
        collector = start_collect(
            tmp_path / "m.duckdb",
            OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{backend.server_address[1]}",
            OTEL_TRACES_EXPORTER="none",
        )
        collector.post("/v1/traces", export(fetch_span(parent=b""), service="node-shop"), "application/x-protobuf")
        from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
        from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, ResourceLogs, ScopeLogs

        from joule_otel._events import EVENT_NAME

        event = LogRecord(
            time_unix_nano=T0,
            event_name=EVENT_NAME,
            attributes=[
                kv("joule.receipt_id", "rcpt_py"),
                kv("joule.energy", 50.0),
                kv("joule.operation", "chat"),
                kv("gen_ai.provider.name", "joule_cloud"),
            ],
        )
        logs = ExportLogsServiceRequest(
            resource_logs=[
                ResourceLogs(
                    resource=Resource(attributes=[kv("service.name", "py-app")]),
                    scope_logs=[ScopeLogs(log_records=[event])],
                )
            ]
        )
        assert collector.post("/v1/logs", logs.SerializeToString(), "application/x-protobuf")[0] == 200
        stop(collector)
    finally:
        backend.shutdown()
    assert sorted(r["receipt_id"] for r in collector.rows()) == ["rcpt_node_1", "rcpt_py"]
    energy: dict[str, float] = {}
    for request in received:
        for rm in request.resource_metrics:
            service = next(a.value.string_value for a in rm.resource.attributes if a.key == "service.name")
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    if metric.name == "joule.client.energy":
                        energy[service] = max(p.as_double for p in metric.sum.data_points)
    assert energy == {"node-shop": 123.5}  # the Python app's call recorded its own metrics: never here


@GRPC_KEEPS_THE_REAL_CLOCK
def test_otlp_grpc_carries_spans_and_call_events_with_the_token(tmp_path):
    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

    guarded = start_collect(tmp_path / "g.duckdb", JOULE_OTEL_COLLECT_TOKEN="s3cret")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{guarded.grpc_port}") as channel:
            stub = trace_service_pb2_grpc.TraceServiceStub(channel)
            request = ExportTraceServiceRequest.FromString(export(fetch_span(parent=b"", receipt="rcpt_grpc")))
            with pytest.raises(grpc.RpcError) as refused:
                stub.Export(request, timeout=30)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # the token is checked before the message is read: bytes no protobuf decoder accepts are refused for
            # the token, not for their content
            raw = channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export")
            with pytest.raises(grpc.RpcError) as refused:
                raw(b"\xff" * 4096, timeout=30)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            answer = stub.Export(request, metadata=[("authorization", "bearer s3cret")], timeout=30)
            assert answer.partial_success.rejected_spans == 0
    finally:
        stop(guarded)
    [row] = guarded.rows()
    assert row["receipt_id"] == "rcpt_grpc" and row["energy_j"] == 123.5


@GRPC_KEEPS_THE_REAL_CLOCK
def test_python_call_events_over_otlp_grpc(tmp_path, collector):
    from joule_otel.simulator import running

    with running(require_auth=True) as sim:
        run_app(
            tmp_path,
            sim.base_url,
            collector,
            JOULE_OTEL_DB="off",
            OTEL_EXPORTER_OTLP_PROTOCOL="grpc",
            OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{collector.grpc_port}",
        )
        issued = {r.receipt_id for r in sim.receipts}
    assert {r["receipt_id"] for r in collector.rows() if r["receipt_id"]} == issued


def test_a_dead_decoding_worker_costs_no_request(tmp_path):
    """Trace exports are decoded in worker processes; if one dies, the request is decoded in-process instead."""
    from concurrent.futures.process import BrokenProcessPool

    from starlette.testclient import TestClient

    from joule_otel.collect._server import RowSink, create_app, decoding_workers
    from joule_otel.ledger._writer import LedgerWriter

    class NoMetrics:  # this test is about decoding: no metrics recorded
        def for_service(self, service):
            return None

        def add_counter_sums(self):
            pass

    pool = decoding_workers()
    assert pool is not None, "the machine has one core"
    with pytest.raises(BrokenProcessPool):
        pool.submit(os._exit, 1).result(timeout=60)  # a worker dies (killed, out of memory…)
    sink = RowSink(LedgerWriter(tmp_path / "w.duckdb"), NoMetrics(), 0.2)
    try:
        with TestClient(create_app(sink, token=None, decoders=pool)) as client:
            response = client.post(
                "/v1/traces",
                content=export(fetch_span(parent=b"", receipt="rcpt_after_crash")),
                headers={"Content-Type": "application/x-protobuf"},
            )
            assert response.status_code == 200
    finally:
        sink.close()
        pool.shutdown()
    assert [r["receipt_id"] for r in Collector("", tmp_path / "w.duckdb", None, 0).rows()] == ["rcpt_after_crash"]


@GRPC_KEEPS_THE_REAL_CLOCK
def test_a_grpc_port_another_receiver_holds_is_an_error_at_start(tmp_path):
    """gRPC servers share a port by default (SO_REUSEPORT): a second collect must refuse it, not split senders."""
    import grpc

    holder = grpc.server(ThreadPoolExecutor(max_workers=1))  # a stock gRPC server: SO_REUSEPORT on
    port = holder.add_insecure_port("127.0.0.1:0")
    holder.start()
    try:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "joule_otel._cli",
                "collect",
                "--port",
                str(free_port()),
                "--grpc-port",
                str(port),
                "--db",
                str(tmp_path / "second.duckdb"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        holder.stop(grace=None)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "--grpc-port" in result.stderr and str(port) in result.stderr
    assert not (tmp_path / "second.duckdb").exists()


def test_values_no_call_could_have_never_land_and_refused_records_are_counted(collector):
    """Durations of inf, 1e308 ms or 292 years are missing; start times in 1970 or 2554 refuse their record (the
    sender is told in the partial-success answer); a resource's service.name is cleaned like every label, and one
    that is not text never drops its rows."""
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
        ExportLogsServiceRequest,
        ExportLogsServiceResponse,
    )
    from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, ResourceLogs, ScopeLogs

    from joule_otel._events import EVENT_NAME

    def event(receipt: str, time_ns: int = T0, **extra) -> LogRecord:
        attributes = [kv("joule.receipt_id", receipt), kv("joule.energy", 5.0), kv("joule.operation", "chat")]
        return LogRecord(
            time_unix_nano=time_ns,
            event_name=EVENT_NAME,
            attributes=attributes + [kv(k.replace("__", "."), v) for k, v in extra.items()],
        )

    def resource(service, *records: LogRecord) -> ResourceLogs:
        return ResourceLogs(
            resource=Resource(attributes=[kv("service.name", service)]),
            scope_logs=[ScopeLogs(log_records=list(records))],
        )

    year_2554 = 18_446_744_073_709_551_615 // 1000 * 1000  # the largest uint64 in ns: the year 2554
    logs = ExportLogsServiceRequest(
        resource_logs=[
            resource(
                "py\x00-app\x1b" + "x" * (1 << 20),
                event("rcpt_inf", joule__duration_ms=float("inf")),
                event("rcpt_huge", joule__duration_ms=1e308, joule__ttft_ms=float("inf")),
                event("rcpt_1970", time_ns=1_000),
                event("rcpt_2554", time_ns=year_2554),
            ),
            resource(42, event("rcpt_int_service")),
        ]
    )
    status, body = collector.post("/v1/logs", logs.SerializeToString(), "application/x-protobuf")
    assert status == 200
    answer = ExportLogsServiceResponse.FromString(body).partial_success
    assert answer.rejected_log_records == 2 and "started_at" in answer.error_message
    spans = export(
        fetch_span(span_id=bytes.fromhex("1111111111111111"), parent=b"", receipt="rcpt_292y"),
        fetch_span(span_id=bytes.fromhex("2222222222222222"), parent=b"", receipt="rcpt_span_1970"),
    )
    request = ExportTraceServiceRequest.FromString(spans)
    long_span, old_span = request.resource_spans[0].scope_spans[0].spans
    long_span.end_time_unix_nano = long_span.start_time_unix_nano + 292 * 365 * 86_400 * 10**9
    old_span.start_time_unix_nano, old_span.end_time_unix_nano = 5, 10
    status, body = collector.post("/v1/traces", request.SerializeToString(), "application/x-protobuf")
    assert status == 200 and ExportTraceServiceResponse.FromString(body).partial_success.rejected_spans == 1
    rows = {r["receipt_id"]: r for r in collector.rows()}
    assert set(rows) == {"rcpt_inf", "rcpt_huge", "rcpt_int_service", "rcpt_292y"}
    assert rows["rcpt_huge"]["duration_ms"] is None and rows["rcpt_huge"]["ttft_ms"] is None
    assert rows["rcpt_292y"]["duration_ms"] is None
    assert rows["rcpt_inf"]["service"].startswith("py-app") and len(rows["rcpt_inf"]["service"]) == 256
    assert rows["rcpt_int_service"]["service"] is None and rows["rcpt_int_service"]["energy_j"] == 5.0
    assert collector.health()["rejected_items"] == 3


FORK_APP = textwrap.dedent("""
    import multiprocessing, sys
    import openai
    import joule_otel
    from joule_otel import _exporters

    def held():
        return sum(len(a.poolmanager.pools) for s in _exporters._SESSIONS for a in s.adapters.values())

    AT_FORK = None

    def started():  # a Pool worker's first moment, before any task
        global AT_FORK
        AT_FORK = held()

    def ask(n):
        client = openai.OpenAI(base_url=sys.argv[1], api_key="jc_fork", max_retries=0)
        for _ in range(n):
            client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}])
        return AT_FORK, joule_otel.flush(timeout_s=20)

    if __name__ == "__main__":
        joule_otel.instrument()
        ask(4)
        assert joule_otel.flush(timeout_s=20)  # the parent's exporter now holds a keep-alive connection
        assert held() >= 1, "the parent exported over a kept-alive connection"
        with multiprocessing.get_context("fork").Pool(3, initializer=started) as pool:
            results = pool.map(ask, [6] * 6)
        ask(4)
        print([r[0] for r in results], all(r[1] for r in results), joule_otel.flush(timeout_s=20))
""")


def test_forked_children_export_call_events_on_connections_of_their_own(tmp_path, collector):
    """A fork Pool's children inherit the parent's exporter with its keep-alive connection: each child must start
    afresh, or parent and child write on one socket and a batch of call events is lost."""
    from joule_otel.simulator import running

    script = tmp_path / "fork_app.py"
    script.write_text(FORK_APP)
    with running(require_auth=True) as sim:
        result = subprocess.run(
            [sys.executable, str(script), sim.base_url],
            capture_output=True,
            text=True,
            timeout=180,
            env={
                **{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")},
                "JOULE_OTEL_CALL_EVENTS": "true",
                "JOULE_OTEL_DB": "off",
                "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url,
                "OTEL_METRICS_EXPORTER": "none",
                "OTEL_TRACES_EXPORTER": "none",
            },
        )
        issued = {r.receipt_id for r in sim.receipts}
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[0, 0, 0, 0, 0, 0] True True", "children start with no inherited connection"
    assert len(issued) == 4 + 36 + 4
    assert {r["receipt_id"] for r in collector.rows()} == issued
    assert collector.health()["bad_payloads"] == 0


def test_a_retry_after_the_disk_refused_is_written_not_taken_for_a_duplicate(tmp_path, monkeypatch):
    """A 503 (the disk refused the segment) is followed by the sender's retry: its rows are not duplicates of rows
    that never reached disk, so the retry is answered as the disk allows, and the ledger holds the call once."""
    from joule_otel._events import row_from_event
    from joule_otel.collect._server import RowSink
    from joule_otel.ledger._writer import LedgerWriter

    class NoMetrics:
        def for_service(self, name):
            return None

        def add_counter_sums(self):
            pass

    db = tmp_path / "central.duckdb"
    writer = LedgerWriter(db)
    refusing = [True]
    write_segment = writer.write_segment
    monkeypatch.setattr(writer, "write_segment", lambda: False if refusing[0] else write_segment())
    sink = RowSink(writer, NoMetrics(), flush_interval_s=0.1)
    event = {"joule.receipt_id": "rcpt_retry", "joule.energy": 5.0, "joule.operation": "chat"}
    row = row_from_event(event, time_ns=time.time_ns(), trace_id="", span_id="", service="py")
    try:
        assert sink.rows([row]).result(timeout=30) is False  # 503
        assert sink.rows([row]).result(timeout=30) is False, "the retry is refused while the disk refuses"
        refusing[0] = False
        assert sink.rows([row]).result(timeout=30) is True  # 200 once it is on disk
    finally:
        sink.close()
    assert list(joule_otel.read_ledger(db)["receipt_id"]) == ["rcpt_retry"]


def test_a_call_waiting_for_its_parent_is_on_disk_before_its_request_is_answered(tmp_path):
    """Answered means on disk for every row of a request: a call waiting for its GenAI parent is in the receiver's
    journal before the 200; a receiver killed meanwhile loses nothing, the next one writes the call (without the
    parent's facts, as expiry would); a parent that comes in time empties the journal."""
    db = tmp_path / "central.duckdb"
    spool = db.with_name(db.name + ".spool")
    first = start_collect(db)
    try:
        status, _ = first.post("/v1/traces", export(fetch_span()), "application/x-protobuf")
        assert status == 200 and first.health()["waiting_for_parent_span"] == 1
        assert len(list(spool.glob("collect-waiting-*.journal"))) == 1
    finally:  # kill -9 inside the parent's 15 s window, the receiver and its decoding workers, as a container dies
        import psutil

        for process in [*psutil.Process(first.proc.pid).children(recursive=True), first.proc]:
            with contextlib.suppress(psutil.NoSuchProcess):  # a worker that ended between the listing and the kill
                process.kill()
        first.proc.communicate(timeout=30)
    second = start_collect(db)
    try:
        [row] = second.rows()
        assert row["receipt_id"] == "rcpt_node_1" and row["energy_j"] == 123.5 and row["input_tokens"] is None
        assert not list(spool.glob(f"collect-waiting-{first.proc.pid}-*")), "the dead receiver's journal is gone"
        # a call whose parent comes in time: out of the journal once its completed row is written
        status, _ = second.post(
            "/v1/traces",
            export(fetch_span(receipt="rcpt_node_2", span_id=bytes.fromhex("3333333333333333"))),
            "application/x-protobuf",
        )
        assert status == 200 and len(list(spool.glob("collect-waiting-*.journal"))) == 1
        assert second.post("/v1/traces", export(generate_span()), "application/x-protobuf")[0] == 200
        assert not list(spool.glob("collect-waiting-*.journal"))
    finally:
        stop(second)
    rows = {r["receipt_id"]: r for r in second.rows()}
    assert set(rows) == {"rcpt_node_1", "rcpt_node_2"} and rows["rcpt_node_2"]["input_tokens"] == 12


def deep_export() -> bytes:
    """A trace export with a span nested past protobuf's depth limit (built as bytes: the Python runtime cannot even
    make that message) and a good one beside it."""

    def varint(value: int) -> bytes:
        out = b""
        while value >= 0x80:
            out, value = out + bytes([value & 0x7F | 0x80]), value >> 7
        return out + bytes([value])

    def field(number: int, payload: bytes) -> bytes:  # a length-delimited field, as the wire carries it
        return varint(number << 3 | 2) + varint(len(payload)) + payload

    deep = field(1, b"leaf")  # AnyValue.string_value; the Python runtime cannot even build the message below
    for _ in range(40):  # AnyValue.kvlist_value → KeyValueList.values → KeyValue{key, value}
        deep = field(6, field(1, field(1, b"k") + field(2, deep)))
    nested = fetch_span(span_id=bytes.fromhex("4444444444444444"), parent=b"", receipt="rcpt_deep").SerializeToString()
    nested += field(9, field(1, b"app.payload") + field(2, deep))  # Span.attributes
    good = fetch_span(span_id=bytes.fromhex("5555555555555555"), parent=b"", receipt="rcpt_fine").SerializeToString()
    resource = Resource(attributes=[kv("service.name", "node-shop")]).SerializeToString()
    return field(1, field(1, resource) + field(2, field(2, nested) + field(2, good)))


def test_a_span_nested_too_deep_for_protobuf_is_skipped_alone(collector):
    """The protobuf runtime refuses a message nested past 100 levels: one attribute ~33 levels deep used to lose the
    whole export. Each span is then decoded on its own: the deep one is counted, the others land."""

    body = deep_export()
    status, answered = collector.post("/v1/traces", body, "application/x-protobuf")
    assert status == 200, answered
    answer = ExportTraceServiceResponse.FromString(answered).partial_success
    assert answer.rejected_spans == 1 and "skipped" in answer.error_message
    [row] = collector.rows()
    assert row["receipt_id"] == "rcpt_fine" and row["service"] == "node-shop"


@GRPC_KEEPS_THE_REAL_CLOCK
def test_over_grpc_too_a_span_nested_too_deep_is_skipped_alone(collector):
    import grpc
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse as Answer

    with grpc.insecure_channel(f"127.0.0.1:{collector.grpc_port}") as channel:
        export_raw = channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export")
        answer = Answer.FromString(export_raw(deep_export(), timeout=30))
        with pytest.raises(grpc.RpcError) as refused:
            export_raw(b"\xff" * 64, timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert answer.partial_success.rejected_spans == 1
    assert [r["receipt_id"] for r in collector.rows()] == ["rcpt_fine"]


# -- one call, three ways in: the same row ---------------------------------------------------------------------


def test_the_same_call_is_the_same_row_whichever_way_it_arrives(tmp_path, collector):
    """A call captured in this process, the same call as another language's HTTP client span with its GenAI parent,
    and the same call as a call event: one builder makes one row of them (the workload a call without one takes, the
    status, the error named by a 402, the stream, the bounds on durations)."""
    import httpx

    from joule_otel._events import event_attributes, row_from_event
    from joule_otel.simulator import running

    seen: list[tuple[httpx.Request, httpx.Response, str | None, dict, dict]] = []
    db = tmp_path / "local.duckdb"
    joule_otel.instrument(db=db, flush_interval=0.2)
    try:
        with running(seed=5, energy_budgets={"jc_spent": 0.0}) as sim, httpx.Client() as client:
            url = f"{sim.base_url}/chat/completions"
            for key, workload, body in (
                ("jc_one", "support-bot", {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}),
                (
                    "jc_one",
                    None,
                    {
                        "model": "auto",
                        "stream": True,
                        "messages": [{"role": "user", "content": "go"}],
                        "stream_options": {"include_usage": True},
                    },
                ),
                (
                    "jc_spent",
                    "batch",
                    {"model": "llama-3.3-70b-instruct", "messages": [{"role": "user", "content": "x"}]},
                ),
            ):
                headers = {"Authorization": f"Bearer {key}", "X-Region": "eu-fi"}
                tagged = joule_otel.workload(workload) if workload else contextlib.nullcontext()
                tags = {"team": "search", "customer": "acme"} if workload == "support-bot" else {}
                with (
                    tagged,
                    joule_otel.tags(**tags),
                    client.stream("POST", url, json=body, headers=headers) as response,
                ):
                    response.read()
                seen.append((response.request, response, workload, body, tags))
        assert joule_otel.flush(timeout_s=20)
    finally:
        joule_otel.uninstrument()
    captured = [_as_row(r) for r in _ledger_rows(db)]
    assert [r.status_code for r in captured] == [200, 200, 402]
    assert captured[1].workload == captured[1].service and captured[1].stream is True
    assert captured[2].error_type == "insufficient_balance" and captured[2].receipt_id is None
    assert captured[0].tags == {"team": "search", "customer": "acme"} and captured[1].tags is None

    spans = []
    for index, ((request, response, workload, body, tags), row) in enumerate(zip(seen, captured, strict=True)):
        span_id, parent_id = bytes([index + 1]) * 8, bytes([index + 101]) * 8
        start_ns = row.started_at_us * 1000
        attributes = [kv(f"http.response.header.{name}", [value]) for name, value in response.headers.items()]
        attributes += [
            kv("url.full", str(request.url)),
            kv("server.address", request.url.host),
            kv("http.response.status_code", response.status_code),
            kv("http.request.header.x-region", ["eu-fi"]),
        ]
        if workload:
            attributes.append(kv("joule.workload", workload))
        attributes += [kv(f"joule.tag.{key}", value) for key, value in tags.items()]
        spans.append(
            PbSpan(
                trace_id=TRACE,
                span_id=span_id,
                parent_span_id=parent_id,
                name="POST",
                kind=PbSpan.SPAN_KIND_CLIENT,
                start_time_unix_nano=start_ns,
                end_time_unix_nano=start_ns + round(row.duration_ms * 1e6),
                attributes=attributes,
            )
        )
        parent = [kv("gen_ai.request.model", body["model"])]
        if row.input_tokens is not None:
            parent += [kv("ai.usage.inputTokens", row.input_tokens), kv("ai.usage.outputTokens", row.output_tokens)]
        if row.ttft_ms is not None:
            parent.append(kv("ai.response.msToFirstChunk", row.ttft_ms))
        spans.append(
            PbSpan(
                trace_id=TRACE,
                span_id=parent_id,
                name="ai.streamText.doStream" if body.get("stream") else "ai.generateText.doGenerate",
                kind=PbSpan.SPAN_KIND_INTERNAL,
                start_time_unix_nano=start_ns - 1000,
                end_time_unix_nano=start_ns + round(row.duration_ms * 1e6) + 1000,
                attributes=parent,
            )
        )
    status, _ = collector.post("/v1/traces", export(*spans, service=captured[0].service), "application/x-protobuf")
    assert status == 200
    stop(collector)
    received = sorted(collector.rows(), key=lambda r: r["started_at"])
    assert len(received) == 3
    for row, other in zip(captured, received, strict=True):
        span_row = _as_row(other)
        assert span_row.trace_id == TRACE.hex() and span_row.span_id is not None
        assert span_row.duration_ms == pytest.approx(row.duration_ms, abs=1e-6)
        alike = ("duration_ms", "trace_id", "span_id")
        assert span_row._replace(**{k: None for k in alike}) == row._replace(**{k: None for k in alike})
        event = row_from_event(
            event_attributes(row), time_ns=row.started_at_us * 1000, trace_id="", span_id="", service="elsewhere"
        )
        assert event == row


def _as_row(record: dict):
    from joule_otel.ledger import LedgerRow

    started = record["started_at"]
    if not isinstance(started, int):
        started = int(started.value // 1000)
    return LedgerRow(**{k: v for k, v in record.items() if k != "started_at"}, started_at_us=started)


def _ledger_rows(db: Path) -> list[dict]:
    frame = joule_otel.read_ledger(db).sort_values("started_at")
    return [{k: (None if v is None or v != v else v) for k, v in r.items()} for r in frame.to_dict("records")]
