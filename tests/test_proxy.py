"""`joule-otel proxy`: apps without OpenTelemetry — curl, the openai SDK uninstrumented, Node — through a real proxy
process to the real simulator, and the ledger compared with the simulator's receipts after each."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import openai
import pytest

import joule_otel
from joule_otel.proxy import key_hash
from joule_otel.simulator import running

HI = [{"role": "user", "content": "hi"}]
NODE_CLIENTS = Path(__file__).resolve().parent / "node"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Proxy:
    url: str
    db: Path
    proc: subprocess.Popen[str]

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0, err
        return err

    def rows(self) -> list[dict]:
        frame = joule_otel.read_ledger(self.db).sort_values("started_at")
        return [{k: (None if v is None or v != v else v) for k, v in r.items()} for r in frame.to_dict("records")]


def start_proxy(
    upstream: str, db: Path, *args: str, env: dict[str, str] | None = None, host: str = "127.0.0.1"
) -> Proxy:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "joule_otel._cli",
            "proxy",
            "--upstream",
            upstream,
            "--host",
            host,
            "--port",
            str(port),
            "--db",
            str(db),
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "JOULE_OTEL_FLUSH_INTERVAL": "0.2", **(env or {})},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=5) as response:
                assert json.loads(response.read())["status"] == "ok"
            return Proxy(url, db, proc)
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"proxy did not start: {proc.communicate(timeout=5)[1]}") from None
            time.sleep(0.1)


@pytest.fixture
def sim():
    with running(seed=21, energy_budgets={"jc_spent": 0.0}, token_delay_s=0.0) as found:
        yield found


@pytest.fixture
def proxy(sim, tmp_path):
    found = start_proxy(sim.base_url.removesuffix("/v1"), tmp_path / "proxy.duckdb")
    yield found
    if found.proc.poll() is None:
        found.stop()


def assert_ledger_is_the_bill(proxy: Proxy, sim, **expected) -> list[dict]:
    """Every receipt the simulator issued is one row with its figures; nothing else has a receipt."""
    proxy.stop()
    rows = proxy.rows()
    billed = {r["receipt_id"]: r for r in rows if r["receipt_id"]}
    assert set(billed) == {r.receipt_id for r in sim.receipts}
    for receipt in sim.receipts:
        row = billed[receipt.receipt_id]
        assert (row["energy_j"], row["carbon_mg"], row["routed_to"], row["tier"], row["region"]) == (
            receipt.energy_j,
            receipt.carbon_mg,
            receipt.routed_to,
            receipt.tier,
            receipt.region,
        )
        assert row["provider"] == "joule_cloud" and row["service"] == "joule-otel-proxy"
        for column, value in expected.items():
            assert row[column] == value, (column, row)
    return rows


SEED_CURL = [
    "curl",
    "-s",
    "-D",
    "-",
    "{base}/chat/completions",
    "-H",
    "Authorization: Bearer jc_test",
    "-H",
    "Content-Type: application/json",
    "-d",
    '{"model":"auto","messages":[{"role":"user","content":"Summarise this ticket"}]}',
]


def curl(base: str) -> tuple[dict[str, str], dict]:
    out = subprocess.run(
        [c.replace("{base}", base) for c in SEED_CURL], capture_output=True, text=True, check=True
    ).stdout
    head, _, body = out.replace("\r\n", "\n").partition("\n\n")
    lines = head.split("\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    headers["status"] = lines[0].split()[1]
    return headers, json.loads(body)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_the_seeds_curl_gets_the_same_answer_through_the_proxy(tmp_path):
    """Two simulators seeded alike: one called directly, one through the proxy; the answers are the same."""
    with running(seed=5) as direct, running(seed=5) as behind:
        through = start_proxy(behind.base_url.removesuffix("/v1"), tmp_path / "p.duckdb")
        try:
            want_headers, want = curl(direct.base_url)
            got_headers, got = curl(through.base_url)
        finally:
            through.stop()
        assert got == want
        for name in (
            "status",
            "content-type",
            "x-energy-joules",
            "x-carbon-mg",
            "x-routed-to",
            "x-tier",
            "x-region",
            "server",
            "content-length",
        ):
            assert got_headers[name] == want_headers[name], name
        assert "content-encoding" not in got_headers  # curl asked for no compression; none was added on its way
        assert got_headers["x-receipt-id"] == behind.receipts[0].receipt_id
        (row,) = through.rows()
        assert row["receipt_id"] == behind.receipts[0].receipt_id and row["workload"] == "proxy"


def test_the_openai_sdk_without_instrument_lands_once_per_receipt_with_streams_and_a_402(proxy, sim):
    client = openai.OpenAI(base_url=proxy.base_url, api_key="jc_app", max_retries=0)
    for _ in range(3):
        client.chat.completions.create(model="auto", messages=HI)
    chunks = list(
        client.chat.completions.create(model="auto", messages=HI, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[-1].usage is not None
    client.embeddings.create(model="auto", input="a sentence")
    spent = openai.OpenAI(base_url=proxy.base_url, api_key="jc_spent", max_retries=0)
    with pytest.raises(openai.APIStatusError) as refused:
        spent.chat.completions.create(model="auto", messages=HI)
    assert refused.value.status_code == 402
    rows = assert_ledger_is_the_bill(proxy, sim, workload="proxy")
    assert len(rows) == 6
    assert [r["error_type"] for r in rows if r["receipt_id"] is None] == ["insufficient_balance"]
    streamed = [r for r in rows if r["stream"]]
    assert len(streamed) == 1 and streamed[0]["ttft_ms"] is not None and streamed[0]["output_tokens"]
    assert all("jc_app" not in json.dumps(r, default=str) for r in rows)  # an API key is never written


@pytest.mark.skipif(not (NODE_CLIENTS / "node_modules" / "openai").exists(), reason="cd tests/node && npm ci")
def test_nodes_openai_package_without_opentelemetry(proxy, sim, tmp_path):
    script = tmp_path / "plain.mjs"
    script.write_text(
        f"""import OpenAI from "{NODE_CLIENTS / "node_modules" / "openai" / "index.mjs"}";
const client = new OpenAI({{ baseURL: process.argv[2], apiKey: "jc_node", maxRetries: 0 }});
await client.chat.completions.create({{ model: "auto", messages: [{{ role: "user", content: "hi" }}] }});
const stream = await client.chat.completions.create({{ model: "auto", stream: true,
  messages: [{{ role: "user", content: "go" }}] }});
for await (const _ of stream) {{}}
"""
    )
    done = subprocess.run(["node", str(script), proxy.base_url], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = assert_ledger_is_the_bill(proxy, sim)
    assert len(rows) == 2 and sorted(r["stream"] for r in rows) == [False, True]


def test_a_stream_reaches_the_client_as_it_is_made_not_when_it_ends(tmp_path):
    with running(seed=2, token_delay_s=0.01) as slow:
        through = start_proxy(slow.base_url.removesuffix("/v1"), tmp_path / "s.duckdb")
        try:
            body = {"model": "auto", "stream": True, "messages": [{"role": "user", "content": "a long story"}]}
            arrivals = []
            start = time.perf_counter()
            with httpx.stream(
                "POST",
                through.base_url + "/chat/completions",
                json=body,
                headers={"Authorization": "Bearer jc_s"},
                timeout=60,
            ) as response:
                for chunk in response.iter_raw():
                    if chunk:
                        arrivals.append(time.perf_counter() - start)
        finally:
            through.stop()
        total = arrivals[-1]
        # tokens come every 10 ms for a second or more: the first reaches the client long before the last is made
        assert total > 0.5 and arrivals[0] < total / 4, (arrivals[0], total)
        assert len(arrivals) > 20
        (row,) = through.rows()
        assert row["stream"] is True and row["energy_j"] == slow.receipts[0].energy_j


def test_a_client_that_goes_away_mid_stream_cancels_the_upstream_and_its_row_is_written(tmp_path):
    with running(seed=3, token_delay_s=0.02) as slow:
        through = start_proxy(slow.base_url.removesuffix("/v1"), tmp_path / "c.duckdb")
        try:
            body = {"model": "auto", "stream": True, "messages": [{"role": "user", "content": "tell me everything"}]}
            with httpx.stream(
                "POST",
                through.base_url + "/chat/completions",
                json=body,
                headers={"Authorization": "Bearer jc_c"},
                timeout=60,
            ) as response:
                for _ in zip(range(3), response.iter_raw(), strict=False):
                    pass  # three chunks, then hang up
            time.sleep(0.5)
            health = json.loads(urllib.request.urlopen(through.url + "/healthz", timeout=5).read())
            assert health["in_flight"] == 0  # the proxy let go of the upstream at once
        finally:
            through.stop()
        (row,) = through.rows()
        assert row["receipt_id"] == slow.receipts[0].receipt_id and row["stream"] is True


class Odd(BaseHTTPRequestHandler):
    """An upstream that answers with garbage Joule headers, or breaks a stream off, and records what it was sent."""

    seen: list[dict[str, str]] = []
    mode = "garbage"
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        type(self).seen.append({k.lower(): v for k, v in self.headers.items()})
        if type(self).mode == "garbage":
            body = json.dumps({"id": "x", "choices": [], "usage": {"prompt_tokens": "many", "completion_tokens": -3}})
            self.send_response(200)
            for name, value in (
                ("X-Energy-Joules", "abc"),
                ("X-Carbon-mg", "1e400"),
                ("X-Receipt-Id", "r\x01bad"),
                ("X-Routed-To", "m" * 400),
                ("X-Tier", "Standard"),
            ):
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("X-Energy-Joules", "12.5")
        self.send_header("X-Receipt-Id", "rcpt_cut")
        self.send_header("Content-Length", "100000")  # promises more than it sends
        self.end_headers()
        self.wfile.write(b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n')
        self.wfile.flush()
        self.close_connection = True


@pytest.fixture
def odd_upstream():
    Odd.seen, Odd.mode = [], "garbage"
    server = ThreadingHTTPServer(("127.0.0.1", 0), Odd)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_odd_upstream_headers_pass_through_and_are_missing_in_the_row(odd_upstream, tmp_path):
    through = start_proxy(odd_upstream, tmp_path / "o.duckdb")
    try:
        response = httpx.post(
            through.base_url + "/chat/completions",
            json={"model": "auto", "messages": HI},
            headers={
                "Authorization": "Bearer jc_odd",
                "X-Joule-Workload": "odd-job",
                "Connection": "keep-alive",
                "Keep-Alive": "timeout=5",
                "X-Joule-Proxy-Token": "nothing to see",
                "X-Custom": "kept",
            },
        )
    finally:
        through.stop()
    assert response.status_code == 200 and response.headers["x-energy-joules"] == "abc"  # unchanged for the client
    assert response.headers["x-carbon-mg"] == "1e400" and "x-receipt-id" not in response.headers  # unsendable: dropped
    (sent,) = Odd.seen
    assert sent["authorization"] == "Bearer jc_odd" and sent["x-custom"] == "kept"
    assert "x-joule-workload" not in sent and "x-joule-proxy-token" not in sent and "keep-alive" not in sent
    (row,) = through.rows()
    assert row["workload"] == "odd-job" and row["receipt_id"] is None  # a receipt that needs cleaning is refused
    assert row["energy_j"] is None and row["carbon_mg"] is None and row["tier"] == "standard"
    assert row["input_tokens"] is None and row["output_tokens"] is None


def test_an_upstream_that_breaks_a_stream_off_still_gives_its_row(odd_upstream, tmp_path):
    Odd.mode = "cut"
    through = start_proxy(odd_upstream, tmp_path / "cut.duckdb")
    try:

        def read_all() -> None:
            with httpx.stream(
                "POST",
                through.base_url + "/chat/completions",
                json={"model": "auto", "messages": HI},
                headers={"Authorization": "Bearer jc_cut"},
            ) as response:
                for _ in response.iter_raw():
                    pass

        with pytest.raises(httpx.HTTPError):  # the client's answer ends short, as the upstream's did
            read_all()
    finally:
        through.stop()
    (row,) = through.rows()
    assert row["receipt_id"] == "rcpt_cut" and row["energy_j"] == 12.5


def test_an_upstream_that_is_down_is_a_502_in_the_openai_envelope(tmp_path):
    through = start_proxy(f"http://127.0.0.1:{free_port()}", tmp_path / "down.duckdb")
    try:
        client = openai.OpenAI(base_url=through.base_url, api_key="jc_x", max_retries=0)
        with pytest.raises(openai.APIStatusError) as failed:
            client.chat.completions.create(model="auto", messages=HI)
        missing = httpx.get(through.url + "/admin")
    finally:
        through.stop()
    assert failed.value.status_code == 502 and "cannot be reached" in failed.value.message
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    # the attempt is a row, as capture records any call that failed to connect: no receipt, no energy
    (row,) = through.rows()
    assert row["receipt_id"] is None and row["energy_j"] is None and row["error_type"] == "ConnectError"


def test_workload_from_the_key_hash_then_the_flag_and_a_body_too_large(sim, tmp_path):
    workloads = tmp_path / "keys.json"
    workloads.write_text(json.dumps({key_hash("jc_team_a"): "team-a"}))
    hashed = subprocess.run(
        [sys.executable, "-m", "joule_otel._cli", "proxy", "--hash-key"],
        input="jc_team_a\n",
        capture_output=True,
        text=True,
        check=True,
    )
    assert hashed.stdout.strip() == key_hash("jc_team_a") and "jc_team_a" not in hashed.stdout
    through = start_proxy(
        sim.base_url.removesuffix("/v1"), tmp_path / "w.duckdb", "--workloads", str(workloads), "--workload", "scripts"
    )
    try:
        for key in ("jc_team_a", "jc_other"):
            openai.OpenAI(base_url=through.base_url, api_key=key, max_retries=0).chat.completions.create(
                model="auto", messages=HI
            )
        # a caller that propagates its workload as W3C baggage names it, before the key's
        openai.OpenAI(base_url=through.base_url, api_key="jc_team_a", max_retries=0).chat.completions.create(
            model="auto", messages=HI, extra_headers={"baggage": "joule.workload=from-baggage,other=x"}
        )
        huge = httpx.post(
            through.base_url + "/chat/completions",
            content=b"x" * (33 << 20),
            headers={"Authorization": "Bearer jc_other"},
            timeout=60,
        )
        assert huge.status_code == 413
    finally:
        err = through.stop()
    assert [r["workload"] for r in through.rows()] == ["team-a", "scripts", "from-baggage"]
    assert "jc_team_a" not in err and "jc_other" not in err
    assert "jc_team_a" not in workloads.read_text()


def test_off_loopback_needs_a_token_which_clients_send_and_the_upstream_never_sees(sim, tmp_path, odd_upstream):
    refused = subprocess.run(
        [
            sys.executable,
            "-m",
            "joule_otel._cli",
            "proxy",
            "--upstream",
            odd_upstream,
            "--host",
            "0.0.0.0",
            "--port",
            str(free_port()),
            "--db",
            str(tmp_path / "t.duckdb"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k != "JOULE_OTEL_PROXY_TOKEN"},
    )
    assert refused.returncode == 2 and "JOULE_OTEL_PROXY_TOKEN" in refused.stderr
    lend = subprocess.run(
        [
            sys.executable,
            "-m",
            "joule_otel._cli",
            "proxy",
            "--upstream",
            odd_upstream,
            "--api-key-env",
            "K",
            "--port",
            str(free_port()),
            "--db",
            str(tmp_path / "t.duckdb"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "K": "jc_lent"},
    )
    assert lend.returncode == 2 and "needs JOULE_OTEL_PROXY_TOKEN" in lend.stderr
    through = start_proxy(
        odd_upstream,
        tmp_path / "t.duckdb",
        "--api-key-env",
        "LENT_KEY",
        host="0.0.0.0",
        env={"JOULE_OTEL_PROXY_TOKEN": "s3cret", "LENT_KEY": "jc_lent"},
    )
    try:
        denied = httpx.post(through.base_url + "/chat/completions", json={"model": "auto", "messages": HI})
        wrong = httpx.post(
            through.base_url + "/chat/completions",
            json={"model": "auto", "messages": HI},
            headers={"X-Joule-Proxy-Token": "guess"},
        )
        allowed = httpx.post(
            through.base_url + "/chat/completions",
            json={"model": "auto", "messages": HI},
            headers={"X-Joule-Proxy-Token": "s3cret"},
        )
    finally:
        through.stop()
    assert denied.status_code == wrong.status_code == 401 and allowed.status_code == 200
    (sent,) = Odd.seen
    assert sent["authorization"] == "Bearer jc_lent" and "x-joule-proxy-token" not in sent


def test_a_path_climbing_out_of_v1_is_a_404_and_connection_and_tag_headers_stay_here(odd_upstream, tmp_path):
    through = start_proxy(odd_upstream, tmp_path / "c.duckdb")
    port = int(through.url.rsplit(":", 1)[1])
    try:
        statuses = []
        for path in (b"/v1/../admin", b"/v1/%2e%2e/admin", b"/v1/./models", b"/v1/chat/..%2f..%2fsecret"):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                statuses.append(int(sock.recv(100).split()[1]))
        answered = httpx.post(
            through.base_url + "/chat/completions",
            json={"model": "auto", "messages": HI},
            headers={
                "Connection": "keep-alive, X-Private",
                "X-Private": "this hop",
                "X-Public": "end to end",
                "X-Joule-Tag-Team": "search",
                "X-Joule-Tag-Customer": "acme",
                "X-Joule-Tag-Bad*Key": "dropped",
            },
        )
    finally:
        through.stop()
    assert statuses == [404, 404, 404, 404], "never forwarded to a path the upstream resolves outside /v1/"
    (sent,) = Odd.seen  # nothing of the climbing requests reached the upstream
    assert answered.status_code == 200 and "x-private" not in sent and sent["x-public"] == "end to end"
    assert not [name for name in sent if name.startswith("x-joule-tag-")], "tags are the proxy's, not the upstream's"
    (row,) = through.rows()
    assert row["tags"] == {"team": "search", "customer": "acme"}


def test_sigterm_lets_the_call_in_flight_finish_and_writes_its_row(tmp_path):
    with running(seed=8, token_delay_s=0.01) as slow:
        through = start_proxy(slow.base_url.removesuffix("/v1"), tmp_path / "t.duckdb")
        got: list[bytes] = []

        def call() -> None:
            body = {"model": "auto", "stream": True, "messages": [{"role": "user", "content": "a long story"}]}
            with httpx.stream(
                "POST",
                through.base_url + "/chat/completions",
                json=body,
                headers={"Authorization": "Bearer jc_t"},
                timeout=60,
            ) as response:
                got.extend(response.iter_raw())

        caller = threading.Thread(target=call)
        caller.start()
        time.sleep(0.3)
        through.stop()  # SIGTERM while the stream is still coming
        caller.join(timeout=30)
        assert b"".join(got).rstrip().endswith(b"data: [DONE]")
        (row,) = through.rows()
        assert row["receipt_id"] == slow.receipts[0].receipt_id


def test_a_server_span_continues_the_callers_trace_and_the_upstream_call_is_its_child(sim, tmp_path):
    import asyncio

    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind

    from joule_otel.proxy import HttpServer, ProxyConfig
    from joule_otel.proxy import Proxy as App

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    db = tmp_path / "traced.duckdb"
    joule_otel.instrument(db=db, flush_interval=0.2, tracer_provider=provider)
    app = App(ProxyConfig(upstream=sim.base_url.removesuffix("/v1")), tracer_provider=provider)
    server = HttpServer(app.handle, max_body_bytes=1 << 20)
    loop = asyncio.new_event_loop()
    port = loop.run_until_complete(server.start("127.0.0.1", 0))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        caller_trace, caller_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
        request = urllib.request.Request(  # urllib: a caller this process's httpx instrumentation does not trace
            f"http://127.0.0.1:{port}/v1/chat/completions",
            data=json.dumps({"model": "auto", "messages": HI}).encode(),
            headers={
                "Authorization": "Bearer jc_traced",
                "Content-Type": "application/json",
                "traceparent": f"00-{caller_trace}-{caller_span}-01",
            },
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200
        assert joule_otel.flush(timeout_s=20)
    finally:
        asyncio.run_coroutine_threadsafe(server.shutdown(5), loop).result(timeout=20)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=20)
        loop.close()
        joule_otel.uninstrument()
    spans = exporter.get_finished_spans()
    (served,) = [s for s in spans if s.kind == SpanKind.SERVER]
    assert f"{served.context.trace_id:032x}" == caller_trace and f"{served.parent.span_id:016x}" == caller_span
    (upstream,) = [
        s for s in spans if s.kind == SpanKind.CLIENT and s.parent and s.parent.span_id == served.context.span_id
    ]
    assert upstream.context.trace_id == served.context.trace_id
    assert upstream.attributes["joule.receipt_id"] == sim.receipts[0].receipt_id
    assert "jc_traced" not in json.dumps([dict(s.attributes) for s in spans])
    (row,) = joule_otel.read_ledger(db).to_dict("records")
    assert row["trace_id"] == caller_trace and row["span_id"] == f"{upstream.context.span_id:016x}"


class Counted(BaseHTTPRequestHandler):
    """An upstream that counts its connections, answers a 103 before its 200, and closes idle connections unsaid."""

    connections: list[int] = []
    mode = "keep"
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def setup(self):
        super().setup()
        type(self).connections.append(self.client_address[1])

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = json.dumps({"id": "c", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}).encode()
        self.wfile.write(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Energy-Joules", "2.5")
        self.send_header("X-Receipt-Id", f"rcpt_{len(type(self).connections)}_{time.monotonic_ns()}")
        if type(self).mode == "big":  # more than a client's socket and the proxy's buffers hold
            body = json.dumps(
                {"id": "c", "pad": "x" * (8 << 20), "usage": {"prompt_tokens": 3, "completion_tokens": 4}}
            )
            body = body.encode()
        if type(self).mode == "until-close":  # no length, no chunks: the body is what comes before the close
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True
            return
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        if type(self).mode == "drop-idle":  # keep-alive said, then the connection closed once idle
            self.wfile.flush()
            self.close_connection = True


@pytest.fixture
def counted_upstream():
    Counted.connections, Counted.mode = [], "keep"
    server = ThreadingHTTPServer(("127.0.0.1", 0), Counted)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("mode", ["keep", "drop-idle", "until-close"])
def test_the_upstream_connection_is_reused_replaced_when_dropped_and_read_to_its_end(counted_upstream, tmp_path, mode):
    Counted.mode = mode
    through = start_proxy(counted_upstream, tmp_path / "c.duckdb")
    try:
        answers = []
        with httpx.Client() as client:
            for _ in range(5):
                answers.append(
                    client.post(
                        through.base_url + "/chat/completions",
                        json={"model": "auto", "messages": HI},
                        headers={"Authorization": "Bearer jc_c"},
                    )
                )
                time.sleep(0.05)  # the upstream closes an idle connection meanwhile (drop-idle)
    finally:
        log = through.stop()
    assert [a.status_code for a in answers] == [200] * 5, log  # the 103 was skipped, never forwarded as the answer
    assert all(a.json()["usage"]["completion_tokens"] == 4 for a in answers)
    assert len(Counted.connections) == (1 if mode == "keep" else 5)
    rows = through.rows()
    assert len(rows) == 5 and {r["receipt_id"] for r in rows} == {a.headers["x-receipt-id"] for a in answers}
    assert all(r["energy_j"] == 2.5 and r["output_tokens"] == 4 for r in rows)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_an_https_upstream_through_an_egress_proxy_with_its_own_trust_store(tmp_path):
    from joule_otel.simulator import Simulator, SimulatorConfig

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    sim = Simulator(SimulatorConfig(seed=3, token_delay_s=0.0))
    sim._server.socket = context.wrap_socket(sim._server.socket, server_side=True)
    sim.start()
    tunnels: list[bytes] = []
    egress = socket.create_server(("127.0.0.1", 0))

    def tunnel() -> None:  # an egress proxy that allows CONNECT and relays bytes both ways
        while True:
            try:
                client, _ = egress.accept()
            except OSError:
                return
            head = b""
            while b"\r\n\r\n" not in head:
                head += client.recv(4096)
            tunnels.append(head.split(b"\r\n")[0])
            target = socket.create_connection(("127.0.0.1", sim.port))
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            for a, b in ((client, target), (target, client)):
                threading.Thread(target=_relay, args=(a, b), daemon=True).start()

    threading.Thread(target=tunnel, daemon=True).start()
    upstream = f"https://127.0.0.1:{sim.port}"
    try:
        untrusted = start_proxy(upstream, tmp_path / "u.duckdb")
        try:
            refused = httpx.post(untrusted.base_url + "/chat/completions", json={"model": "auto", "messages": HI})
        finally:
            untrusted.stop()
        assert refused.status_code == 502 and "SSLCertVerificationError" in refused.json()["error"]["message"]
        env = {"SSL_CERT_FILE": str(cert), "HTTPS_PROXY": f"http://127.0.0.1:{egress.getsockname()[1]}", "NO_PROXY": ""}
        through = start_proxy(upstream, tmp_path / "t.duckdb", env=env)
        try:
            client = openai.OpenAI(base_url=through.base_url, api_key="jc_tls", max_retries=0)
            client.chat.completions.create(model="auto", messages=HI)
            chunks = list(client.chat.completions.create(model="auto", messages=HI, stream=True))
        finally:
            through.stop()
        assert chunks and tunnels == [f"CONNECT 127.0.0.1:{sim.port} HTTP/1.1".encode()]  # one tunnel, kept alive
        rows = through.rows()
        assert sorted(r["receipt_id"] for r in rows) == sorted(r.receipt_id for r in sim.receipts[-2:])
        assert [r["energy_j"] for r in rows] == [r.energy_j for r in sim.receipts[-2:]]
    finally:
        egress.close()
        sim.stop()


def _relay(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)


def test_a_slow_reader_gets_a_large_answer_whole_and_the_upstream_connection_is_reused(counted_upstream, tmp_path):
    Counted.mode = "big"
    through = start_proxy(counted_upstream, tmp_path / "big.duckdb")
    port = int(through.url.rsplit(":", 1)[1])
    request = json.dumps({"model": "auto", "messages": HI}).encode()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(request), request)
            )
            data = b""
            while chunk := sock.recv(256 << 10):  # slower than the proxy can send: it pauses the upstream, then resumes
                data += chunk
                time.sleep(0.005)
        with httpx.Client() as client:  # the next call goes on the same upstream connection, read from the start
            after = client.post(through.base_url + "/chat/completions", json={"model": "auto", "messages": HI})
    finally:
        log = through.stop()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and len(json.loads(body)["pad"]) == 8 << 20, log
    assert after.status_code == 200 and len(after.json()["pad"]) == 8 << 20
    assert len(Counted.connections) == 1
    rows = through.rows()
    assert len(rows) == 2 and all(r["energy_j"] == 2.5 for r in rows)
