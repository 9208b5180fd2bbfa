"""``joule-otel demo``: simulator, a realistic mixed workload through the real openai SDK, ledger, dashboard.

Five workloads, as a small company on Joule Cloud would run them:

- ``support-bot``: streamed chat on ``auto``, pinned to ``eu-fi``;
- ``nightly-summaries``: long prompts pinned to ``llama-3.3-405b-instruct`` on the batch tier;
- ``search-embeddings``: embeddings for a search index, pinned to ``eu-se``;
- ``ops-agent``: a tool-using agent (tool call → tool result → answer) on the priority tier;
- ``batch-enrichment``: its own API token with a small energy budget, which runs out: 402s.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import webbrowser
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import joule_otel
from joule_otel._terminal import dashboard_command, port_taken, print_table
from joule_otel.simulator import running

DEMO_SERVICE = "joule-demo"
"""The demo's ``service.name`` (unless ``OTEL_SERVICE_NAME`` says otherwise)."""

DEMO_BUDGETS_J = {
    "batch-enrichment": 6_000.0,
    "support-bot": 150_000.0,
    "nightly-summaries": 400_000.0,
    "search-embeddings": 500.0,
    "ops-agent": 60_000.0,
}
"""Energy budgets the demo's dashboard shows (J per month)."""
BATCH_TOKEN_BUDGET_J = 3_000.0

_QUESTIONS = [
    "My invoice shows more joules than last month, why?",
    "How do I pin my calls to an EU region?",
    "Can I get a receipt for yesterday's batch job?",
    "What does the auto router pick for short prompts?",
    "Why was my request refused with 402?",
]
_DOCUMENT = ("Quarterly operations report. " * 120).strip()
_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup_incident",
            "description": "Find an incident by service name",
            "parameters": {
                "type": "object",
                "properties": {"service": {"type": "string"}},
                "required": ["service"],
            },
        },
    }
]


def default_demo_db() -> Path:
    """``demo.duckdb`` beside the per-user ledger, so the demo never mixes with real data."""
    from joule_otel.config import default_db_path

    return default_db_path().with_name("demo.duckdb")


def _support_bot(client: Any, rng: random.Random) -> None:
    stream = client.chat.completions.create(
        model="auto",
        stream=True,
        stream_options={"include_usage": True},
        messages=[
            {"role": "system", "content": "You are Joule Cloud's support assistant."},
            {"role": "user", "content": rng.choice(_QUESTIONS)},
        ],
        max_tokens=rng.randint(60, 220),
        extra_headers={"X-Region": "eu-fi"},
    )
    for _ in stream:
        pass


def _nightly_summary(client: Any, rng: random.Random) -> None:
    client.chat.completions.create(
        model="llama-3.3-405b-instruct",
        max_tokens=rng.randint(250, 600),
        messages=[{"role": "user", "content": "Summarise:\n" + _DOCUMENT[: rng.randint(2_000, 3_400)]}],
        extra_headers={"X-Tier": "batch"},
    )


def _embeddings(client: Any, rng: random.Random) -> None:
    docs = [
        f"knowledge base article {rng.randint(1, 10_000)}: " + " ".join(rng.choices(_QUESTIONS, k=3))
        for _ in range(rng.randint(4, 16))
    ]
    client.embeddings.create(model="auto", input=docs, extra_headers={"X-Region": "eu-se"})


def _agent(client: Any, rng: random.Random) -> None:
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Is the checkout service degraded?"}]
    first = client.chat.completions.create(
        model="auto",
        messages=messages,
        tools=_TOOLS,
        extra_headers={"X-Tier": "priority", "X-Region": "us-east"},
    )
    call = first.choices[0].message.tool_calls[0]
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"status": "degraded"})},
    ]
    client.chat.completions.create(
        model="auto",
        messages=messages,
        tools=_TOOLS,
        extra_headers={"X-Tier": "priority", "X-Region": "us-east"},
    )


def _batch_enrichment(client: Any, rng: random.Random) -> None:
    import openai

    try:
        client.chat.completions.create(
            model="llama-3.3-70b-instruct",
            max_tokens=rng.randint(150, 400),
            messages=[{"role": "user", "content": "Enrich this CRM record: " + str(rng.randint(1, 99_999))}],
            extra_headers={"X-Tier": "batch"},
        )
    except openai.APIStatusError as exc:
        if exc.status_code != 402:
            raise


_MIX: list[tuple[str, float, Callable[[Any, random.Random], None], str]] = [
    ("support-bot", 0.38, _support_bot, "main"),
    ("nightly-summaries", 0.10, _nightly_summary, "main"),
    ("search-embeddings", 0.22, _embeddings, "main"),
    ("ops-agent", 0.12, _agent, "main"),
    ("batch-enrichment", 0.18, _batch_enrichment, "batch"),
]


def _progress(done: int, total: int, started: float) -> None:
    width = 32
    filled = int(width * done / max(total, 1))
    rate = done / max(time.monotonic() - started, 1e-9)
    sys.stderr.write(f"\r  [{'#' * filled}{'.' * (width - filled)}] {done}/{total} calls  {rate:5.1f}/s")
    sys.stderr.flush()


def run_traffic(base_url: str, calls: int, seed: int) -> None:
    """Send ``calls`` tasks of the mix through the openai SDK, four at a time, with a progress bar."""
    import openai

    clients = {
        "main": openai.OpenAI(base_url=base_url, api_key="jc_demo_main", max_retries=0),
        "batch": openai.OpenAI(base_url=base_url, api_key="jc_demo_batch", max_retries=0),
    }
    rng = random.Random(seed)
    plan = rng.choices(_MIX, weights=[w for _, w, _, _ in _MIX], k=calls)
    started = time.monotonic()
    done = 0
    lock = threading.Lock()

    def task(index: int, name: str, func: Callable[[Any, random.Random], None], account: str) -> None:
        with joule_otel.workload(name):
            func(clients[account], random.Random(seed * 100_003 + index))

    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(task, i, name, func, account) for i, (name, _, func, account) in enumerate(plan)]
        for future in as_completed(futures):
            future.result()
            with lock:
                done += 1
                _progress(done, calls, started)
    sys.stderr.write("\n")


DEMO_MARK = ("created_by", "joule-otel demo")
"""The ``joule_meta`` row that says a ledger is the demo's own, which a later demo may replace."""


def _is_demo_ledger(db: Path) -> bool:
    from joule_otel.ledger import reader

    with reader.connect(db) as con:
        if not con.execute("SELECT count(*) FROM inference_calls").fetchone()[0]:
            return True  # nothing to lose
        try:
            found = con.execute("SELECT value FROM ledger.joule_meta WHERE key = ?", [DEMO_MARK[0]]).fetchone()
        except Exception:  # no file (only spooled rows), or no joule_meta
            return False
    return found is not None and found[0] == DEMO_MARK[1]


def _clear_previous_demo(db: Path) -> None:
    """Remove an earlier demo's ledger at ``db``; refuse (ValueError) anything else: a user's data is never deleted."""
    from joule_otel.ledger.spool import Spool

    spool = Spool(db)
    if not db.exists() and not spool.segments():
        return
    if not _is_demo_ledger(db):
        raise ValueError(
            f"{db} holds a ledger that is not a demo ledger; joule-otel demo never overwrites one. "
            "Pass another --db (or leave it out: the demo has its own file)"
        )
    for leftover in (db, db.with_name(db.name + ".wal")):
        leftover.unlink(missing_ok=True)
    shutil.rmtree(spool.dir, ignore_errors=True)


def _mark_as_demo(db: Path) -> None:
    from joule_otel.ledger.compact import compact, open_writable
    from joule_otel.ledger.spool import Spool

    compact(db, timeout_s=30)
    with Spool(db).locked(exclusive=True, timeout_s=30):
        con: Any = open_writable(db)
        try:
            con.execute("INSERT OR REPLACE INTO joule_meta VALUES (?, ?)", list(DEMO_MARK))
        finally:
            con.close()


def run_demo(
    *,
    calls: int = 400,
    db: Path | None = None,
    browser: bool = True,
    dashboard: bool = True,
    port: int = 8501,
    seed: int = 42,
) -> int:
    """Run the demo end to end; returns an exit code."""
    if calls < 1:
        raise ValueError("--calls must be at least 1")
    if dashboard and port_taken("127.0.0.1", port):  # say so before the traffic, not after it
        raise ValueError(f"port {port} on 127.0.0.1 is already in use; pass another with --port, or --no-dashboard")
    db = db or default_demo_db()
    _clear_previous_demo(db)
    db.parent.mkdir(parents=True, exist_ok=True)
    budgets_file = db.with_name("demo-budgets.json")
    budgets_file.write_text(json.dumps(DEMO_BUDGETS_J, indent=2))

    print(
        f"joule-otel demo: {calls} tasks through the openai SDK to a local Joule Cloud simulator "
        "(an agent task makes two calls)"
    )
    os.environ.setdefault("OTEL_SERVICE_NAME", DEMO_SERVICE)  # the ledger's service: a name, not unknown_service
    joule_otel.instrument(db=db, flush_interval=0.5)
    try:
        with running(
            seed=seed,
            token_delay_s=0.002,
            latency_s=0.01,
            energy_budgets={"jc_demo_batch": BATCH_TOKEN_BUDGET_J},
        ) as sim:
            print(f"  simulator: {sim.base_url}")
            run_traffic(sim.base_url, calls, seed)
            joule_otel.flush(timeout_s=30)
    finally:
        joule_otel.uninstrument()
    _mark_as_demo(db)

    from joule_otel.dashboard import units
    from joule_otel.ledger.maintenance import query

    _, found = query(
        db,
        "SELECT workload, count(*), coalesce(sum(energy_j), 0), coalesce(sum(carbon_mg), 0), count(error_type) "
        "FROM inference_calls GROUP BY 1 ORDER BY 3 DESC",
    )
    print(f"  ledger: {db}")
    print_table(
        ["workload", "calls", "energy", "carbon", "errors"],
        [(w, n, units.energy(j), units.carbon(mg), e) for w, n, j, mg, e in found],
    )
    total_calls = sum(r[1] for r in found)
    print(
        f"  {total_calls} calls in the ledger: {units.energy(sum(r[2] for r in found))}, "
        f"{units.carbon(sum(r[3] for r in found))}"
    )
    if not dashboard:
        return 0
    env = dict(os.environ, JOULE_OTEL_DB=str(db), JOULE_OTEL_BUDGETS=str(budgets_file))
    url = f"http://127.0.0.1:{port}"
    print(f"  dashboard: {url}  (Ctrl-C stops)", flush=True)
    proc = subprocess.Popen(dashboard_command(host="127.0.0.1", port=port), env=env)
    signal.signal(signal.SIGTERM, lambda signum, frame: proc.terminate())  # never leave the server orphaned
    if browser:
        threading.Timer(3.0, lambda: webbrowser.open(url)).start()
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait(timeout=10)
        return 0
