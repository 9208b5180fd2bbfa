"""What every benchmark shares: the client scripts, the simulator in its own process, percentiles, tables."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


CLIENT = HERE / "overhead_client.py"


COST = HERE / "cost_client.py"


INSTRUCTIONS = HERE / "instructions_client.py"


PEER_INSTRUCTIONS = HERE / "peer_instructions_client.py"


def callgrind_total(path: Path) -> int:
    """The instruction count callgrind wrote for a process (every thread: one file)."""
    return int(next(line for line in path.read_text().splitlines() if line.startswith("totals:")).split()[1])


def importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def pct(values: list[float], q: float) -> float:
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


def start_clients(variants: list[str], base_url: str, tmp: Path) -> dict[str, subprocess.Popen[str]]:
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
        if reply(procs[variant]) != "ready":
            raise RuntimeError(f"the {variant} benchmark client did not start")
    return procs


def stop_clients(procs: dict[str, subprocess.Popen[str]]) -> None:
    for proc in procs.values():
        with contextlib.suppress(Exception):
            proc.stdin.close()  # type: ignore[union-attr]
            proc.wait(timeout=60)


def ask(proc: subprocess.Popen[str], command: str) -> str:
    assert proc.stdin is not None
    proc.stdin.write(command + "\n")
    proc.stdin.flush()
    return reply(proc)


def reply(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"a benchmark client exited early (code {proc.wait()})")
    return line.strip()


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


PEERS = {
    "ecologits": "ecologits",
    "openai-v2": "opentelemetry.instrumentation.openai_v2",
    "openai-v2-metrics": "opentelemetry.instrumentation.openai_v2",
}
