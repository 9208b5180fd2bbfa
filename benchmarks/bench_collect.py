"""joule-otel collect: OTLP/HTTP protobuf in, ledger rows out."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import pct


def _span_batch(start: int, count: int) -> bytes:
    """An OTLP protobuf export of ``count`` Joule calls as Node's undici instrumentation sends them."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue
    from opentelemetry.proto.resource.v1.resource_pb2 import Resource
    from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

    def header(name: str, value: str) -> KeyValue:
        values = ArrayValue(values=[AnyValue(string_value=value)])
        return KeyValue(key=f"http.response.header.{name}", value=AnyValue(array_value=values))

    now = time.time_ns()
    spans = []
    for n in range(start, start + count):
        attributes = [
            KeyValue(key="url.full", value=AnyValue(string_value="http://api.greenjoules.cloud/v1/chat/completions")),
            KeyValue(key="http.response.status_code", value=AnyValue(int_value=200)),
            header("x-energy-joules", f"{100 + n % 300}.5"),
            header("x-carbon-mg", "4.25"),
            header("x-routed-to", "llama-3.3-70b-instruct"),
            header("x-tier", "standard"),
            header("x-region", "eu-fi"),
            header("x-receipt-id", f"rcpt_bench_{n:012d}"),
        ]
        spans.append(
            Span(
                trace_id=n.to_bytes(16, "big"),
                span_id=(n + 1).to_bytes(8, "big"),
                name="POST",
                kind=Span.SPAN_KIND_CLIENT,
                start_time_unix_nano=now + n * 1000,
                end_time_unix_nano=now + n * 1000 + 250_000_000,
                attributes=attributes,
            )
        )
    resource = Resource(attributes=[KeyValue(key="service.name", value=AnyValue(string_value="node-bench"))])
    request = ExportTraceServiceRequest(
        resource_spans=[ResourceSpans(resource=resource, scope_spans=[ScopeSpans(spans=spans)])]
    )
    return request.SerializeToString()


def collect_ingest(seconds: float) -> list[dict[str, object]]:
    """joule-otel collect: calls ingested per second (batches of 512, OTLP/HTTP protobuf) and latency at 1 000 calls/s."""
    import http.client
    import socket
    import threading

    from joule_otel.ledger import _reader as reader

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "collect.duckdb"
        proc = subprocess.Popen(
            [sys.executable, "-m", "joule_otel._cli", "collect", "--port", str(port), "--db", str(db)],
            stdout=subprocess.DEVNULL,
            env={**os.environ, "JOULE_OTEL_METRICS": "none"},
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    http.client.HTTPConnection("127.0.0.1", port, timeout=2).request("GET", "/healthz")
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)

            def post(conn: http.client.HTTPConnection, body: bytes) -> float:
                t0 = time.perf_counter()
                conn.request("POST", "/v1/traces", body, {"Content-Type": "application/x-protobuf"})
                response = conn.getresponse()
                response.read()
                assert response.status == 200, response.status
                return time.perf_counter() - t0

            # sustained: 4 senders, batches of 512, as fast as collect acknowledges (rows on disk in the spool)
            batches = [_span_batch(i * 512, 512) for i in range(int(seconds * 60))]
            sent = [0]
            lock = threading.Lock()
            stop_at = time.monotonic() + seconds

            def sender() -> None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                while time.monotonic() < stop_at:
                    with lock:
                        if sent[0] >= len(batches):
                            return
                        body = batches[sent[0]]
                        sent[0] += 1
                    post(conn, body)

            t0 = time.perf_counter()
            threads = [threading.Thread(target=sender) for _ in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            acked_s = time.perf_counter() - t0
            calls = sent[0] * 512
            rows.append(
                {
                    "measure": "ingest, batches of 512 (acknowledged = in the spool)",
                    "figure": f"{calls / acked_s:,.0f} calls/s",
                }
            )
            # steady: 1 000 calls/s as 20 requests of 50 a second, latency of each request
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            latencies = []
            base = calls
            start = time.perf_counter()
            for n in range(int(seconds * 20)):
                wait = start + n * 0.05 - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                latencies.append(post(conn, _span_batch(base + n * 50, 50)))
            calls += int(seconds * 20) * 50
            rows.append(
                {
                    "measure": "request latency at 1 000 calls/s, p50",
                    "figure": f"{statistics.median(latencies) * 1000:.1f} ms",
                }
            )
            rows.append(
                {"measure": "request latency at 1 000 calls/s, p99", "figure": f"{pct(latencies, 0.99) * 1000:.1f} ms"}
            )
        finally:
            t1 = time.perf_counter()
            proc.terminate()
            proc.wait(timeout=300)
            stop_s = time.perf_counter() - t1
        with reader.connect(db) as con:
            landed = con.execute("SELECT count(*), count(DISTINCT receipt_id) FROM compacted_calls").fetchone()
        rows.append(
            {
                "measure": "rows in the DuckDB file after stop (compacted) / calls sent",
                "figure": f"{landed[0]:,} / {calls:,}",
            }
        )
        rows.append({"measure": "stop: last segment + compaction of everything", "figure": f"{stop_s:.1f} s"})
    return rows
