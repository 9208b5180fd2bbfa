"""joule-otel benchmarks: what instrumenting costs, how fast the ledger and dashboard are.

    python benchmarks/run.py            # default run, a few minutes
    python benchmarks/run.py --full     # adds the 10M-row dashboard case
    python benchmarks/run.py --huge     # and the 100M-row one (about 10 GB of disk)

Everything is measured side by side in one run and reported as ratios too: the machine is shared
and noisy, so absolute figures vary between runs while ratios hold. The simulator runs in its own
process, so its CPU never counts against the client being measured.

One module per benchmark (``bench_*.py``); this file runs them and prints the tables.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from _common import HERE, table
from bench_budgets import budget_watch
from bench_collect import collect_ingest
from bench_cost import own_cost
from bench_dashboard import dashboard
from bench_instructions import app_instructions, peer_instructions
from bench_ledger import growth, ledger_ingest
from bench_overhead import overhead
from bench_proxy import proxy_overhead
from bench_reconcile import reconcile_at_scale
from bench_sdk import sdk_floor


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
        (
            "joule-otel proxy: latency added over calling the upstream directly, beside LiteLLM's and Portkey's",
            lambda: proxy_overhead([1, 50, 500], 6.0, 100_000),
        ),
        (
            "Reconcile: a bill against a ledger of the same size",
            lambda: reconcile_at_scale([100_000, 1_000_000, 10_000_000]),
        ),
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
    # a run of some sections never replaces the last full run's tables
    (results / ("latest-only.md" if args.only else "latest.md")).write_text("\n".join(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
