"""Per-call overhead through the openai SDK against the simulator on loopback, whole-process CPU."""

from __future__ import annotations

import json
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from _common import ask, pct, start_clients, start_simulator, stop_clients


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
            procs = start_clients(variants, base_url, Path(tmp))
            for kind in ("sync", "stream", "async"):
                blocks = max(2, per_variant[kind] // block[kind])
                for b in range(blocks):
                    shift = b % len(variants)  # each variant takes every position in the turn as often
                    for variant in variants[shift:] + variants[:shift]:
                        data = json.loads(ask(procs[variant], f"block {kind} {block[kind]}"))
                        slot = results[variant].setdefault(kind, {"lat": [], "ttft": [], "n": 0})
                        slot["lat"] += data["lat"]
                        slot["ttft"] += [t for t in data["ttft"] if t is not None]
                        slot["n"] += len(data["lat"])
                for variant in variants:
                    results[variant][kind]["cpu"] = json.loads(ask(procs[variant], "end"))["cpu"]
    finally:
        stop_clients(procs)
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
                    "p99 ms": pct(slot["lat"], 0.99) * 1000,
                    "ttft ms": statistics.median(slot["ttft"]) * 1000 if slot["ttft"] else None,
                    "CPU ms/call": cpu[variant] * 1000,
                    "Δ CPU vs bare ms": (cpu[variant] - cpu["bare"]) * 1000,
                    "CPU vs otel-httpx": f"{cpu[variant] / cpu['otel-httpx'] - 1:+.1%}",
                }
            )
    return rows
