"""One instrumentation's own cost per call, measured inside one process; driven by run.py over stdin/stdout.

Run as a script: ``cost_client.py BASE_URL DB MODE``. Pairs of neighbouring calls are made with the
instrumentation switched on and off (everything else stays: the SDK providers and, when traced,
OpenTelemetry's httpx span instrumentation); the median of the pairs' differences is the app thread's
cost. Every other thread of the process (joule-otel's worker, DuckDB's threads, span processors) is
counted too: the process's CPU minus the app thread's, over a kind of call, spread over the calls
made with the instrumentation on. Segments and compactions, which happen once a second or once an
interval whatever the call rate, are timed apart: compaction in a quiet moment, on the process clock.
"""

from __future__ import annotations

import asyncio
import gc
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PEER_MODES = ("ecologits", "openai-v2", "openai-v2-metrics")
TRACED_MODES = ("traced", "openai-v2")
METRIC_MODES = ("energy", "metrics", "traced", "openai-v2", "openai-v2-metrics")
JOULE_METRICS = {"ledger": "all", "energy": "energy", "metrics": "all", "traced": "all"}


def set_up_providers(mode: str) -> None:
    """What the app configured: a MeterProvider for the metric modes, a TracerProvider and httpx spans when traced."""
    if mode in METRIC_MODES:
        from opentelemetry import metrics
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader

        metrics.set_meter_provider(MeterProvider(metric_readers=[InMemoryMetricReader()]))
    if mode in TRACED_MODES:
        from opentelemetry import trace
        from opentelemetry.instrumentation.httpx import HTTPX2ClientInstrumentor
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

        class Drop(SpanExporter):
            def export(self, spans: Any) -> SpanExportResult:
                return SpanExportResult.SUCCESS

        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(Drop()))
        trace.set_tracer_provider(provider)
        HTTPX2ClientInstrumentor().instrument()  # the baseline: HTTP client spans on every call, always


def peer_switch(mode: str) -> Callable[[bool], None]:
    """Instrument a peer and return how to switch it: swapping the methods it wrapped."""
    from openai.resources.chat import completions

    slots = [(completions.Completions, "create"), (completions.AsyncCompletions, "create")]
    before = [cls.__dict__[name] for cls, name in slots]
    if mode == "ecologits":
        from ecologits import EcoLogits

        EcoLogits.init(providers=["openai"])
    else:
        from opentelemetry.instrumentation.openai_v2 import OpenAIInstrumentor

        OpenAIInstrumentor().instrument()
    after = [cls.__dict__[name] for cls, name in slots]

    def switch(on: bool) -> None:
        for (cls, name), off_method, on_method in zip(slots, before, after, strict=True):
            setattr(cls, name, on_method if on else off_method)

    return switch


def main() -> None:
    base_url, db, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    set_up_providers(mode)
    import httpx2
    import openai

    joule = mode not in PEER_MODES
    fixed = {"segment": [0, 0], "compaction": [0, 0]}
    if joule:
        import joule_otel
        from joule_otel import _instrument
        from joule_otel._capture import install, uninstall
        from joule_otel.ledger import _writer as ledger_writer
        from joule_otel.ledger._compact import compact

        write_segment = ledger_writer.LedgerWriter.write_segment

        def timed_segment(self: Any) -> bool:
            t0 = time.thread_time_ns()
            try:
                return write_segment(self)
            finally:
                fixed["segment"][0] += 1
                fixed["segment"][1] += time.thread_time_ns() - t0

        ledger_writer.LedgerWriter.write_segment = timed_segment  # type: ignore[method-assign]
        joule_otel.instrument(db=db, metrics=JOULE_METRICS[mode])
        state = _instrument._state
        assert state is not None and state.pipeline.writer is not None
        state.pipeline.writer.compact_interval_s = 1e9  # compactions are timed apart, in a quiet moment
        capture = state.capture

        def switch(on: bool) -> None:
            (install if on else uninstall)(capture, httpx2)
    else:
        switch = peer_switch(mode)

    client = openai.OpenAI(base_url=base_url, api_key="jc_bench", max_retries=0)
    aclient = openai.AsyncOpenAI(base_url=base_url, api_key="jc_bench", max_retries=0)
    # service_tier "priority": EcoLogits rebuilds the response with validation, and OpenAI's SDK types allow
    # only OpenAI's tier names there (Joule's "standard" makes EcoLogits raise into the app)
    request: dict[str, Any] = {
        "model": "auto",
        "messages": [{"role": "user", "content": "hi"}],
        "service_tier": "priority",
    }
    for _ in range(100):
        client.chat.completions.create(max_tokens=20, **request)
    if joule:
        joule_otel.flush(timeout_s=60)
        compact(Path(db), timeout_s=30)  # the file exists and is current: steady state from here
    # the first full collection after start-up walks every object the imports made (30-70 ms here, more with pyarrow
    # and DuckDB loaded): a one-time cost of starting, whichever instrumentation, paid now in every mode alike rather
    # than on whichever calls happen to be measured when it comes
    gc.collect()
    state_on = {"on": True}
    loop = asyncio.new_event_loop()  # one loop for every async call: the async client's connections live on it

    def wrapped(on: bool) -> None:
        if on != state_on["on"]:
            switch(on)
            state_on["on"] = on

    async def one_async() -> int:
        t0 = time.thread_time_ns()
        await aclient.chat.completions.create(max_tokens=20, **request)
        return time.thread_time_ns() - t0

    def one(kind: str) -> int:
        if kind == "async":
            return loop.run_until_complete(one_async())
        t0 = time.thread_time_ns()
        if kind == "sync":
            client.chat.completions.create(max_tokens=20, **request)
        else:
            for _ in client.chat.completions.create(max_tokens=50, stream=True, **request):
                pass
        return time.thread_time_ns() - t0

    def pairs(kind: str, n: int, on_first: bool) -> list[tuple[int, int]]:
        # switched on and off call by call, so the two calls of a pair see the machine in the same state
        found = []
        for _ in range(n):
            wrapped(on_first)
            first = one(kind)
            wrapped(not on_first)
            second = one(kind)
            found.append((first, second) if on_first else (second, first))
            on_first = not on_first
        return found

    def clocks() -> tuple[int, int]:
        return time.process_time_ns(), time.thread_time_ns()

    print("ready", flush=True)
    process_start, main_start = clocks()
    for line in sys.stdin:
        command, *args = line.split()
        if command == "pairs":
            print(json.dumps(pairs(args[0], int(args[1]), args[2] == "1")), flush=True)
        elif command == "background":
            wrapped(True)
            if joule:
                joule_otel.flush(timeout_s=60)
            process_now, main_now = clocks()
            others = (process_now - process_start) - (main_now - main_start)
            report: dict[str, Any] = {"ns": others, "fixed": None}
            if joule:
                report["ns"] -= fixed["segment"][1]
                t0 = time.process_time_ns()  # the app is idle: the process clock is the compaction's, all threads
                compact(Path(db), timeout_s=30)
                fixed["compaction"][0] += 1
                fixed["compaction"][1] += time.process_time_ns() - t0
                report["fixed"] = fixed
                fixed = {name: [0, 0] for name in fixed}
            print(json.dumps(report), flush=True)
            process_start, main_start = clocks()
        else:
            break


if __name__ == "__main__":
    main()
