"""Instructions per call under callgrind (deterministic where CPU clocks are noisy), and against the peers."""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import (
    COST_MODES,
    INSTRUCTIONS,
    PEER_INSTRUCTIONS,
    PEERS,
    TARGETS,
    callgrind_total,
    importable,
    start_simulator,
)


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
                counts[mode] = callgrind_total(Path(tmp) / f"{mode}.out-01")  # the app's thread
            if run("drain").wait(timeout=1800) != 0:
                raise RuntimeError("the drain instructions client failed under valgrind")
            counts["drain"] = callgrind_total(Path(tmp) / "drain.out") - callgrind_total(
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
    modes = ["bare", "record", "direct"] + [m for m in COST_MODES if m not in PEERS or importable(PEERS[m])]
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
                        counts[mode] = callgrind_total(calls_window) / calls
                        segments.append(callgrind_total(out))
                    else:
                        counts[mode] = callgrind_total(out) / calls
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
