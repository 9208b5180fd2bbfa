"""The background half of capture: the queue, the worker thread and its life cycle, and turning a call into a row.

One daemon thread per process drains a bounded deque (every 50 ms while calls flow, once a flush interval
when idle), parses what the app's thread only kept references to (:mod:`joule_otel._decode`), records
metrics (:mod:`joule_otel._metrics`), and hands rows to the ledger writer. It restarts itself after
``fork``; it is flushed at exit, on SIGTERM, and when a ``multiprocessing`` child returns.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from joule_otel._budget_watch import BudgetWatch
from joule_otel._calls import call_row, read_exchange
from joule_otel._dedupe import RecentCalls
from joule_otel._events import EVENT_NAME, event_attributes
from joule_otel._metrics import MetricRecorder
from joule_otel._record import CallRecord
from joule_otel._tags import baggage_tags, merged
from joule_otel._threads import start_daemon
from joule_otel._workload import baggage_workload
from joule_otel.ledger._row import LedgerRow
from joule_otel.ledger._writer import LedgerWriter, load_arrow

_log = logging.getLogger("joule_otel")

MAX_QUEUED_CALLS = 50_000
"""Calls waiting for the background thread; past this they are dropped and counted."""
DRAIN_INTERVAL_S = 0.05
"""How often the background thread takes the calls waiting for it while calls flow (idle, it wakes once a flush
interval); rows still reach disk once a flush interval.

Soon, because what a waiting call holds (its headers, its body bytes) would otherwise outlive the garbage collector's
youngest generation: held for a second, those objects set off collections on the app's thread, get promoted, and
bring on full collections of the app's whole heap, paid on the app's thread."""
WAKE_AT = 32
"""Wake the background thread early when this many calls wait (the first calls after a quiet spell, say)."""
YIELD_AFTER_S = 0.001
"""The longest the background thread processes calls before it offers the GIL to the app's threads.

Not after every few calls: each offer taken is a context switch, and the thread resumes with cold caches. An app thread
back from the network waits at most this long, once a drain."""
RECENT_CALLS_KEPT = 100_000
"""Calls whose keys an app remembers to drop a repeat: half of what ``collect`` keeps, as this is the app's memory."""
FORK_WAIT_S = 10.0
"""The longest a fork waits for the worker to finish an import or a cycle (a compaction among them)."""
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)


class Pipeline:
    """The background thread, its queue, and what it does with each call."""

    def __init__(
        self,
        *,
        service_name: str,
        default_workload: str | None,
        default_tags: dict[str, str] | None = None,
        flush_interval_s: float,
        recorder: MetricRecorder,
        writer: LedgerWriter | None,
        capture_stats: Any,
        events_logger: Any = None,
        watch: BudgetWatch | None = None,
    ) -> None:
        self.service_name = service_name
        self.watch = watch
        """Month-to-date energy against the budgets, and the 402 warnings (see :mod:`joule_otel._budget_watch`)."""
        self.row_listeners: list[Callable[[list[LedgerRow], list[Any]], None]] = []
        """Called on the background thread with each cycle's rows (the pytest plugin's energy per test)."""
        self.events_logger = events_logger
        """An OTel Logger that call events go to (``JOULE_OTEL_CALL_EVENTS``), or None."""
        self.default_workload = default_workload
        self.default_tags = default_tags or {}
        """The process's tags (``instrument(tags=…)``, ``JOULE_OTEL_TAGS``): the lowest precedence of a call's."""
        self.flush_interval_s = flush_interval_s
        self.recorder = recorder
        self.writer = writer
        self.capture_stats = capture_stats
        self.calls_seen = 0
        self.calls_dropped = 0
        self.recent = RecentCalls(RECENT_CALLS_KEPT)
        self._cycle_lock = threading.Lock()
        """The writer is not thread-safe: one cycle at a time, whichever thread runs it (the worker, or a caller
        of flush/shutdown once the worker is gone or stuck)."""
        self._ready = threading.Event()
        """Set once the worker has loaded what it imports (pyarrow): a fork in the middle of an import would leave the
        child a half-initialised module."""
        self._held_for_fork = False
        self._cycle_owner: int | None = None
        self._reset_thread_state()

    def _reset_thread_state(self) -> None:
        self._queue: deque[CallRecord] = deque()
        self._in_hand = 0
        self._contexts: list[Any] = []
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
            call.response = None  # it holds the call through its stream: freed now, not by the garbage collector
            return
        queue.append(call)
        if len(queue) == WAKE_AT:  # once: the thread takes every call waiting when it wakes
            self._wake.set()

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the background thread."""
        self._thread = start_daemon(self._run, "joule-otel-ledger")

    def before_fork(self) -> None:
        """Let the worker finish an import or a cycle before the process forks (bounded: a fork is never blocked)."""
        self._ready.wait(FORK_WAIT_S)
        self._held_for_fork = self._cycle_lock.acquire(timeout=FORK_WAIT_S)

    def after_fork_in_parent(self) -> None:
        """The fork is done: the worker may cycle again."""
        if self._held_for_fork:
            self._held_for_fork = False
            self._cycle_lock.release()

    def after_fork_in_child(self) -> None:
        """In a forked child: the parent's thread did not survive, and what the parent held is the parent's to write.

        The queue, the rows not yet spooled and the counter sums not yet added belong to the parent, which writes
        and adds them itself: kept here, they would land twice. A lock the worker held at the fork is the parent's
        too (a fresh lock is taken here; the ledger's file lock is dropped by the spool's own fork hook).
        """
        self._reset_thread_state()
        self._cycle_lock = threading.Lock()
        self._cycle_owner = None
        self._held_for_fork = False
        self.recorder.forget_sums()
        if self.writer is not None:
            self.writer.forget_pending()
        self.start()

    def flush(self, timeout_s: float) -> bool:
        """Process everything queued so far and write it to the spool; True if every row reached disk in time."""
        writer = self.writer
        lost_before = writer.rows_lost() if writer is not None else 0
        thread = self._thread
        if thread is None or not thread.is_alive():
            done = self._cycle_now(final=False, force_segment=True, timeout_s=timeout_s)
        else:
            with self._cond:
                self._flush_requested += 1
                target = self._flush_requested
                self._wake.set()
                done = self._cond.wait_for(lambda: self._flush_done >= target, timeout=timeout_s)
        if writer is None:
            return done
        return done and writer.stats.pending_rows == 0 and writer.rows_lost() == lost_before

    def shutdown(self, timeout_s: float, *, compact: bool = True) -> bool:
        """Stop the thread, then flush (and compact, unless told not to) in the caller, within ``timeout_s``.

        Returns True if every row reached disk. Rows that could not are reported, never silently lost.
        """
        thread = self._thread
        self._stop = True
        self._wake.set()
        deadline = time.monotonic() + timeout_s
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=timeout_s)
        self._thread = None
        done = self._cycle_now(final=True, compact=compact, timeout_s=max(deadline - time.monotonic(), 0.1))
        writer = self.writer
        if writer is not None and (not done or writer.stats.pending_rows):
            _log.error(
                "joule_otel: %d ledger rows could not be written to %s and are lost as capture stops "
                "(%d rows dropped earlier at the memory bound, %d invalid; see the errors above)",
                writer.stats.pending_rows + len(self._queue) + self._in_hand,
                writer.spool.dir,
                writer.stats.rows_dropped,
                writer.stats.rows_invalid,
            )
            return False
        return done

    def cycling_on_this_thread(self) -> bool:
        """Whether this thread is inside a cycle: a signal handler that interrupted it must not start another."""
        return self._cycle_owner == threading.get_ident()

    def _cycle_now(self, *, final: bool, timeout_s: float, force_segment: bool = False, compact: bool = True) -> bool:
        """Run a cycle on the caller's thread, unless the worker is in one and does not finish within ``timeout_s``."""
        if self.cycling_on_this_thread():
            return False  # a signal handler interrupted this thread's own cycle: that cycle finishes the work
        if not self._cycle_lock.acquire(timeout=timeout_s):
            _log.warning("joule_otel: the ledger writer is busy; flush gave up after %.1f s", timeout_s)
            return False
        self._cycle_owner = threading.get_ident()
        try:
            self._cycle(
                final=final,
                force_segment=force_segment,
                compact=compact,
                compact_timeout_s=timeout_s if final else 0.0,
            )
        except Exception:
            self.capture_stats.internal_error("ledger flush")
            return False
        finally:
            self._cycle_owner = None
            self._cycle_lock.release()
        return True

    def _run(self) -> None:
        if self.writer is not None:
            # pyarrow, and pandas which its first conversion of Python objects imports, take up to a second here:
            # load them now, at instrument() time, rather than in the middle of the app's first requests
            try:
                load_arrow()
            except Exception:
                _log.warning("joule_otel: pyarrow cannot be used; the ledger cannot be written", exc_info=True)
        self._ready.set()
        flowing = False
        while not self._stop:
            self._wake.wait(min(self.flush_interval_s, DRAIN_INTERVAL_S) if flowing else self.flush_interval_s)
            self._wake.clear()
            if self._stop:
                break
            with self._cond:
                target = self._flush_requested
            seen = self.calls_seen
            with self._cycle_lock:
                self._cycle_owner = threading.get_ident()
                try:
                    # a flush() makes rows durable (a segment on disk, visible to every reader); compaction into
                    # the DuckDB file keeps its own pace (once the oldest segment is an interval old, and at exit)
                    self._cycle(final=False, force_segment=target > self._flush_done, compact_timeout_s=0.0)
                except Exception:
                    self.capture_stats.internal_error("background ledger cycle")
                finally:
                    self._cycle_owner = None
            flowing = self.calls_seen != seen
            if target > self._flush_done:
                with self._cond:
                    self._flush_done = target
                    self._cond.notify_all()

    def _cycle(
        self, *, final: bool, compact_timeout_s: float, force_segment: bool = False, compact: bool = True
    ) -> None:
        rows = self._drain(wait_for_decoders=not (final or force_segment))
        writer = self.writer
        if writer is not None and rows:
            writer.append(rows)  # first: what follows (budgets, listeners) never holds rows back from the ledger
        self._in_hand = 0
        watch = self.watch
        if watch is not None and rows:
            try:
                watch.observe(rows)
            except Exception:
                self.capture_stats.internal_error("budget watch")
        contexts, self._contexts = self._contexts, []
        for listener in self.row_listeners if rows else ():
            try:
                listener(rows, contexts)
            except Exception:
                self.capture_stats.internal_error("row listener")
        now = time.monotonic()
        due = final or force_segment or now - self._last_segment >= self.flush_interval_s
        if due:
            self._last_segment = now
            if self.recorder.has_sums:  # once a flush interval: each add costs the SDK as much as a record
                try:
                    self.recorder.add_counter_sums()
                except Exception:
                    self.capture_stats.internal_error("recording metrics")
        if writer is None:
            return
        writer.commit([], durable=due, final=final, compact=compact, timeout_s=compact_timeout_s)
        if watch is not None and not final:
            try:
                watch.refresh(nothing_pending=writer.stats.pending_rows == 0)
            except Exception:
                self.capture_stats.internal_error("budget watch")

    # -- processing ---------------------------------------------------------------------------
    def _drain(self, *, wait_for_decoders: bool) -> list[LedgerRow]:
        queue = self._queue
        rows: list[LedgerRow] = []
        if not queue:
            return rows
        try:
            record = self.recorder.begin_cycle()
        except Exception:
            self.capture_stats.internal_error("recording metrics")
            record = False
        calls = [queue.popleft() for _ in range(len(queue))]
        listening = bool(self.row_listeners)  # they hear each row with the context its call started in
        self._in_hand = len(calls)  # off the queue, not yet the writer's: counted at exit if a cycle never ends
        if wait_for_decoders:
            # a call finishes when its raw stream ends, a moment before the app's client has flushed its decoder:
            # one caught in that moment waits a drain rather than have its body inflated a second time here
            waiting = {call for call in calls if call.decoding()}
            if waiting:
                queue.extendleft(waiting)
                calls = [call for call in calls if call not in waiting]
        # inflate every compressed body first, together: zlib hands the GIL over while it works, and an app thread back
        # from the network takes it; this thread then resumes with cold caches. Once a drain, not once a call
        # (about half the context switches of inflating call by call; benchmarks/run.py counts them)
        for call in calls:
            try:
                call.inflate()
            except Exception:
                self.capture_stats.internal_error("background decoding")
        offered = time.perf_counter()
        for call in calls:
            if time.perf_counter() - offered >= YIELD_AFTER_S:
                # hand the GIL back now and then: an app thread back from the network waits about a millisecond
                # for it, not the interpreter's 5 ms switch interval
                time.sleep(0)
                offered = time.perf_counter()
            try:
                row = self._process(call, record)
            except Exception:
                self.capture_stats.internal_error("background parsing")
                continue
            if row is not None:
                rows.append(row)
                if listening:
                    self._contexts.append(call.context)
        return rows

    def _process(self, call: CallRecord, record: bool) -> LedgerRow | None:
        self.calls_seen += 1
        scanned = (call.reading, call.found) if call.reading is not None and call.found is not None else None
        host = call.server_address
        facts = read_exchange(
            response_headers=call.response_headers,
            request_headers=call.request_headers,
            host=host,
            status=call.status_code,
            request=call.request_fields,
            request_body=call.request_body if call.request_fields is None else None,
            body=b"".join(call.chunks) if call.chunks else b"",
            decoded=call.decoded,
            scanned=scanned,
        )
        reading = facts.reading
        if reading.invalid:
            self.capture_stats.invalid_headers += len(reading.invalid)
        duration_ns = max(call.t_end - call.t0, 0)
        tags, dropped = merged(self.default_tags, baggage_tags(call.context), call.tags)
        if dropped:
            self.capture_stats.tags_dropped += dropped
        row = call_row(
            receipt_id=reading.receipt_id,
            started_us=call.started_ns // 1000,
            duration_ms=duration_ns / 1e6,  # a response read before the transport returned: can be days
            ttft_ms=(call.t_first - call.t0) / 1e6 if facts.is_sse and call.t_first else None,
            service=self.service_name,
            workload=call.workload or baggage_workload(call.context) or self.default_workload,
            operation=call.operation,
            server_address=host,
            status=call.status_code,
            error=call.error,
            error_code=facts.error_code,
            requested_model=facts.requested_model,
            routed_to=reading.routed_to,
            tier=reading.tier,
            region=reading.region,
            energy_j=facts.energy_j,
            carbon_mg=facts.carbon_mg,
            input_tokens=facts.input_tokens,
            output_tokens=facts.output_tokens,
            stream=facts.stream,
            trace_id=call.trace_id,
            span_id=call.span_id,
            provider=call.provider or facts.provider,
            tags=tags,
        )
        if not self.recent.fresh(row):
            return None
        if record:
            self.recorder.record_row(row)
        if self.events_logger is not None:
            self._emit_event(row, call)
        return row

    def _emit_event(self, row: LedgerRow, call: CallRecord) -> None:
        """The call event of ``row``: one OTLP log record, linked to the call's span when there is one."""
        ctx = None
        if call.trace_id and call.span_id:
            span_context = SpanContext(call.trace_id, call.span_id, is_remote=False, trace_flags=_SAMPLED)
            ctx = trace.set_span_in_context(NonRecordingSpan(span_context))
        try:
            self.events_logger.emit(
                timestamp=call.started_ns, context=ctx, event_name=EVENT_NAME, attributes=event_attributes(row)
            )
        except Exception:
            self.capture_stats.internal_error("sending a call event")
