"""The dashboard's queries and its whole page at 100 k to 100 M rows, with the slowest query's plan."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import HERE


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
                "what if (every workload's moves, ranked)": lambda c: queries.recommendations(
                    queries.moves(c, filters)
                ),
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
