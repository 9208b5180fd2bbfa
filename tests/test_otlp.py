"""OTLP/HTTP export: a real receiver on loopback decodes the protobuf the app sends."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import textwrap
import threading
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import duckdb
import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

APP = textwrap.dedent("""
    import sys
    import openai
    import joule_otel

    joule_otel.instrument()
    client = openai.OpenAI(base_url=sys.argv[1], api_key="jc_otlp", max_retries=0)
    for name in ("alpha", "alpha", "beta"):
        with joule_otel.workload(name):
            client.chat.completions.create(model="auto", messages=[{"role": "user", "content": name}])
    for _ in client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "s"}], stream=True,
                                            stream_options={"include_usage": True}):
        pass
""")


class Receiver(BaseHTTPRequestHandler):
    metrics: list[ExportMetricsServiceRequest] = []
    traces: list[ExportTraceServiceRequest] = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        if self.path == "/v1/metrics":
            message = ExportMetricsServiceRequest()
            message.ParseFromString(body)
            type(self).metrics.append(message)
        elif self.path == "/v1/traces":
            message = ExportTraceServiceRequest()
            message.ParseFromString(body)
            type(self).traces.append(message)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def receiver():
    Receiver.metrics, Receiver.traces = [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def attrs(kvs) -> dict[str, object]:
    out = {}
    for kv in kvs:
        value = kv.value
        out[kv.key] = getattr(value, value.WhichOneof("value")) if value.WhichOneof("value") else None
    return out


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_metrics_and_spans_arrive_as_the_ledger_holds_them(receiver, joule_simulator, tmp_path, compression):
    script = tmp_path / "app.py"
    script.write_text(APP)
    db = tmp_path / "otlp.duckdb"
    env = dict(
        os.environ,
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver,
        OTEL_SERVICE_NAME="otlp-app",
        JOULE_OTEL_DB=str(db),
        OTEL_EXPORTER_OTLP_COMPRESSION=compression,
        OTEL_METRIC_EXPORT_INTERVAL="60000",
    )
    result = subprocess.run(
        [sys.executable, str(script), joule_simulator.base_url], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    metrics = {}
    energy_by_workload: dict[str, float] = defaultdict(float)
    for request in Receiver.metrics:
        for rm in request.resource_metrics:
            assert attrs(rm.resource.attributes)["service.name"] == "otlp-app"
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    metrics[metric.name] = metric
                    if metric.name == "joule.client.energy":
                        for point in metric.sum.data_points:
                            energy_by_workload[attrs(point.attributes)["joule.workload"]] += point.as_double
    assert metrics["joule.client.energy"].unit == "J"
    assert metrics["joule.client.energy"].sum.is_monotonic
    assert metrics["joule.client.carbon"].unit == "mg"
    assert metrics["joule.client.request.energy"].unit == "J"
    assert metrics["gen_ai.client.operation.duration"].unit == "s"
    assert metrics["gen_ai.client.token.usage"].unit == "{token}"
    assert metrics["gen_ai.client.operation.time_to_first_chunk"].unit == "s"
    with duckdb.connect(str(db), read_only=True) as con:
        ledger = dict(con.execute("SELECT workload, sum(energy_j) FROM inference_calls GROUP BY 1").fetchall())
        receipts = {
            r[0]: r[1:]
            for r in con.execute("SELECT receipt_id, trace_id, span_id, energy_j FROM inference_calls").fetchall()
        }
    assert dict(energy_by_workload) == pytest.approx(ledger)
    spans = [
        span
        for request in Receiver.traces
        for rs in request.resource_spans
        for ss in rs.scope_spans
        for span in ss.spans
    ]
    joule_spans = {
        attrs(s.attributes).get("joule.receipt_id"): s for s in spans if "joule.receipt_id" in attrs(s.attributes)
    }
    assert set(joule_spans) == set(receipts) == {r.receipt_id for r in joule_simulator.receipts}
    for receipt_id, span in joule_spans.items():
        values = attrs(span.attributes)
        trace_id, span_id, energy = receipts[receipt_id]
        assert span.trace_id.hex() == trace_id and span.span_id.hex() == span_id
        assert values["joule.energy"] == energy
        assert values["gen_ai.provider.name"] == "joule_cloud"
        assert values["gen_ai.response.model"]
        assert "jc_otlp" not in str(values)
    # from a metric to its trace: the energy histogram's exemplars point at the very calls of the ledger
    by_span = {(trace_id, span_id): energy for trace_id, span_id, energy in receipts.values()}
    exemplars = [
        exemplar
        for point in metrics["joule.client.request.energy"].histogram.data_points
        for exemplar in point.exemplars
    ]
    assert exemplars
    for exemplar in exemplars:
        assert by_span[(exemplar.trace_id.hex(), exemplar.span_id.hex())] == exemplar.as_double
