"""The ledger: ingest through the spool and compaction, and memory and time as it grows."""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from pathlib import Path

from _common import ask, start_clients, start_simulator, stop_clients

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


def growth(counts: list[int]) -> list[dict[str, object]]:
    """CPU per call of joule-otel (ledger + metrics, no tracing) beside the bare SDK, as the calls (and the ledger) grow."""
    variants = ["bare", "joule-untraced"]
    sim, base_url = start_simulator()
    rows: list[dict[str, object]] = []
    procs: dict[str, subprocess.Popen[str]] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            procs = start_clients(variants, base_url, Path(tmp))
            done = 0
            for n in counts:
                first = done + 1
                while done < n:
                    for variant in variants:
                        ask(procs[variant], "block sync 20")
                    done += 20
                cpu = {v: json.loads(ask(procs[v], "end"))["cpu"] / (done - first + 1) * 1000 for v in variants}
                rows.append(
                    {
                        "calls": f"{first:,}–{done:,}",
                        "bare CPU ms/call": cpu["bare"],
                        "joule-otel CPU ms/call": cpu["joule-untraced"],
                        "Δ ms/call": cpu["joule-untraced"] - cpu["bare"],
                    }
                )
    finally:
        stop_clients(procs)
        sim.terminate()
        sim.wait()
    return rows
