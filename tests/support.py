"""What several test files share: a scripted HTTP server, a writable row, reading a ledger, running a script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import joule_otel
from joule_otel.ledger._row import LedgerRow

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


def serve_scripted():
    """A server answering as :class:`Scripted` says, on loopback: its base URL, and how to stop it."""
    Scripted.status, Scripted.headers_to_send, Scripted.body = 200, {}, completion()
    Scripted.content_type = "application/json"
    server = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()

    return f"http://127.0.0.1:{server.server_address[1]}/v1", stop


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


def fill(mount: Path, leave_bytes: int) -> Path:
    filler = mount / "filler"
    free = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
    filler.write_bytes(b"\0" * max(free - leave_bytes, 0))
    return filler
