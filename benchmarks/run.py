"""joule-otel benchmarks: what instrumenting costs, how fast the ledger and dashboard are.

    python benchmarks/run.py            # default run, a few minutes
    python benchmarks/run.py --full     # adds the 10M-row dashboard case
    python benchmarks/run.py --huge     # and the 100M-row one (about 10 GB of disk)

Everything is measured side by side in one run and reported as ratios too: the machine is shared
and noisy, so absolute figures vary between runs while ratios hold. The simulator runs in its own
process, so its CPU never counts against the client being measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

CLIENT = HERE / "overhead_client.py"


COST = HERE / "cost_client.py"


INSTRUCTIONS = HERE / "instructions_client.py"


PEER_INSTRUCTIONS = HERE / "peer_instructions_client.py"


COST_MODES = {
    "ledger": "joule-otel: ledger only (no MeterProvider)",
    "ecologits": "EcoLogits (peer; estimates, no telemetry)",
    "energy": "joule-otel: ledger + joule.* metrics (JOULE_OTEL_METRICS=energy)",
    "metrics": "joule-otel: ledger + all metrics",
    "openai-v2-metrics": "OTel openai-v2 instrumentation (peer), MeterProvider, no tracer",
    "traced": "joule-otel: spans + metrics + ledger, over OTel httpx spans",
    "openai-v2": "OTel openai-v2 instrumentation (peer), over OTel httpx spans",
}
TARGETS = (
    ("ledger", "ecologits", "ledger only vs EcoLogits"),
    ("metrics", "openai-v2-metrics", "all metrics vs openai-v2 with a MeterProvider"),
    ("traced", "openai-v2", "traced vs openai-v2 traced"),
)
"""(joule-otel mode, the peer that records as much, what is compared)."""
RECORDS_PER_CALL = {"ledger": 0, "energy": 1, "metrics": 4, "traced": 4}
"""Histogram records the metric contract asks per call (energy; duration, input and output tokens); counters are
summed and added once a second, which is not a per-call cost."""


def own_cost(calls: int) -> list[list[dict[str, object]]]:
    """Each instrumentation's CPU per call, app thread and background thread apart, in three kinds of app."""
    per_turn = {"sync": 10, "async": 10, "stream": 3}
    turns = {"sync": max(3, calls // 15), "async": max(3, calls // 15), "stream": max(3, calls // 30)}
    sim, base_url = start_simulator()
    modes = [m for m in COST_MODES if m not in PEERS or _importable(PEERS[m])]
    for mode in set(COST_MODES) - set(modes):
        print(f"({COST_MODES[mode]}: not installed, skipped; pip install -e '.[bench]')", file=sys.stderr)
    rows: list[dict[str, object]] = []
    fixed_runs: dict[str, list[int]] = {}
    procs: dict[str, subprocess.Popen[str]] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            script = COST
            for mode in modes:
                procs[mode] = subprocess.Popen(
                    [sys.executable, str(script), base_url, str(Path(tmp) / f"{mode}.duckdb"), mode],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
                if _reply(procs[mode]) != "ready":
                    raise RuntimeError(f"the {mode} cost client did not start")
            for kind in ("sync", "async", "stream"):
                found: dict[str, list[tuple[int, int]]] = {m: [] for m in modes}
                for turn in range(turns[kind]):
                    shift = turn % len(modes)
                    for mode in modes[shift:] + modes[:shift]:
                        found[mode] += json.loads(_ask(procs[mode], f"pairs {kind} {per_turn[kind]} {turn % 2}"))
                for mode in modes:
                    report = json.loads(_ask(procs[mode], "background"))
                    background_ns = report["ns"]
                    for name, (count, ns) in (report["fixed"] or {}).items():
                        fixed_runs.setdefault(name, [0, 0])
                        fixed_runs[name][0] += count
                        fixed_runs[name][1] += ns
                    off = statistics.median(b for _, b in found[mode]) / 1e3
                    delta = statistics.median(a - b for a, b in found[mode]) / 1e3
                    background = background_ns / len(found[mode]) / 1e3
                    rows.append(
                        {
                            "call": kind,
                            "mode": mode,
                            "instrumentation": COST_MODES[mode],
                            "app thread without µs": off,
                            "app thread Δ µs": delta,
                            "other threads µs": background,
                            "total µs/call": delta + background,
                            "vs app thread without": f"{(delta + background) / off:+.1%}",
                        }
                    )
    finally:
        _stop_clients(procs)
        sim.terminate()
        sim.wait()
    record_us = sdk_floor(2_000)[1]["µs"]  # a record as joule-otel makes it
    by = {(r["call"], r["mode"]): r for r in rows}
    targets = []
    for kind in ("sync", "async", "stream"):
        for mine, peer, what in TARGETS:
            if (kind, mine) not in by or (kind, peer) not in by:
                continue
            mine_total, peer_total = by[kind, mine]["total µs/call"], by[kind, peer]["total µs/call"]
            sdk_us = RECORDS_PER_CALL[mine] * float(record_us)  # type: ignore[arg-type]
            targets.append(
                {
                    "call": kind,
                    "comparison": what,
                    "joule-otel µs": mine_total,
                    "peer µs": peer_total,
                    "cheaper": "yes" if mine_total < peer_total else "no",
                    "own work beyond SDK records µs (≤ 100)": float(mine_total) - sdk_us,  # type: ignore[arg-type]
                    "app thread µs (≤ 30)": by[kind, mine]["app thread Δ µs"],
                }
            )
    for row in rows:
        del row["mode"]
    fixed = [
        {
            "background work": f"{name}s ({what})",
            "runs": count,
            "CPU ms each": ns / count / 1e6,
        }
        for name, what in (
            ("segment", "one a second while calls flow, per process"),
            ("compaction", "one per 30 s interval, for all processes of a ledger; every thread"),
        )
        for count, ns in [fixed_runs.get(name, [0, 0])]
        if count
    ]
    return [rows, targets, fixed]


PEERS = {
    "ecologits": "ecologits",
    "openai-v2": "opentelemetry.instrumentation.openai_v2",
    "openai-v2-metrics": "opentelemetry.instrumentation.openai_v2",
}


def app_instructions(calls: int) -> list[dict[str, object]]:
    """Instructions per plain httpx2 call, counted by callgrind: the app's thread with and without capture, and the
    background's work on one call.

    Unlike CPU time, an instruction count does not move with the machine's load or speed, so small changes to
    joule-otel's work show up here first. Needs Valgrind (``apt-get install valgrind``); skipped without it.
    """
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("(instructions: valgrind not installed, skipped)", file=sys.stderr)
        return []
    sim, base_url = start_simulator()
    counts: dict[str, int] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:

            def run(mode: str, *options: str) -> subprocess.Popen[bytes]:
                return subprocess.Popen(
                    [
                        "valgrind",
                        "--tool=callgrind",
                        "--instr-atstart=no",
                        *options,
                        f"--callgrind-out-file={tmp}/{mode}.out",
                        sys.executable,
                        str(INSTRUCTIONS),
                        base_url,
                        str(Path(tmp) / f"{mode}.duckdb"),
                        mode,
                        str(calls),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    env={**os.environ, "PYTHONHASHSEED": "0"},  # the same dict layouts from run to run
                )

            procs = {mode: run(mode, "--separate-threads=yes") for mode in ("off", "on")}
            for mode, proc in procs.items():
                if proc.wait(timeout=1800) != 0:
                    raise RuntimeError(f"the {mode} instructions client failed under valgrind")
                counts[mode] = _callgrind_total(Path(tmp) / f"{mode}.out-01")  # the app's thread
            if run("drain").wait(timeout=1800) != 0:
                raise RuntimeError("the drain instructions client failed under valgrind")
            counts["drain"] = _callgrind_total(Path(tmp) / "drain.out") - _callgrind_total(
                Path(tmp) / "drain.out.1"
            )  # less an empty window
    finally:
        sim.terminate()
        sim.wait()
    off, on, drained = counts["off"] / calls, counts["on"] / calls, counts["drain"] / calls
    return [
        {"per httpx2 call": "app thread without capture", "instructions": f"{off:,.0f}", "of the call": ""},
        {
            "per httpx2 call": "app thread with joule_otel.instrument() (ledger only)",
            "instructions": f"{on:,.0f}",
            "of the call": "",
        },
        {
            "per httpx2 call": "joule-otel's share of the app thread",
            "instructions": f"{on - off:+,.0f}",
            "of the call": f"{(on - off) / off:+.1%}",
        },
        {
            "per httpx2 call": "background thread: parsing and the row (one drain of them all)",
            "instructions": f"{drained:,.0f}",
            "of the call": f"{drained / off:.1%}",
        },
    ]


def peer_instructions(calls: int) -> list[dict[str, object]]:
    """Instructions per openai SDK call, every thread, for each setting of joule-otel and the peer that records as
    much: the cost targets' comparison in a unit the machine's load does not move (callgrind; skipped without it).

    Each mode runs in its own process under callgrind, two at a time; see ``peer_instructions_client.py`` for what a
    window holds (the calls, and what the instrumentation owes for them: drains, metric records, one segment).
    """
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("(instructions: valgrind not installed, skipped)", file=sys.stderr)
        return []
    modes = ["bare", "record", "direct"] + [m for m in COST_MODES if m not in PEERS or _importable(PEERS[m])]
    sim, base_url = start_simulator()
    counts: dict[str, float] = {}
    segments: list[int] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:

            def run(mode: str) -> subprocess.Popen[bytes]:
                return subprocess.Popen(
                    [
                        "valgrind",
                        "--tool=callgrind",
                        "--instr-atstart=no",
                        f"--callgrind-out-file={tmp}/{mode}.out",
                        sys.executable,
                        str(PEER_INSTRUCTIONS),
                        base_url,
                        str(Path(tmp) / f"{mode}.duckdb"),
                        mode,
                        str(calls),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    env={**os.environ, "PYTHONHASHSEED": "0"},
                )

            for i in range(0, len(modes), 2):
                procs = {mode: run(mode) for mode in modes[i : i + 2]}
                for mode, proc in procs.items():
                    if proc.wait(timeout=1800) != 0:
                        raise RuntimeError(f"the {mode} peer instructions client failed under valgrind")
                    out = Path(tmp) / f"{mode}.out"
                    calls_window = out.with_name(f"{mode}.out.1")  # joule-otel's calls, dumped before its segment
                    if calls_window.exists():
                        counts[mode] = _callgrind_total(calls_window) / calls
                        segments.append(_callgrind_total(out))
                    else:
                        counts[mode] = _callgrind_total(out) / calls
    finally:
        sim.terminate()
        sim.wait()
    bare, record, direct = counts.pop("bare"), counts.pop("record"), counts.pop("direct")
    rows: list[dict[str, object]] = [
        {"comparison": "the openai SDK call alone", "joule-otel": f"{bare:,.0f}", "peer": "", "ratio": ""}
    ]
    for joule, peer, what in TARGETS:
        if joule in counts and peer in counts:
            ours, theirs = counts[joule] - bare, counts[peer] - bare
            rows.append(
                {
                    "comparison": what,
                    "joule-otel": f"{ours:+,.0f}",
                    "peer": f"{theirs:+,.0f}",
                    "ratio": f"{ours / theirs:.2f}",
                }
            )
    rows += [
        {
            "comparison": "one OpenTelemetry SDK histogram record, 8 attributes: `record`, as openai-v2 makes it",
            "joule-otel": f"{record:,.0f}",
            "peer": "",
            "ratio": "",
        },
        {
            "comparison": "the same record as joule-otel makes it (to the SDK's storage, attributes not cleaned again)",
            "joule-otel": f"{direct:,.0f}",
            "peer": "",
            "ratio": f"{direct / record:.2f}",
        },
    ]
    if "energy" in counts:
        rows.append(
            {
                "comparison": "ledger + joule.* metrics (JOULE_OTEL_METRICS=energy)",
                "joule-otel": f"{counts['energy'] - bare:+,.0f}",
                "peer": "",
                "ratio": "",
            }
        )
    if segments:
        rows.append(
            {
                "comparison": f"once a second, not a call: a ledger segment of {calls} rows (Arrow, Parquet file)",
                "joule-otel": f"{statistics.median(segments):,.0f}",
                "peer": "",
                "ratio": "",
            }
        )
    return rows


def _callgrind_total(path: Path) -> int:
    """The instruction count callgrind wrote for a process (every thread: one file)."""
    return int(next(line for line in path.read_text().splitlines() if line.startswith("totals:")).split()[1])


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def start_simulator() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "joule_otel._cli", "simulate", "--port", "0", "--token-delay", "0", "--latency", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    base_url = proc.stdout.readline().split()[4]
    time.sleep(0.5)
    return proc, base_url


def overhead(calls: int, rounds: int) -> list[dict[str, object]]:
    """Per-call latency and total process CPU for each variant: one process per variant, blocks taken in turn."""
    variants = ["bare", "otel-httpx", "joule-traced", "joule-untraced", "joule-ledger"]
    block = {"sync": 20, "stream": 5, "async": 20}
    per_variant = {"sync": calls * rounds, "stream": calls * rounds // 6, "async": calls * rounds}
    sim, base_url = start_simulator()
    results: dict[str, dict[str, dict[str, Any]]] = {v: {} for v in variants}
    procs: dict[str, subprocess.Popen[str]] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            procs = _start_clients(variants, base_url, Path(tmp))
            for kind in ("sync", "stream", "async"):
                blocks = max(2, per_variant[kind] // block[kind])
                for b in range(blocks):
                    shift = b % len(variants)  # each variant takes every position in the turn as often
                    for variant in variants[shift:] + variants[:shift]:
                        data = json.loads(_ask(procs[variant], f"block {kind} {block[kind]}"))
                        slot = results[variant].setdefault(kind, {"lat": [], "ttft": [], "n": 0})
                        slot["lat"] += data["lat"]
                        slot["ttft"] += [t for t in data["ttft"] if t is not None]
                        slot["n"] += len(data["lat"])
                for variant in variants:
                    results[variant][kind]["cpu"] = json.loads(_ask(procs[variant], "end"))["cpu"]
    finally:
        _stop_clients(procs)
        sim.terminate()
        sim.wait()
    rows = []
    for kind in ("sync", "stream", "async"):
        cpu = {v: results[v][kind]["cpu"] / results[v][kind]["n"] for v in variants}
        for variant in variants:
            slot = results[variant][kind]
            rows.append(
                {
                    "call": kind,
                    "variant": variant,
                    "median ms": statistics.median(slot["lat"]) * 1000,
                    "p99 ms": _pct(slot["lat"], 0.99) * 1000,
                    "ttft ms": statistics.median(slot["ttft"]) * 1000 if slot["ttft"] else None,
                    "CPU ms/call": cpu[variant] * 1000,
                    "Δ CPU vs bare ms": (cpu[variant] - cpu["bare"]) * 1000,
                    "CPU vs otel-httpx": f"{cpu[variant] / cpu['otel-httpx'] - 1:+.1%}",
                }
            )
    return rows


def _start_clients(variants: list[str], base_url: str, tmp: Path) -> dict[str, subprocess.Popen[str]]:
    """One client process per variant, set up and warmed up, waiting for commands."""
    script = CLIENT
    procs = {}
    for variant in variants:
        procs[variant] = subprocess.Popen(
            [sys.executable, str(script), variant, base_url, str(tmp / f"{variant}.duckdb")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        if _reply(procs[variant]) != "ready":
            raise RuntimeError(f"the {variant} benchmark client did not start")
    return procs


def _stop_clients(procs: dict[str, subprocess.Popen[str]]) -> None:
    for proc in procs.values():
        with contextlib.suppress(Exception):
            proc.stdin.close()  # type: ignore[union-attr]
            proc.wait(timeout=60)


def _ask(proc: subprocess.Popen[str], command: str) -> str:
    assert proc.stdin is not None
    proc.stdin.write(command + "\n")
    proc.stdin.flush()
    return _reply(proc)


def _reply(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"a benchmark client exited early (code {proc.wait()})")
    return line.strip()


SEGMENTS_PER_COMPACTION = 5


def ledger_ingest(rows_total: int) -> list[dict[str, object]]:
    """Sustained rows/s from segments into the DuckDB file, bytes per row, RSS across the burst."""
    import psutil

    from joule_otel.dashboard._sample_data import generate
    from joule_otel.ledger._compact import compact
    from joule_otel.ledger._writer import LedgerWriter

    template = generate(calls=20_000)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "ingest.duckdb"
        writer = LedgerWriter(db)
        process = psutil.Process()
        rss: list[int] = []
        spool_s = compact_s = 0.0
        written = 0
        batch = 100_000
        while written < rows_total:
            rows = [
                (f"{r[0]}-{written + i}" if r[0] else None, *r[1:])
                for i, r in enumerate(template * (batch // len(template) + 1))
            ][:batch]
            t0 = time.perf_counter()
            writer.append(rows)
            writer.write_segment()
            spool_s += time.perf_counter() - t0
            written += batch
            if written % (batch * SEGMENTS_PER_COMPACTION) == 0 or written >= rows_total:
                # as in a running app: a segment per flush interval, a compaction every few segments
                t0 = time.perf_counter()
                compact(db, timeout_s=10)
                compact_s += time.perf_counter() - t0
                rss.append(process.memory_info().rss)
        size = db.stat().st_size
    out.append(
        {"measure": f"spool (Arrow → Parquet segment), {written:,} rows", "value": f"{written / spool_s:,.0f} rows/s"}
    )
    out.append(
        {
            "measure": f"compaction into DuckDB (receipts deduped), {written:,} rows, {SEGMENTS_PER_COMPACTION} segments a run",
            "value": f"{written / compact_s:,.0f} rows/s",
        }
    )
    out.append(
        {"measure": "end to end (spool + compaction)", "value": f"{written / (spool_s + compact_s):,.0f} rows/s"}
    )
    out.append({"measure": "bytes on disk per row (DuckDB file)", "value": f"{size / written:.1f} B"})
    out.append(
        {
            "measure": "RSS growth over the burst (after the first compaction)",
            "value": f"{(max(rss) - rss[0]) / 2**20:+.1f} MiB (from {rss[0] / 2**20:.0f} MiB)",
        }
    )
    return out


def dashboard(sizes: list[int]) -> list[dict[str, object]]:
    """Every dashboard query at each ledger size, and the whole page."""
    import duckdb

    from joule_otel.dashboard import _queries as queries
    from joule_otel.dashboard._sources import SAMPLE_PATH
    from joule_otel.ledger import _reader as reader
    from joule_otel.ledger import _schema as schema

    out = []
    plans: dict[str, str] = {}
    for size in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            db = Path(tmp) / "big.duckdb"
            with duckdb.connect(str(db)) as con:
                from joule_otel.ledger._schema import migrate

                migrate(con)
                # building 100 M rows in time order sorts them all: spill to disk, never take the machine's memory
                con.execute(f"SET memory_limit = '4GB'; SET temp_directory = '{tmp}/spill'")
                present = {
                    r[0] for r in con.execute(f"DESCRIBE SELECT * FROM read_parquet('{SAMPLE_PATH}')").fetchall()
                }
                cols = schema.select_list(present).replace("receipt_id", "receipt_id || '-' || k AS receipt_id", 1)
                sample_rows = con.execute(f"SELECT count(*) FROM read_parquet('{SAMPLE_PATH}')").fetchone()[0]
                copies = -(-size // sample_rows)
                # the sample's three weeks, denser: rows in time order, as a ledger fills up
                con.execute(
                    f"INSERT INTO inference_calls SELECT * FROM (SELECT {cols} FROM read_parquet('{SAMPLE_PATH}'), "
                    f"range({copies}) t(k) LIMIT {size}) ORDER BY started_at"
                )
                t0 = time.perf_counter()
                schema.rebuild_rollup(con)
                rollup_s = time.perf_counter() - t0
            with reader.connect(db) as con:
                opts = queries.options(con)
            filters = queries.Filters(start=opts["first"], end=opts["last"])
            as_of = filters.end
            budgets = {"batch-enrichment": 5e8, "support-bot": 1e9}
            steps = {
                "options": lambda c: queries.options(c),
                "kpis (+ previous period)": lambda c: queries.kpis(c, filters),
                "energy over time": lambda c: queries.energy_over_time(
                    c, filters, "workload", "1 day", "Europe/Helsinki"
                ),
                "breakdowns ×4": lambda c: [
                    queries.breakdown(c, filters, d) for d in ("workload", "model", "region", "tier")
                ],
                "treemap + router": lambda c: (queries.workload_model(c, filters), queries.router_flows(c, filters)),
                "efficiency + histogram": lambda c: (
                    queries.model_efficiency(c, filters),
                    queries.energy_histogram(c, filters),
                ),
                "carbon + savings": lambda c: (
                    queries.carbon_by_region(c, filters),
                    queries.carbon_savings(c, filters),
                ),
                "latency sample": lambda c: queries.latency_sample(c, filters),
                "budgets + burn": lambda c: (
                    queries.budget_status(c, filters, budgets, as_of),
                    queries.budget_burn(c, filters, list(budgets), as_of),
                ),
                "receipts page": lambda c: queries.receipts(c, filters, "rcpt_"),
                "migration (+ other providers' calls)": lambda c: (
                    queries.migration(c, filters, "1 day", "Europe/Helsinki"),
                    queries.other_provider_calls(c, filters),
                ),
                "what if (one choice)": lambda c: queries.what_if(c, filters, "support-bot", tier="batch"),
            }
            pages = []
            timings = {}
            for _ in range(2):  # the first page of a process also pays one-time set-up (timezone conversion)
                timings = {}
                page_start = time.perf_counter()
                with reader.connect(db) as con:
                    for name, step in steps.items():
                        t0 = time.perf_counter()
                        step(con)
                        timings[name] = time.perf_counter() - t0
                pages.append(time.perf_counter() - page_start)
            for name, seconds in timings.items():
                out.append({"rows": f"{size:,}", "query": name, "ms": seconds * 1000})
            out.append({"rows": f"{size:,}", "query": "WHOLE PAGE (open ledger + all queries)", "ms": pages[1] * 1000})
            out.append({"rows": f"{size:,}", "query": "first page of a fresh process", "ms": pages[0] * 1000})
            out.append({"rows": f"{size:,}", "query": "(rollup rebuild, once, at migration)", "ms": rollup_s * 1000})
            # the page as Streamlit runs it: every query, the charts, the widgets
            found = subprocess.run(
                [sys.executable, str(HERE / "dashboard_page.py"), str(db)],
                capture_output=True,
                text=True,
                check=True,
                timeout=1800,
            )
            app = json.loads(found.stdout.strip().splitlines()[-1])
            out.append(
                {"rows": f"{size:,}", "query": "APP PAGE, cold (a fresh process's first)", "ms": app["cold_s"] * 1000}
            )
            out.append(
                {"rows": f"{size:,}", "query": "APP PAGE, warm (data cache cleared)", "ms": app["warm_s"] * 1000}
            )
            out.append({"rows": f"{size:,}", "query": "app page, rerun within the cache", "ms": app["cached_s"] * 1000})
            if size == sizes[-1]:
                slowest = max(timings, key=lambda name: timings[name])
                with reader.connect(db) as con:
                    plans[f"{slowest} at {size:,} rows"] = _plan(con, steps[slowest])
    for title, plan in plans.items():
        print(f"### Query plan of the slowest query: {title}\n\n```\n{plan}\n```\n", flush=True)
    return out


class _Recorder:
    """A DuckDB connection that remembers every statement run through it."""

    def __init__(self, con: Any) -> None:
        self.con, self.statements = con, []

    def execute(self, sql: str, params: Any = None) -> Any:
        self.statements.append((sql, params))
        return self.con.execute(sql, params) if params is not None else self.con.execute(sql)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.con, name)


def _plan(con: Any, step: Any) -> str:
    """DuckDB's EXPLAIN ANALYZE of each query ``step`` runs on a fresh connection (a facts table's build included)."""
    import re

    recorder = _Recorder(con)
    step(recorder)
    plans = []
    for sql, params in recorder.statements:
        select = re.sub(r"^\s*CREATE TEMP TABLE IF NOT EXISTS \w+ AS ", "", sql)
        if select.lstrip().upper().startswith(("SELECT", "WITH")):
            plan = con.execute("EXPLAIN ANALYZE " + select, params or []).fetchall()[0][-1]
            took = re.search(r"Total Time: ([0-9.]+)s", plan)
            plans.append((float(took.group(1)) if took else 0.0, plan))
    return max(plans)[1] if plans else ""  # the slowest statement of the step


def budget_watch(budgets: int, workloads: int) -> list[dict[str, object]]:
    """The budget watch at scale: what a drain, a full check (after the ledger's minute read) and a gauge export cost."""
    from joule_otel._budget_watch import BudgetWatch, _with_workload_totals
    from joule_otel._budgets import Budget
    from joule_otel.ledger._row import LedgerRow

    watch = BudgetWatch([Budget(f"w{i}", 1e12) for i in range(budgets)], (0.8, 1.0), None)
    watch._ledger = _with_workload_totals({(f"w{i}", "api"): 1.0 for i in range(workloads)})
    now_us = time.time_ns() // 1000
    row = LedgerRow(*([None] * 22))._replace(started_at_us=now_us, energy_j=2.0, service="api")
    drain = [row._replace(workload=f"w{i * 37 % workloads}") for i in range(200)]

    def best(run: Any, repeat: int) -> float:
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        return min(times)

    label = f"{budgets:,} budgets × {workloads:,} workloads"
    return [
        {
            "case": label,
            "step": "a drain of 200 rows (every 50 ms while calls flow)",
            "ms": best(lambda: watch.observe(drain), 50) * 1000,
        },
        {
            "case": label,
            "step": "every budget checked (after the ledger's once-a-minute read)",
            "ms": best(watch.check, 5) * 1000,
        },
        {"case": label, "step": "the gauges' callback (each metric export)", "ms": best(watch.observations, 5) * 1000},
    ]


def sdk_floor(n: int) -> list[dict[str, object]]:
    """What the OpenTelemetry SDK charges for the telemetry the contracts ask of every call, measured alone.

    joule-otel's per-call cost cannot go below these: four histogram records (energy, duration, input and output
    tokens) with the metric attributes, and, when traced, the span attributes set on the HTTP client span.
    """
    from opentelemetry import context as otel_context
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider

    from joule_otel import _attributes as attr
    from joule_otel._direct_record import histogram_record

    meter = MeterProvider(metric_readers=[InMemoryMetricReader()]).get_meter("bench")
    histogram = meter.create_histogram("bench.histogram", unit="J")
    metric_attributes = {
        attr.JOULE_WORKLOAD: "support-bot",
        attr.GEN_AI_PROVIDER_NAME: "joule_cloud",
        attr.GEN_AI_OPERATION_NAME: "chat",
        attr.GEN_AI_REQUEST_MODEL: "auto",
        attr.GEN_AI_RESPONSE_MODEL: "llama-3.1-70b",
        attr.JOULE_TIER: "standard",
        attr.JOULE_REGION: "eu-fi",
    }
    span_attributes = {
        **metric_attributes,
        attr.JOULE_ENERGY: 123.4,
        attr.JOULE_CARBON: 8.9,
        attr.JOULE_RECEIPT_ID: "rcpt_0123456789abcdef01234567",
        attr.JOULE_ENERGY_SOURCE: "header",
    }
    tracer = TracerProvider().get_tracer("bench")
    no_span = otel_context.Context()

    def per_call_us(operation: Any) -> float:
        best = float("inf")
        for _ in range(5):  # the least disturbed of five runs
            t0 = time.thread_time_ns()
            for _ in range(n):
                operation()
            best = min(best, (time.thread_time_ns() - t0) / n / 1e3)
        return best

    def set_attributes_us() -> float:
        best = float("inf")
        for _ in range(5):
            spans = [tracer.start_span("bench") for _ in range(n)]  # open spans, as the HTTP client span is
            t0 = time.thread_time_ns()
            for span in spans:
                span.set_attributes(span_attributes)
            best = min(best, (time.thread_time_ns() - t0) / n / 1e3)
            for span in spans:
                span.end()
        return best

    record = per_call_us(lambda: histogram.record(1.5, metric_attributes, context=no_span))
    direct_record = histogram_record(histogram)
    direct = per_call_us(lambda: direct_record(1.5, metric_attributes, no_span))
    bare = per_call_us(lambda: tracer.start_span("bench").end())
    with_attributes = set_attributes_us()
    return [
        {"operation": "histogram.record, the 7 metric attributes", "µs": record},
        {"operation": "the same record as joule-otel makes it (attributes not cleaned again)", "µs": direct},
        {"operation": "histogram.record, no attributes", "µs": per_call_us(lambda: histogram.record(1.5))},
        {
            "operation": "× 4 records a call as joule-otel makes them (energy, duration, input and output tokens)",
            "µs": 4 * direct,
        },
        {"operation": "span.set_attributes, the 11 span attributes", "µs": with_attributes},
        {"operation": "(a bare span: start and end)", "µs": bare},
    ]


def growth(counts: list[int]) -> list[dict[str, object]]:
    """CPU per call of joule-otel (ledger + metrics, no tracing) beside the bare SDK, as the calls (and the ledger) grow."""
    variants = ["bare", "joule-untraced"]
    sim, base_url = start_simulator()
    rows: list[dict[str, object]] = []
    procs: dict[str, subprocess.Popen[str]] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            procs = _start_clients(variants, base_url, Path(tmp))
            done = 0
            for n in counts:
                first = done + 1
                while done < n:
                    for variant in variants:
                        _ask(procs[variant], "block sync 20")
                    done += 20
                cpu = {v: json.loads(_ask(procs[v], "end"))["cpu"] / (done - first + 1) * 1000 for v in variants}
                rows.append(
                    {
                        "calls": f"{first:,}–{done:,}",
                        "bare CPU ms/call": cpu["bare"],
                        "joule-otel CPU ms/call": cpu["joule-untraced"],
                        "Δ ms/call": cpu["joule-untraced"] - cpu["bare"],
                    }
                )
    finally:
        _stop_clients(procs)
        sim.terminate()
        sim.wait()
    return rows


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
                {"measure": "request latency at 1 000 calls/s, p99", "figure": f"{_pct(latencies, 0.99) * 1000:.1f} ms"}
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


def table(rows: list[dict[str, object]]) -> str:
    if not rows:
        return ""
    headers = list(rows[0])

    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.3f}" if abs(value) < 10 else f"{value:,.1f}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(r[h]) for h in headers) + " |" for r in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="add the 10M-row dashboard case and 1M ingest rows")
    parser.add_argument("--huge", action="store_true", help="add the 100M-row dashboard case (~10 GB of disk)")
    parser.add_argument("--calls", type=int, default=300, help="sync/async calls per variant per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=[], help="sections whose title has one of these words")
    args = parser.parse_args()
    os.environ.setdefault("OTEL_SDK_DISABLED", "false")
    sections = [
        (
            "Per-call overhead (openai SDK → simulator on loopback; CPU = whole process incl. background threads)",
            lambda: overhead(args.calls, args.rounds),
        ),
        (
            "joule-otel's own CPU per call (in one process: calls switched on and off in turn, per-thread CPU clocks)",
            lambda: own_cost(args.calls * 2),
        ),
        (
            "Instructions per call, app thread and background (callgrind; deterministic where CPU clocks are noisy)",
            lambda: app_instructions(200),
        ),
        (
            "Instructions per openai call against the peers (callgrind, every thread; the cost targets' ratios)",
            lambda: peer_instructions(200),
        ),
        ("OpenTelemetry SDK floor (alone, the least disturbed of 5 runs)", lambda: sdk_floor(5_000)),
        ("Ledger ingest", lambda: ledger_ingest(1_000_000)),
        (
            "Dashboard queries and the whole page",
            lambda: dashboard(
                [100_000, 1_000_000]
                + ([10_000_000] if args.full or args.huge else [])
                + ([100_000_000] if args.huge else [])
            ),
        ),
        ("Growth", lambda: growth([200, 1000, 3000, 5000])),
        ("Budget watch at scale", lambda: budget_watch(10_000, 10_000)),
        ("joule-otel collect (OTLP/HTTP protobuf in, ledger out)", lambda: collect_ingest(10.0)),
    ]
    report = [f"# joule-otel benchmarks ({time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores)\n"]
    for title, run in sections:
        if args.only and not any(word in title.lower() for word in args.only):
            continue
        found = run()
        tables = found if found and isinstance(found[0], list) else [found]
        report.append(f"## {title}\n\n" + "\n".join(table(rows) for rows in tables) + "\n")
        print(report[-1], flush=True)
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    (results / "latest.md").write_text("\n".join(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
