"""joule-otel's own CPU per call, in one process: calls switched on and off in turn, per-thread CPU clocks."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import (
    COST,
    COST_MODES,
    PEERS,
    RECORDS_PER_CALL,
    TARGETS,
    ask,
    importable,
    reply,
    start_simulator,
    stop_clients,
)
from bench_sdk import sdk_floor


def own_cost(calls: int) -> list[list[dict[str, object]]]:
    """Each instrumentation's CPU per call, app thread and background thread apart, in three kinds of app."""
    per_turn = {"sync": 10, "async": 10, "stream": 3}
    turns = {"sync": max(3, calls // 15), "async": max(3, calls // 15), "stream": max(3, calls // 30)}
    sim, base_url = start_simulator()
    modes = [m for m in COST_MODES if m not in PEERS or importable(PEERS[m])]
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
                if reply(procs[mode]) != "ready":
                    raise RuntimeError(f"the {mode} cost client did not start")
            for kind in ("sync", "async", "stream"):
                found: dict[str, list[tuple[int, int]]] = {m: [] for m in modes}
                for turn in range(turns[kind]):
                    shift = turn % len(modes)
                    for mode in modes[shift:] + modes[:shift]:
                        found[mode] += json.loads(ask(procs[mode], f"pairs {kind} {per_turn[kind]} {turn % 2}"))
                for mode in modes:
                    report = json.loads(ask(procs[mode], "background"))
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
        stop_clients(procs)
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
