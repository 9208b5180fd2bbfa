"""`joule-otel reconcile` at scale: N billed receipts against an N-row ledger, in a process of its own per size.

The ledger is a DuckDB file of N rows; the bill a Parquet file of the same N receipts, 1 % of them missing from
the ledger (a cron script without joule-otel) and 0.1 % with a differing energy figure. Each case runs the command's
own function in a fresh process, so its peak memory (max RSS) is its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASE = r"""
import json, resource, sys, time
from pathlib import Path
from joule_otel import _reconcile as rc
folder = Path(sys.argv[1])
t0 = time.perf_counter()
result = rc.reconcile(folder / "bill.parquet", [folder / "ledger.duckdb"])
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "billed": result.billed_calls, "missing": result.missing_calls, "differing": result.differing_calls}))
"""


def _make(folder: Path, n: int) -> None:
    import duckdb

    from joule_otel.ledger._schema import create_statements

    with duckdb.connect(str(folder / "ledger.duckdb")) as con:
        for statement in create_statements():
            con.execute(statement)
        con.execute(
            f"""INSERT INTO inference_calls (receipt_id, started_at, duration_ms, service, workload, operation,
                  status_code, routed_to, tier, region, energy_j, carbon_mg, input_tokens, output_tokens, stream,
                  provider)
                SELECT 'rcpt_' || lpad(CAST(i AS VARCHAR), 12, '0'),
                       TIMESTAMPTZ '2026-11-01 00:00:00+00' + to_microseconds(i * 250000 // {max(n // 10_000_000, 1)}),
                       120.0, 'api', 'w' || (i % 20), 'chat', 200, 'gpt-oss-120b', 'standard', 'eu-fi',
                       (i % 1000) / 10.0 + 1, (i % 1000) / 100.0, 10, 200, false, 'joule_cloud'
                FROM range({n}) t(i) WHERE i % 100 <> 7"""
        )
        con.execute(
            f"""COPY (SELECT 'rcpt_' || lpad(CAST(i AS VARCHAR), 12, '0') AS receipt_id,
                       TIMESTAMPTZ '2026-11-01 00:00:00.05+00' + to_microseconds(i * 250000 // {max(n // 10_000_000, 1)})
                         AS billed_at,
                       CASE WHEN i % 1000 = 3 THEN (i % 1000) / 10.0 + 2 ELSE (i % 1000) / 10.0 + 1 END AS energy_j,
                       (i % 1000) / 100.0 AS carbon_mg, 'gpt-oss-120b' AS model, 'standard' AS tier,
                       'eu-fi' AS region, 'jc_…' || lpad(CAST(i % 50 AS VARCHAR), 4, '0') AS token
                FROM range({n}) t(i)) TO '{folder / "bill.parquet"}' (FORMAT parquet)"""
        )


def reconcile_at_scale(sizes: list[int]) -> list[dict[str, object]]:
    """Seconds and peak memory of a reconciliation, per size."""
    rows: list[dict[str, object]] = []
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            t0 = time.perf_counter()
            _make(folder, n)
            made = time.perf_counter() - t0
            done = subprocess.run([sys.executable, "-c", CASE, str(folder)], capture_output=True, text=True, check=True)
            found = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(
            {
                "billed receipts = ledger rows": f"{n:,}",
                "reconcile s": found["seconds"],
                "peak RSS MB": found["rss_mb"],
                "missing found": f"{found['missing']:,}",
                "differing found": f"{found['differing']:,}",
                "(making the files, s)": made,
            }
        )
    return rows
