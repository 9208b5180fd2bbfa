"""One end-to-end benchmark client (a variant of instrumentation), driven by run.py over stdin/stdout.

Run as a script: ``overhead_client.py VARIANT BASE_URL DB``.
"""

import asyncio
import json
import resource
import sys
import time

variant, base_url, db = sys.argv[1], sys.argv[2], sys.argv[3]


def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of the process
    return usage.ru_utime + usage.ru_stime


tracer_provider = None
if variant in ("otel-httpx", "joule-traced"):
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class Drop(SpanExporter):  # spans go nowhere: an exporter's own cost is not what is measured
        def export(self, spans):
            return SpanExportResult.SUCCESS

    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(BatchSpanProcessor(Drop()))
    trace.set_tracer_provider(tracer_provider)
if variant in ("otel-httpx", "joule-traced", "joule-untraced"):  # joule-ledger: an app that configured no metrics
    # the httpx instrumentation records its own duration histogram once a MeterProvider is set: the baseline
    # has one too, so that cost is not put down to joule-otel
    from opentelemetry import metrics
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    metrics.set_meter_provider(MeterProvider(metric_readers=[InMemoryMetricReader()]))
if variant == "otel-httpx":
    from opentelemetry.instrumentation.httpx import HTTPX2ClientInstrumentor

    HTTPX2ClientInstrumentor().instrument()
if variant.startswith("joule"):
    import joule_otel

    joule_otel.instrument(db=db)

import openai

client = openai.OpenAI(base_url=base_url, api_key="jc_bench", max_retries=0)
aclient = openai.AsyncOpenAI(base_url=base_url, api_key="jc_bench", max_retries=0)
msgs = [{"role": "user", "content": "hi"}]
for _ in range(30):  # warm up connections, imports, caches
    client.chat.completions.create(model="auto", messages=msgs, max_tokens=20)
if variant.startswith("joule"):
    joule_otel.flush(timeout_s=60)  # the first segment imports pyarrow: a one-time cost, not a per-call one


def measure(kind, n):
    lat, ttft = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        if kind == "sync":
            client.chat.completions.create(model="auto", messages=msgs, max_tokens=20)
        elif kind == "stream":
            first = None
            for _chunk in client.chat.completions.create(model="auto", messages=msgs, max_tokens=200, stream=True):
                if first is None:
                    first = time.perf_counter() - t0
            ttft.append(first)
        lat.append(time.perf_counter() - t0)
    return lat, ttft


async def measure_async(n):
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        await aclient.chat.completions.create(model="auto", messages=msgs, max_tokens=20)
        lat.append(time.perf_counter() - t0)
    return lat, []


# the controller runs every variant's process a block at a time, in turn, so the shared machine's slow
# minutes fall on all variants alike; CPU is the whole process's from a kind's first block to its end, the
# background threads' lagging work included (a joule variant flushes at the end of a kind)
loop = asyncio.new_event_loop()  # one loop for every async block: the async client's connections live on it
print("ready", flush=True)
start = cpu()
for line in sys.stdin:
    command, _, arg = line.strip().partition(" ")
    if command == "block":
        kind, n = arg.split()
        lat, ttft = loop.run_until_complete(measure_async(int(n))) if kind == "async" else measure(kind, int(n))
        print(json.dumps({"lat": lat, "ttft": ttft}), flush=True)
    elif command == "end":
        if variant.startswith("joule"):
            joule_otel.flush(timeout_s=60)
        now = cpu()
        print(json.dumps({"cpu": now - start}), flush=True)
        start = now
    else:
        break
