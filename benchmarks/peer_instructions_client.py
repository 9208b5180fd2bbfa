"""Instructions per openai call, every thread of the process, for joule-otel and the peers: a side-by-side figure
that neither the machine's load nor its speed moves.

Run under callgrind by run.py: ``peer_instructions_client.py BASE_URL DB MODE CALLS``, with MODE ``bare`` (the SDK
alone) or one of the cost client's modes (``ledger``, ``ecologits``, ``metrics``, ``openai-v2-metrics``, ``traced``,
``openai-v2``). The same openai SDK calls as the cost client's are counted, on every thread, together with what the
instrumentation owes for them before the window closes: joule-otel's drains of the calls (the worker wakes once
:data:`CALLS_A_DRAIN` calls wait, about what a 50 ms drain interval collects from a sync app here), its metric
records, and, when traced, the span processor's export of the window's spans. What is paid once a second whatever the
call rate is counted apart, as the cost benchmark times it apart: the window's ledger segment (its rows' Arrow
conversion and Parquet file) in a second window, dumped after the first. Compaction into the DuckDB file, once an
interval for every process of a ledger, is left out.

MODE ``record`` counts what the metric contract's records cost the OpenTelemetry SDK alone: ``CALLS`` records of one
histogram, with the attributes joule-otel gives a token-usage record of a usual call (the SDK cleans and hashes them
on every record). MODE ``direct`` counts the same records made as joule-otel makes them (``joule_otel._direct_record``:
handed to the SDK's storage without the SDK cleaning the prebuilt attribute set again).

Counting is switched on (``callgrind_control``) only around the measured calls, after a warm-up, with the garbage
collector off in every mode alike.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from typing import Any

from cost_client import JOULE_METRICS, PEER_MODES, TRACED_MODES, peer_switch, set_up_providers

CALLS_A_DRAIN = 10


def _callgrind(*args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(os.getpid())], check=True, capture_output=True)


def main() -> None:
    base_url, db, mode, calls = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    if mode in ("record", "direct"):
        sdk_records(calls, direct=mode == "direct")
        return
    set_up_providers(mode)
    import openai

    joule = mode in JOULE_METRICS
    if joule:
        import joule_otel
        from joule_otel import _pipeline

        # Valgrind slows the process fifty-fold and the drain interval is wall-clock time: wake by count instead,
        # so that a drain holds as many calls as it does at full speed
        _pipeline.DRAIN_INTERVAL_S = 1e9
        _pipeline.WAKE_AT = CALLS_A_DRAIN
        joule_otel.instrument(db=db, metrics=JOULE_METRICS[mode], flush_interval=60)
        state: Any = joule_otel._instrument._state
        state.pipeline.flush_interval_s = 1e9  # segments and counter sums at settle() only: once for the window
        state.pipeline.writer.compact_interval_s = 1e9
        writer_type = type(state.pipeline.writer)
        write_segment = writer_type.write_segment
        held = {"segments": False}

        def deferred_segment(self: Any) -> bool:
            return True if held["segments"] else write_segment(self)

        writer_type.write_segment = deferred_segment
    elif mode in PEER_MODES:
        peer_switch(mode)
    client = openai.OpenAI(base_url=base_url, api_key="jc_bench", max_retries=0)
    request: dict[str, Any] = {
        "model": "auto",
        "messages": [{"role": "user", "content": "hi"}],
        "service_tier": "priority",  # as in the cost client: EcoLogits accepts only OpenAI's tier names
        "max_tokens": 20,
    }

    def settle() -> None:
        """What the instrumentation owes for the calls made so far, paid now."""
        if joule:
            # False while segments are held: the rows wait in the writer, on purpose
            assert joule_otel.flush(timeout_s=600) or held["segments"]
        if mode in TRACED_MODES:
            from opentelemetry import trace

            trace.get_tracer_provider().force_flush()  # type: ignore[attr-defined]

    for _ in range(30):
        client.chat.completions.create(**request)
    settle()
    gc.collect()
    gc.disable()
    if joule:
        held["segments"] = True  # the window's rows wait in the writer, for the second window
    _callgrind("--instr=on")
    for _ in range(calls):
        client.chat.completions.create(**request)
    settle()
    _callgrind("--instr=off")
    if joule:
        _callgrind("--dump=calls")
        held["segments"] = False
        pending = state.pipeline.writer.stats.pending_rows
        assert pending == calls, f"{pending} rows of {calls} calls wait for the segment"
        _callgrind("--instr=on")
        assert state.pipeline.writer.write_segment()
        _callgrind("--instr=off")
    sys.stdout.flush()
    os._exit(0)  # the counts are written as callgrind's process ends; nothing else of this process matters


def sdk_records(records: int, *, direct: bool) -> None:
    """Count ``records`` SDK histogram records with the attributes of a usual call's token-usage record."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from joule_otel._direct_record import histogram_record
    from joule_otel._metrics import MetricRecorder

    provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    histogram = provider.get_meter("bench").create_histogram("gen_ai.client.token.usage", unit="{token}")
    recorder = MetricRecorder(None, provider, mode="all", max_workloads=100)
    key = ("support-bot", "chat", "joule_cloud", "auto", "gpt-oss-20b", "standard", "eu-fi", None)
    attributes = recorder._token_attributes(key, "input")
    record = (
        histogram_record(histogram)
        if direct
        else lambda value, attributes, context: histogram.record(value, attributes)
    )
    for _ in range(100):
        record(12, attributes, None)
    gc.collect()
    gc.disable()
    _callgrind("--instr=on")
    for _ in range(records):
        record(12, attributes, None)
    _callgrind("--instr=off")
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
