"""The OTLP/HTTP receiver: Starlette routes on uvicorn, and one thread that writes what they receive.

Starlette and uvicorn because they are small, well kept, and handle what OTLP senders do (HTTP/1.1
keep-alive, chunked bodies without Content-Length, gzip) without this code parsing HTTP; trace exports are
decoded and reduced to calls in worker processes (``decoding_workers``; logs in Starlette's thread pool), so
the event loop only moves bytes and the receiver only joins and writes. A request is answered once its rows
are on disk in the spool (group commit: one segment for every request waiting at that moment), so a
sender's retry after a crash loses nothing, and a record that arrives twice is one row (receipt id, else
trace and span id; compaction enforces the same across processes and hours).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from joule_otel._dedupe import CallKey, RecentCalls
from joule_otel._events import EVENT_NAME, row_from_event
from joule_otel._threads import start_daemon
from joule_otel.collect import _journal, _otlp
from joule_otel.collect._spans import Prepared, SpanJoiner, prepare
from joule_otel.ledger._row import LedgerRow
from joule_otel.ledger._writer import LedgerWriter

_log = logging.getLogger("joule_otel.collect")

PROTOBUF_TYPES = ("application/x-protobuf", "application/protobuf")


@dataclass
class _Batch:
    rows: list[LedgerRow]
    measured: bool
    done: Future[bool] = field(default_factory=Future)


class RowSink:
    """The one thread that owns the ledger writer: group commit of what every request received."""

    def __init__(self, writer: LedgerWriter | None, recorders: Any, flush_interval_s: float) -> None:
        self.writer = writer
        self.recorders = recorders
        """``recorders.for_service(name) -> MetricRecorder | None``: the metrics of calls from other languages."""
        self.flush_interval_s = flush_interval_s
        self.joiner = SpanJoiner()
        self.rows_written = 0
        self.recent = RecentCalls()
        """Receipt ids (or trace/span ids) of recent calls: a retried record is dropped before it reaches disk."""
        self._pending: list[_Batch] = []
        self._journal = _journal.WaitingJournal(writer.spool) if writer is not None else None
        self._journaled = 0
        self._journal_ok = True
        """The joiner's ``changes`` when the journal was last written."""
        if writer is not None:
            _recover_waiting_calls(writer)
        self._cond = threading.Condition()
        self._stop = False
        self._thread = start_daemon(self._run, "joule-otel-collect-writer")

    def spans(self, spans: list[_otlp.Span]) -> Future[bool]:
        """Rows of the Joule calls among ``spans`` (metrics recorded for them: they were not Python's)."""
        return self.prepared(prepare(spans))

    def prepared(self, prepared: Prepared) -> Future[bool]:
        """:meth:`spans` for spans a worker process reduced already."""
        with self._cond:
            rows = self.joiner.add_prepared(prepared)
        return self._submit(rows, measured=False)

    def rows(self, rows: list[LedgerRow]) -> Future[bool]:
        """Rows from call events: the app recorded their metrics already."""
        return self._submit(rows, measured=True)

    def _submit(self, rows: list[LedgerRow], *, measured: bool) -> Future[bool]:
        batch = _Batch(rows, measured)
        with self._cond:
            self._pending.append(batch)
            self._cond.notify()
        return batch.done

    def _run(self) -> None:
        last_flush = time.monotonic()
        while True:
            with self._cond:
                if not self._pending and not self._stop:
                    self._cond.wait(timeout=min(self.flush_interval_s, 1.0))
                batches, self._pending = self._pending, []
                stop = self._stop
                expired = self.joiner.expire(everything=stop)
                changes = self.joiner.changes
                waiting = self.joiner.waiting_rows() if changes != self._journaled else None
            try:
                self._write(batches, [*expired] if expired else [], final=stop, waiting=waiting)
                if waiting is not None and self._journal_ok:
                    self._journaled = changes
            except Exception:
                _log.exception("joule-otel collect: writing rows failed")
                for batch in batches:
                    if not batch.done.done():
                        batch.done.set_result(False)
            now = time.monotonic()
            if now - last_flush >= self.flush_interval_s:
                last_flush = now
                self.recorders.add_counter_sums()
            if stop:
                return

    def _write(
        self, batches: list[_Batch], late: list[LedgerRow], *, final: bool, waiting: list[LedgerRow] | None = None
    ) -> None:
        """Write the rows of ``batches`` and ``late``, then the journal of ``waiting`` calls; answer the batches.

        A batch is answered True only when its rows and its waiting calls are on disk: the completed rows first
        (a call leaves the journal only once its row is in a segment), then the journal.
        """
        rows: list[LedgerRow] = []
        marked: list[CallKey] = []
        for measured, found in [(b.measured, b.rows) for b in batches] + [(False, late)]:
            for row in found:
                if not self.recent.fresh(row, marked):
                    continue
                rows.append(row)
                if not measured:  # another language's call: its metrics are recorded here, under its own service
                    recorder = self.recorders.for_service(row.service or "unknown_service")
                    if recorder is not None:
                        recorder.record_row(row)
        writer = self.writer
        ok = writer.commit(rows, durable=bool(rows), final=final, timeout_s=10.0) if writer is not None else True
        self._journal_ok = True
        if ok and waiting is not None and self._journal is not None:
            self._journal_ok = ok = self._journal.write(waiting)
        if ok:
            self.rows_written += len(rows)
        else:  # not on disk: a sender's retry of these rows is not a duplicate, and is answered as the disk allows
            self.recent.forget(marked)
        for batch in batches:
            batch.done.set_result(ok)

    def close(self) -> None:
        """Write every row (those waiting for a parent span too), compact, stop the thread."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=60)
        if self._journal is not None and not self._thread.is_alive():
            self._journal.close()  # every waiting call was written at the stop (or waits in the journal)
        self.recorders.add_counter_sums()


def _recover_waiting_calls(writer: LedgerWriter) -> None:
    """Write the waiting calls of receivers that were killed as a segment (see :mod:`._journal`)."""
    for journal, lock in _journal.orphaned(writer.spool):
        try:
            table = _journal.read(journal)
            if table is not None and table.num_rows:
                writer.spool.write_segment(table)
                _log.warning(
                    "joule-otel collect: %d calls a stopped receiver was holding for their parent span are written "
                    "without it",
                    table.num_rows,
                )
            journal.unlink(missing_ok=True)
            lock.unlink(missing_ok=True)
        except OSError as exc:  # a disk that refuses: the journal stays for the next start
            _log.warning("joule-otel collect: cannot recover %s yet: %s", journal, exc)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address or ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def authorized(header: str | None, token: str | None) -> bool:
    """Whether an ``Authorization`` value carries ``token`` (always, when no token is required).

    ``Bearer`` is matched without regard to case, as HTTP's auth schemes are (RFC 9110 11.1); the
    credentials are compared in constant time.
    """
    if token is None:
        return True
    scheme, _, credentials = (header or "").strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode(), token.encode())


def create_app(
    sink: RowSink, *, token: str | None, max_body_bytes: int = _otlp.MAX_BODY_BYTES, decoders: Any = None
) -> Any:
    """The Starlette application: ``POST /v1/traces``, ``POST /v1/logs``, ``GET /healthz``.

    ``decoders`` is an executor (a process pool) that decodes trace exports and makes their rows, where the CPU is;
    without one they are decoded in Starlette's thread pool.
    """
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    stats = {"requests": 0, "rejected_items": 0, "bad_payloads": 0, "unauthorized": 0}

    def answer(request_type: str, signal: str, rejected: int, message: str, status: int = 200) -> Response:
        if request_type in PROTOBUF_TYPES:
            return Response(protobuf_answer(signal, rejected, message), status, media_type="application/x-protobuf")
        body: dict[str, Any] = {}
        if rejected or message:
            count_key = "rejectedSpans" if signal == "traces" else "rejectedLogRecords"
            body = {"partialSuccess": {count_key: rejected, "errorMessage": message}}
        return JSONResponse(body, status)

    def refuse(status: int, message: str) -> Response:
        return JSONResponse({"code": status, "message": message}, status)

    async def receive(request: Request, signal: str) -> Response:
        stats["requests"] += 1
        if not authorized(request.headers.get("authorization"), token):
            stats["unauthorized"] += 1
            return refuse(401, "a bearer token is required (JOULE_OTEL_COLLECT_TOKEN)")
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type not in (*PROTOBUF_TYPES, "application/json"):
            stats["bad_payloads"] += 1
            return refuse(415, f"Content-Type {content_type!r}: use application/x-protobuf or application/json")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_body_bytes:
            stats["bad_payloads"] += 1
            return refuse(413, f"the body is larger than {max_body_bytes} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                stats["bad_payloads"] += 1
                return refuse(413, f"the body is larger than {max_body_bytes} bytes")
            chunks.append(chunk)
        body = b"".join(chunks)
        encoding = request.headers.get("content-encoding", "")
        try:
            if signal == "traces":
                prepared = await _prepare_traces(decoders, body, encoding, content_type)
                decoded = _otlp.Decoded(rejected=prepared.rejected, errors=prepared.errors or [])
            else:
                decoded = await run_in_threadpool(_decode, body, encoding, content_type, signal)
        except _otlp.PayloadError as exc:
            stats["bad_payloads"] += 1
            return refuse(413 if exc.too_large else 400, str(exc))
        done = sink.prepared(prepared) if signal == "traces" else submit(sink, signal, decoded)
        stats["rejected_items"] += decoded.rejected  # after submit: it refuses the records no row can be made of
        if not await asyncio.wrap_future(done):
            return refuse(503, "the ledger's disk refused the rows; they wait in memory, retry later")
        message = "; ".join(dict.fromkeys(decoded.errors))[:512]
        return answer(content_type, signal, decoded.rejected, message)

    async def traces(request: Request) -> Response:
        return await receive(request, "traces")

    async def logs(request: Request) -> Response:
        return await receive(request, "logs")

    async def health(request: Request) -> Response:
        if not authorized(request.headers.get("authorization"), token):
            return JSONResponse({"status": "ok"})  # alive, for an orchestrator; nothing more to a stranger
        writer = sink.writer
        return JSONResponse(
            {
                "status": "ok",
                "ledger": str(writer.db_path) if writer else None,
                "rows_written": sink.rows_written,
                "duplicates_dropped": sink.recent.repeats,
                "waiting_for_parent_span": sink.joiner.waiting,
                **stats,
            }
        )

    return Starlette(
        routes=[
            Route("/v1/traces", traces, methods=["POST"]),
            Route("/v1/logs", logs, methods=["POST"]),
            Route("/healthz", health, methods=["GET"]),
        ]
    )


def submit(sink: RowSink, signal: str, decoded: _otlp.Decoded) -> Future[bool]:
    """Hand what a request held to the sink: spans (their Joule calls), or call events (their rows).

    A log record that cannot be made a row is counted in ``decoded.rejected`` and skipped; other log records
    (not call events) are ignored.
    """
    if signal == "traces":
        prepared = prepare(decoded.spans)
        decoded.rejected += prepared.rejected
        decoded.errors += prepared.errors or []
        return sink.prepared(prepared)
    rows = []
    for record in decoded.logs:
        if record.event_name != EVENT_NAME:
            continue
        try:
            rows.append(
                row_from_event(
                    record.attributes,
                    time_ns=record.time_ns,
                    trace_id=record.trace_id,
                    span_id=record.span_id,
                    service=record.resource.get("service.name"),
                )
            )
        except Exception as exc:  # a record that cannot be a row: skipped, counted
            decoded.rejected += 1
            decoded.errors.append(str(exc))
    return sink.rows(rows)


def prepare_traces(body: bytes, encoding: str, content_type: str) -> Prepared:
    """Decode a trace export and reduce its spans to calls and parents (runs in a decoding worker process)."""
    decoded = _decode(body, encoding, content_type, "traces")
    prepared = prepare(decoded.spans)
    prepared.rejected += decoded.rejected
    prepared.errors = [*decoded.errors, *(prepared.errors or [])]
    return prepared


async def _prepare_traces(decoders: Any, body: bytes, encoding: str, content_type: str) -> Prepared:
    from starlette.concurrency import run_in_threadpool

    if decoders is not None:
        from concurrent.futures.process import BrokenProcessPool

        try:
            return await asyncio.get_running_loop().run_in_executor(
                decoders, prepare_traces, body, encoding, content_type
            )
        except BrokenProcessPool:  # a worker died (killed, out of memory): this request is decoded here
            _log.warning("joule-otel collect: a decoding worker process died; decoding in-process")
    result: Prepared = await run_in_threadpool(prepare_traces, body, encoding, content_type)
    return result


def decoding_workers() -> Any | None:
    """A pool of processes that decode trace exports (one per core), started and ready; None on a single core.

    Each process is started and imports what decoding needs now (an empty export decoded), not while the first
    exports wait: that took several seconds of their time on a 2-core VM under load.
    """
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor, wait

    cores = os.cpu_count() or 1
    if cores < 2:
        return None
    count = min(cores, 4)
    pool = ProcessPoolExecutor(max_workers=count, mp_context=multiprocessing.get_context("spawn"))
    # a pool starts one process for each task submitted while none is idle
    wait([pool.submit(prepare_traces, b"", "", PROTOBUF_TYPES[0]) for _ in range(count)], timeout=60)
    return pool


def _decode(body: bytes, encoding: str, content_type: str, signal: str) -> _otlp.Decoded:
    data = _otlp.decompress(body, encoding)
    protobuf = content_type in PROTOBUF_TYPES
    if signal == "traces":
        return _otlp.traces_from_protobuf(data) if protobuf else _otlp.traces_from_json(data)
    return _otlp.logs_from_protobuf(data) if protobuf else _otlp.logs_from_json(data)


def protobuf_answer(signal: str, rejected: int, message: str) -> bytes:
    """The serialized OTLP answer to an export of ``signal``: how many of its records were refused, and why."""
    if signal == "traces":
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTracePartialSuccess,
            ExportTraceServiceResponse,
        )

        partial = ExportTracePartialSuccess(rejected_spans=rejected, error_message=message)
        return bytes(ExportTraceServiceResponse(partial_success=partial).SerializeToString())
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
        ExportLogsPartialSuccess,
        ExportLogsServiceResponse,
    )

    partial_logs = ExportLogsPartialSuccess(rejected_log_records=rejected, error_message=message)
    return bytes(ExportLogsServiceResponse(partial_success=partial_logs).SerializeToString())
