"""The background half of capture: finished calls → parsed facts → metrics and ledger rows.

One daemon thread per process drains a bounded deque every flush interval (or sooner, under load),
parses what the app's thread only kept references to, records metrics, and hands rows to the
ledger writer. It restarts itself after ``fork`` and is flushed at exit and on SIGTERM.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
import zlib
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from joule_otel import attributes as attr
from joule_otel.capture import SEMCONV_OPERATIONS, CallRecord, error_type_for, parse_request_body
from joule_otel.headers import REGION, EnergyReading, header_map, header_value, parse_quantity, read_energy_map
from joule_otel.instruments import Instruments
from joule_otel.ledger.writer import LedgerWriter, rows_to_arrow

_log = logging.getLogger("joule_otel")

MAX_QUEUED_CALLS = 50_000
"""Calls waiting for the background thread; past this they are dropped and counted."""
DRAIN_INTERVAL_S = 0.05
"""How often the background thread takes the calls waiting for it while calls flow (idle, it wakes once a flush
interval); rows still reach disk once a flush interval.

Soon, because what a waiting call holds (its headers, its body bytes) would otherwise outlive the garbage collector's
youngest generation: held for a second, those objects set off collections on the app's thread, get promoted, and
bring on full collections of the app's whole heap, which measured at 0.1-0.15 ms of the app's CPU per call."""
WAKE_AT = 32
"""Wake the background thread early when this many calls wait (the first calls after a quiet spell, say)."""
SEGMENT_MAX_ROWS = 100_000
YIELD_EVERY = 8
"""Calls the background thread processes between two offers of the GIL to the app's threads."""
RECENT_RECEIPTS = 100_000
DECODED_CAP = 16 << 20
ATTRIBUTE_SETS_CACHED = 4_096
SSE_TAIL_BYTES = 64 << 10
_JSON_DECODER = json.JSONDecoder()
_NO_SPAN = otel_context.Context()
"""A context without a span: a measurement recorded with it offers no exemplar."""
_NO_OP_METER_PROVIDERS = frozenset({"_ProxyMeterProvider", "NoOpMeterProvider"})
_REGION_KEY = REGION.encode("latin-1")


@dataclass
class BodyFacts:
    """What the response body said."""

    input_tokens: int | None = None
    output_tokens: int | None = None
    stream_energy_j: float | None = None
    stream_carbon_mg: float | None = None
    error_code: str | None = None


def _decode(call: CallRecord, content_encoding: str) -> bytes:
    data = b"".join(call.chunks)
    encoding = content_encoding.strip().lower()
    if not data:
        return data
    if encoding in ("", "identity"):
        return data
    if encoding in ("gzip", "x-gzip", "deflate"):
        wbits = 47 if encoding != "deflate" else 15
        for bits in (wbits, -15):
            try:
                return zlib.decompressobj(bits).decompress(data, DECODED_CAP)
            except zlib.error:
                continue
        return b""
    if encoding == "br":
        try:
            import brotli

            return bytes(brotli.decompress(data))
        except Exception:
            return b""
    if encoding == "zstd":
        try:
            import zstandard

            return bytes(zstandard.ZstdDecompressor().decompressobj().decompress(data))
        except Exception:
            return b""
    return b""


def _usage_tokens(usage: Any) -> tuple[int | None, int | None]:
    if not isinstance(usage, dict):
        return None, None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens"))
    return (
        prompt if isinstance(prompt, int) and prompt >= 0 else None,
        completion if isinstance(completion, int) and completion >= 0 else None,
    )


def _joule_extension(joule: Any, facts: BodyFacts) -> None:
    if isinstance(joule, dict):
        energy = joule.get("energy_joules")
        carbon = joule.get("carbon_mg")
        facts.stream_energy_j = parse_quantity(str(energy)) if energy is not None else None
        facts.stream_carbon_mg = parse_quantity(str(carbon)) if carbon is not None else None


_COLON_BRACE = re.compile(rb"\s*:\s*\{")


def _object_after(data: bytes, key: bytes) -> Any:
    """The JSON object under the last ``key`` (a quoted name) in ``data``, decoded alone, or None.

    Only that object is decoded, not the event or body around it. The same quoted word can also be a string value
    (``"role": "usage"``); only a key is followed by a colon.
    """
    end = len(data)
    for _ in range(4):
        at = data.rfind(key, 0, end)
        if at < 0:
            return None
        found = _COLON_BRACE.match(data, at + len(key))
        if found is not None:
            try:
                return _JSON_DECODER.raw_decode(data[found.end() - 1 :].decode("utf-8", "replace"))[0]
            except ValueError:
                return None
        end = at
    return None


def _data_lines_backwards(data: bytes) -> Iterator[bytes]:
    """What follows ``data:`` on each line of an SSE body, last line first, within its last :data:`SSE_TAIL_BYTES`.

    Found with ``rfind`` rather than by splitting the body: a stream of a few hundred chunks has as many lines, and
    only the last few are read. A JSON payload cannot hold a raw newline, so a newline and ``data:`` start a line.
    """
    floor = max(len(data) - SSE_TAIL_BYTES, 0)
    end = len(data)
    while end > floor:
        newline = data.rfind(b"\ndata:", floor, end)
        if newline >= 0:
            start = newline + 1
        elif floor == 0 and data.startswith(b"data:"):  # the body's first line
            start = 0
        else:
            return
        line_end = data.find(b"\n", start, end)
        yield data[start + 5 : line_end if line_end >= 0 else end]
        end = newline if newline >= 0 else 0


def parse_body(call: CallRecord, is_sse: bool, content_encoding: str = "") -> BodyFacts:
    """Usage, the stream's final energy figure and the error code, from the kept body bytes."""
    facts = BodyFacts()
    data = _decode(call, content_encoding)
    if not data:
        return facts
    if is_sse:
        seen = 0
        # the figures come in the last events: walk back from the end, parse only events that carry them
        for line in _data_lines_backwards(data):
            if b"[DONE]" in line:
                continue
            seen += 1
            if seen > 8 or (facts.input_tokens is not None and facts.stream_energy_j is not None):
                break
            if facts.input_tokens is None and facts.output_tokens is None and b'"usage"' in line:
                facts.input_tokens, facts.output_tokens = _usage_tokens(_object_after(line, b'"usage"'))
            if facts.stream_energy_j is None and b'"joule"' in line:
                _joule_extension(_object_after(line, b'"joule"'), facts)
        return facts
    if call.status_code is not None and call.status_code >= 400:
        try:
            error = json.loads(data).get("error") or {}
            code = error.get("code") or error.get("type")
            facts.error_code = str(code)[:64] if code else None
        except (ValueError, AttributeError):
            pass
        return facts
    facts.input_tokens, facts.output_tokens = _usage_tokens(_object_after(data, b'"usage"'))
    return facts


def other_genai_metrics_recorder() -> str | None:
    """Name of another GenAI instrumentation in this process that records ``gen_ai.client.*`` metrics."""
    for module_name, label in (
        ("opentelemetry.instrumentation.openai_v2", "opentelemetry-instrumentation-openai-v2"),
        ("opentelemetry.instrumentation.openai", "OpenLLMetry"),
    ):
        module = sys.modules.get(module_name)
        instrumentor = getattr(module, "OpenAIInstrumentor", None) if module else None
        if instrumentor is not None and getattr(instrumentor(), "_is_instrumented_by_opentelemetry", False):
            return label
    if "logfire._internal.integrations.llm_providers.openai" in sys.modules:
        return "Logfire"
    if "openlit.instrumentation.openai" in sys.modules:
        return "OpenLIT"
    return None


class Pipeline:
    """The background thread, its queue, and what it does with each call."""

    def __init__(
        self,
        *,
        service_name: str,
        default_workload: str | None,
        flush_interval_s: float,
        max_workloads: int,
        instruments: Instruments | None,
        writer: LedgerWriter | None,
        capture_stats: Any,
        meter_provider: Any = None,
    ) -> None:
        self.service_name = service_name
        self.default_workload = default_workload
        self.flush_interval_s = flush_interval_s
        self.max_workloads = max_workloads
        self.instruments = instruments
        self.meter_provider = meter_provider
        """The provider the instruments came from; ``None`` or the API's proxy: the global one, looked up each cycle."""
        self.writer = writer
        self.capture_stats = capture_stats
        self.calls_seen = 0
        self.calls_dropped = 0
        self.duplicate_receipts = 0
        self._recent: OrderedDict[str, None] = OrderedDict()
        self._metric_workloads: set[str] = set()
        self._attribute_sets: dict[tuple[str | None, ...], dict[str, Any]] = {}
        self._counter_sums: dict[tuple[str | None, ...], list[float | None]] = {}
        self._reset_thread_state()

    def _reset_thread_state(self) -> None:
        self._queue: deque[CallRecord] = deque()
        self._wake = threading.Event()
        self._cond = threading.Condition()
        self._flush_requested = 0
        self._flush_done = 0
        self._stop = False
        self._thread: threading.Thread | None = None
        self._last_segment = time.monotonic()

    # -- app thread side ----------------------------------------------------------------------
    def submit(self, call: CallRecord) -> None:
        """Queue a finished call (called on the app's thread; O(1), no I/O)."""
        queue = self._queue
        if len(queue) >= MAX_QUEUED_CALLS:
            self.calls_dropped += 1
            return
        queue.append(call)
        if len(queue) == WAKE_AT:  # once: the thread takes every call waiting when it wakes
            self._wake.set()

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the background thread."""
        self._thread = threading.Thread(target=self._run, name="joule-otel-ledger", daemon=True)
        self._thread.start()

    def after_fork_in_child(self) -> None:
        """The parent's thread did not survive the fork: start afresh (the parent's queue is its own)."""
        self._reset_thread_state()
        if self.writer is not None:
            self.writer._rows = []
        self.start()

    def flush(self, timeout_s: float) -> bool:
        """Process everything queued so far, write a segment and compact; True if done in time."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            self._cycle(final=True, compact_timeout_s=timeout_s)
            return True
        with self._cond:
            self._flush_requested += 1
            target = self._flush_requested
            self._wake.set()
            return self._cond.wait_for(lambda: self._flush_done >= target, timeout=timeout_s)

    def shutdown(self, timeout_s: float) -> None:
        """Stop the thread, then flush and compact in the caller (waiting up to ``timeout_s`` for the lock)."""
        thread = self._thread
        self._stop = True
        self._wake.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=timeout_s)
        self._thread = None
        self._cycle(final=True, compact_timeout_s=timeout_s)

    def _run(self) -> None:
        if self.writer is not None:
            # pyarrow, and pandas which its first conversion of Python objects imports, take up to a second here:
            # load them now, at instrument() time, rather than in the middle of the app's first requests
            try:
                import pyarrow.parquet  # noqa: F401

                rows_to_arrow([])
            except Exception:
                _log.warning("joule_otel: pyarrow cannot be used; the ledger cannot be written", exc_info=True)
        flowing = False
        while not self._stop:
            self._wake.wait(min(self.flush_interval_s, DRAIN_INTERVAL_S) if flowing else self.flush_interval_s)
            self._wake.clear()
            if self._stop:
                break
            with self._cond:
                target = self._flush_requested
            seen = self.calls_seen
            try:
                # a flush() makes rows durable (a segment on disk, visible to every reader); compaction into
                # the DuckDB file keeps its own pace (once the oldest segment is an interval old, and at exit)
                self._cycle(final=False, force_segment=target > self._flush_done, compact_timeout_s=0.0)
            except Exception:
                _log.exception("joule_otel: background ledger cycle failed; continuing")
            flowing = self.calls_seen != seen
            if target > self._flush_done:
                with self._cond:
                    self._flush_done = target
                    self._cond.notify_all()

    def _cycle(self, *, final: bool, compact_timeout_s: float, force_segment: bool = False) -> None:
        rows = self._drain()
        now = time.monotonic()
        due = final or force_segment or now - self._last_segment >= self.flush_interval_s
        if due:
            self._last_segment = now
            if self._counter_sums:  # once a flush interval: each add costs the SDK as much as a record
                try:
                    self._add_counter_sums()
                except Exception:
                    self.capture_stats.internal_error("recording metrics")
        writer = self.writer
        if writer is None:
            return
        if rows:
            writer.append(rows)
        if due or writer.stats.pending_rows >= SEGMENT_MAX_ROWS:
            writer.write_segment()
        writer.compact(force=final, timeout_s=compact_timeout_s if final else 0.0)

    # -- processing ---------------------------------------------------------------------------
    def _drain(self) -> list[tuple[Any, ...]]:
        queue = self._queue
        rows: list[tuple[Any, ...]] = []
        if not queue:
            return rows
        record = self.instruments is not None and self._metrics_live()
        skip_genai = other_genai_metrics_recorder() is not None if record else True
        processed = 0
        while queue:
            processed += 1
            if processed % YIELD_EVERY == 0:
                # hand the GIL back now and then: an app thread back from the network waits about a millisecond
                # for it, not the interpreter's 5 ms switch interval
                time.sleep(0)
            call = queue.popleft()
            try:
                row = self._process(call, record, skip_genai)
            except Exception:
                self.capture_stats.internal_error("background parsing")
                continue
            if row is not None:
                rows.append(row)
        return rows

    def _metrics_live(self) -> bool:
        """Whether a recorded measurement goes anywhere.

        Not while the app has set no MeterProvider (the API's proxy forwards to nothing until one is set; this is
        checked again every cycle) or set a no-op one.
        """
        provider = self.meter_provider
        if provider is None or type(provider).__name__ == "_ProxyMeterProvider":
            provider = metrics.get_meter_provider()  # what the proxy forwards to, once the app sets one
        return type(provider).__name__ not in _NO_OP_METER_PROVIDERS

    def _process(self, call: CallRecord, record: bool, skip_genai: bool) -> tuple[Any, ...] | None:
        self.calls_seen += 1
        headers = header_map(call.response_headers)
        reading = call.reading
        if reading is None:
            reading = read_energy_map(headers, header_value(call.request_headers, _REGION_KEY))
        if reading.invalid:
            self.capture_stats.invalid_headers += len(reading.invalid)
        receipt = reading.receipt_id
        if receipt is not None:
            if receipt in self._recent:
                self.duplicate_receipts += 1
                return None
            self._recent[receipt] = None
            if len(self._recent) > RECENT_RECEIPTS:
                self._recent.popitem(last=False)
        request = call.request_fields if call.request_fields is not None else parse_request_body(call.request_body)
        is_sse = headers.get(b"content-type", b"").startswith(b"text/event-stream")
        encoding = headers.get(b"content-encoding", b"").decode("latin-1")
        facts = parse_body(call, is_sse, encoding) if call.chunks else BodyFacts()
        energy, carbon = reading.energy_j, reading.carbon_mg
        if facts.stream_energy_j is not None:  # the final stream event wins over the header
            energy = facts.stream_energy_j
            if facts.stream_carbon_mg is not None:
                carbon = facts.stream_carbon_mg
        error_type = call.error or error_type_for(call.status_code, facts.error_code)
        workload = call.workload or self.default_workload or self.service_name
        duration_s = max(call.t_end - call.t0, 0) / 1e9
        ttft_s = (call.t_first - call.t0) / 1e9 if is_sse and call.t_first else None
        model = request.get("model")
        requested_model = model.strip()[:256] if isinstance(model, str) else None
        if record:
            self._record_metrics(
                call,
                reading,
                workload,
                requested_model,
                error_type,
                energy,
                carbon,
                facts,
                duration_s,
                ttft_s,
                skip_genai,
            )
        return (
            receipt,
            call.started_ns // 1000,
            duration_s * 1000.0,
            ttft_s * 1000.0 if ttft_s is not None else None,
            self.service_name,
            workload,
            call.operation,
            call.server_address,
            call.status_code,
            error_type,
            requested_model,
            reading.routed_to,
            reading.tier,
            reading.region,
            energy,
            carbon,
            facts.input_tokens,
            facts.output_tokens,
            bool(request.get("stream")) if request else is_sse,
            f"{call.trace_id:032x}" if call.trace_id else None,
            f"{call.span_id:016x}" if call.span_id else None,
        )

    def _metric_workload(self, workload: str) -> str:
        if workload in self._metric_workloads:
            return workload
        if len(self._metric_workloads) < self.max_workloads:
            self._metric_workloads.add(workload)
            return workload
        return "other"

    def _record_metrics(
        self,
        call: CallRecord,
        reading: EnergyReading,
        workload: str,
        requested_model: str | None,
        error_type: str | None,
        energy: float | None,
        carbon: float | None,
        facts: BodyFacts,
        duration_s: float,
        ttft_s: float | None,
        skip_genai: bool,
    ) -> None:
        inst = self.instruments
        assert inst is not None
        key = (
            self._metric_workload(workload),
            call.operation,
            requested_model,
            reading.routed_to,
            reading.tier,
            reading.region,
            error_type,
        )
        attrs = self._attribute_sets.get(key)
        if attrs is None:
            attrs = self._attribute_set(key)
        ctx = None
        if call.trace_id and call.span_id:
            span_context = SpanContext(
                call.trace_id, call.span_id, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED)
            )
            ctx = trace.set_span_in_context(NonRecordingSpan(span_context))
        if energy is not None or carbon is not None:
            # counters are summed here and added once per attribute set per cycle (the SDK's cost is per
            # add, ~25 µs, and a sum is a sum); histograms keep one record per call, with its exemplar
            sums = self._counter_sums.get(key)
            if sums is None:
                sums = self._counter_sums[key] = [None, None]
            if energy is not None:
                sums[0] = (sums[0] or 0.0) + energy
                inst.request_energy.record(energy, attrs, context=ctx)
            if carbon is not None:
                sums[1] = (sums[1] or 0.0) + carbon
        if skip_genai:
            return
        inst.duration.record(duration_s, attrs, context=ctx)
        # token counts carry no exemplar: a trace is one click away from the energy and duration histograms, and an
        # exemplar offer costs each record a third more
        if facts.input_tokens is not None:
            inst.token_usage.record(facts.input_tokens, self._token_attributes(key, "input"), context=_NO_SPAN)
        if facts.output_tokens is not None:
            inst.token_usage.record(facts.output_tokens, self._token_attributes(key, "output"), context=_NO_SPAN)
        if ttft_s is not None:
            inst.time_to_first_chunk.record(ttft_s, attrs, context=ctx)

    def _attribute_set(self, key: tuple[str | None, ...]) -> dict[str, Any]:
        """The metric attributes of ``key``, built once (the number of distinct sets is bounded)."""
        workload, operation, requested_model, routed_to, tier, region, error_type = key
        attrs: dict[str, Any] = {attr.JOULE_WORKLOAD: workload, attr.GEN_AI_PROVIDER_NAME: attr.PROVIDER}
        for name, value in (
            (attr.GEN_AI_OPERATION_NAME, SEMCONV_OPERATIONS.get(operation or "")),
            (attr.GEN_AI_REQUEST_MODEL, requested_model),
            (attr.GEN_AI_RESPONSE_MODEL, routed_to),
            (attr.JOULE_TIER, tier),
            (attr.JOULE_REGION, region),
            (attr.ERROR_TYPE, error_type),
        ):
            if value is not None:
                attrs[name] = value
        if len(self._attribute_sets) >= ATTRIBUTE_SETS_CACHED:
            self._attribute_sets.clear()
        self._attribute_sets[key] = attrs
        return attrs

    def _token_attributes(self, key: tuple[str | None, ...], token_type: str) -> dict[str, Any]:
        token_key = (*key, token_type)
        attrs = self._attribute_sets.get(token_key)
        if attrs is None:
            attrs = {**(self._attribute_sets.get(key) or self._attribute_set(key)), attr.GEN_AI_TOKEN_TYPE: token_type}
            self._attribute_sets[token_key] = attrs
        return attrs

    def _add_counter_sums(self) -> None:
        """Add what the counters summed since the last cycle: one ``add`` per attribute set."""
        inst = self.instruments
        sums, self._counter_sums = self._counter_sums, {}
        if inst is None:
            return
        for key, (energy, carbon) in sums.items():
            attrs = self._attribute_sets.get(key) or self._attribute_set(key)
            if energy is not None:
                inst.energy.add(energy, attrs)
            if carbon is not None:
                inst.carbon.add(carbon, attrs)
