"""Workloads: one object shared by concurrent tasks, and the default cleaned like any name.

Every test here drives real parts: the simulator or a scripted HTTP server on loopback, a real DuckDB file, real
child processes.
"""

from __future__ import annotations

import asyncio
import threading
import time

import openai
import pytest
from support import HI, ledger_rows

import joule_otel

# -- workloads ---------------------------------------------------------------------------------------------------


def test_one_workload_object_shared_by_concurrent_tasks(ledger_path, joule_simulator):
    support = joule_otel.workload("support")
    joule_otel.instrument(db=ledger_path, flush_interval=0.1)
    try:
        client = openai.AsyncOpenAI(base_url=joule_simulator.base_url, api_key="k", max_retries=0)

        async def task(n):
            async with support:
                await asyncio.sleep(0.01 * n)
                await client.chat.completions.create(model="auto", messages=HI)
                with support:  # nested re-entry of the same object
                    await asyncio.sleep(0.01)

        async def main():
            await asyncio.gather(*(task(n) for n in (3, 1, 2)))
            await client.close()

        asyncio.run(main())
        with support:
            pass

        def in_thread():
            with support:
                time.sleep(0.05)

        threads = [threading.Thread(target=in_thread) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert joule_otel.flush(timeout_s=10)
    finally:
        joule_otel.uninstrument()
    assert [r["workload"] for r in ledger_rows(ledger_path)] == ["support"] * 3


def test_the_default_workload_is_cleaned_and_capped_like_workload(ledger_path, joule_simulator, monkeypatch):
    joule_otel.instrument(db=ledger_path, flush_interval=0.1, workload="night\nly" + "x" * 1_000_000)
    try:
        openai.OpenAI(base_url=joule_simulator.base_url, api_key="k", max_retries=0).chat.completions.create(
            model="auto", messages=HI
        )
        assert joule_otel.flush(timeout_s=10)
    finally:
        joule_otel.uninstrument()
    [row] = ledger_rows(ledger_path)
    assert row["workload"].startswith("nightly") and len(row["workload"]) == 256
    with pytest.raises(ValueError, match="workload"):
        joule_otel.instrument(db=ledger_path, workload="\n\t")
    monkeypatch.setenv("JOULE_OTEL_WORKLOAD", "cron\x07job")
    from joule_otel._config import Settings

    assert Settings.resolve().workload == "cronjob"
