"""``joule-otel demo``: simulator, a realistic mixed workload through the real openai SDK, ledger, dashboard.

Five workloads, as a small company on Joule Cloud would run them:

- ``support-bot``: streamed chat on ``auto``, pinned to ``eu-fi``;
- ``nightly-summaries``: long prompts pinned to ``llama-3.3-405b-instruct`` on the batch tier;
- ``search-embeddings``: embeddings for a search index, pinned to ``eu-se``;
- ``ops-agent``: a tool-using agent (tool call → tool result → answer) on the priority tier;
- ``batch-enrichment``: its own API token with a small energy budget, which runs out: 402s.

Before today's traffic, four weeks of history go through the same SDK, simulator and capture, each call
dated to its day (:func:`joule_otel._capture.replayed_at`): traffic that grows week on week, the nightly
summaries moving to the batch tier in week three, and support-bot and search-embeddings migrating from
OpenAI (the simulator's ``/openai/v1`` stand-in) to Joule Cloud, so the dashboard opens on trends.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import webbrowser
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import joule_otel
from joule_otel._terminal import dashboard_command, port_taken, print_table
from joule_otel.simulator import _catalog as catalog
from joule_otel.simulator import running, write_bill
from joule_otel.simulator._server import OPENAI_PREFIX

DEMO_SERVICE = "joule-demo"
"""The demo's ``service.name`` (unless ``OTEL_SERVICE_NAME`` says otherwise)."""

DEMO_BUDGETS_J = {
    "batch-enrichment": 40_000.0,
    "support-bot": 20_000.0,
    "nightly-summaries": 250_000.0,
    "search-embeddings": 1_500.0,
    "ops-agent": 4_500.0,
}
"""Energy budgets the demo's dashboard shows (J per month)."""
BATCH_TOKEN_BUDGET_J = 600.0

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
    from joule_otel._config import default_db_path

    return default_db_path().with_name("demo.duckdb")


@dataclass(frozen=True)
class Era:
    """How a task runs at its moment: on OpenAI still (``legacy``), and the nightly summaries' tier."""

    legacy: bool = False
    nightly_tier: str = "batch"


def _support_bot(client: Any, rng: random.Random, era: Era) -> None:
    pinned = {} if era.legacy else {"extra_headers": {"X-Region": "eu-fi"}}
    stream = client.chat.completions.create(
        model="gpt-4o-mini" if era.legacy else "auto",
        stream=True,
        stream_options={"include_usage": True},
        messages=[
            {"role": "system", "content": "You are Joule Cloud's support assistant."},
            {"role": "user", "content": rng.choice(_QUESTIONS)},
        ],
        max_tokens=rng.randint(60, 220),
        **pinned,
    )
    for _ in stream:
        pass


def _nightly_summary(client: Any, rng: random.Random, era: Era) -> None:
    client.chat.completions.create(
        model="llama-3.3-405b-instruct",
        max_tokens=rng.randint(250, 600),
        messages=[{"role": "user", "content": "Summarise:\n" + _DOCUMENT[: rng.randint(2_000, 3_400)]}],
        extra_headers={"X-Tier": era.nightly_tier},
    )


def _embeddings(client: Any, rng: random.Random, era: Era) -> None:
    docs = [
        f"knowledge base article {rng.randint(1, 10_000)}: " + " ".join(rng.choices(_QUESTIONS, k=3))
        for _ in range(rng.randint(4, 16))
    ]
    if era.legacy:
        client.embeddings.create(model="text-embedding-3-small", input=docs)
    else:
        client.embeddings.create(model="auto", input=docs, extra_headers={"X-Region": "eu-se"})


def _agent(client: Any, rng: random.Random, era: Era) -> None:
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


def _batch_enrichment(client: Any, rng: random.Random, era: Era) -> None:
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


Task = Callable[[Any, random.Random, Era], None]

_MIX: list[tuple[str, float, Task, str]] = [
    ("support-bot", 0.38, _support_bot, "main"),
    ("nightly-summaries", 0.10, _nightly_summary, "main"),
    ("search-embeddings", 0.22, _embeddings, "main"),
    ("ops-agent", 0.12, _agent, "main"),
    ("batch-enrichment", 0.18, _batch_enrichment, "batch"),
]


HISTORY_DAYS = 28
HISTORY_TASKS_PER_DAY = 30
"""Tasks on a weekday of the first week; each week brings 10 % more, weekends half as many."""
LEGACY_SHARE = {"support-bot": (0.7, 0.4, 0.15, 0.0), "search-embeddings": (1.0, 0.5, 0.0, 0.0)}
"""Per week of history (oldest first), the share of a workload's tasks still sent to OpenAI."""
TODAY_LEGACY_SHARE = {"support-bot": 0.04}
"""A few stragglers remain today: the migration view has something left to show."""
_WORK_HOURS = [1, 1, 1, 1, 1, 1, 2, 4, 8, 10, 10, 9, 7, 9, 10, 9, 8, 6, 4, 3, 2, 2, 1, 1]
"""Relative traffic per hour of the (UTC) day: office hours, a lunch dip, a quiet night."""


@dataclass(frozen=True)
class PlannedTask:
    """One task of the demo: which workload, through which account and provider, when."""

    name: str
    func: Task
    account: str
    era: Era
    moment_ns: int | None = None
    """None: now (today's traffic); else the past moment the calls are dated to."""


DEMO_LATENCY_S = 0.004
DEMO_TOKEN_DELAY_S = 0.0002
"""The simulator's time to first byte and per streamed event, for the history and today alike: one regime, so the
dashboard's latencies compare models (they grow with a model's size and its output), a hundredth of real time."""

LIVE_SHARE = 0.2
"""Of today's tasks, the share run at the moment the demo runs; the rest are spread over the hours of today so far."""


def plan_today(calls: int, seed: int, now: datetime | None = None) -> list[PlannedTask]:
    """Today's ``calls`` tasks of the mix, a few still on OpenAI, oldest first.

    With ``now``, most are dated over today's hours so far (UTC, weighted to working hours as the history is), so a
    24-hour view shows a day's traffic; the last :data:`LIVE_SHARE` of them run now.
    """
    rng = random.Random(seed)
    picks = rng.choices(_MIX, weights=[w for _, w, _, _ in _MIX], k=calls)
    plan = []
    for name, _, func, account in picks:
        legacy = rng.random() < TODAY_LEGACY_SHARE.get(name, 0.0)
        plan.append(PlannedTask(name, func, "openai" if legacy else account, Era(legacy=legacy)))
    if now is None:
        return plan
    now = now.astimezone(timezone.utc)
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    latest = now - timedelta(minutes=1)
    if latest - midnight < timedelta(hours=1):  # just after midnight: today is all now
        return plan
    hours = range(now.hour + 1)
    earlier = plan[: round(len(plan) * (1 - LIVE_SHARE))]
    moments = []
    for _ in earlier:
        hour = rng.choices(hours, [_WORK_HOURS[h] for h in hours])[0]
        moments.append(min(midnight + timedelta(hours=hour, seconds=rng.uniform(0, 3600)), latest))
    dated = [
        dataclasses.replace(task, moment_ns=int(moment.timestamp() * 1e9))
        for task, moment in zip(earlier, sorted(moments), strict=True)
    ]
    return dated + plan[len(earlier) :]


def plan_history(now: datetime, seed: int, days: int = HISTORY_DAYS) -> list[PlannedTask]:
    """``days`` days before today, oldest first: growing traffic, a tier change, a migration from OpenAI."""
    rng = random.Random(seed + 1)
    today = now.astimezone(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    plan: list[PlannedTask] = []
    for days_ago in range(days, 0, -1):
        day = today - timedelta(days=days_ago)
        week = min((days - days_ago) // 7, 3)
        count = round(HISTORY_TASKS_PER_DAY * 1.1**week * (0.5 if day.weekday() >= 5 else 1.0))
        era_tier = "standard" if week < 2 else "batch"
        for name, _, func, account in rng.choices(_MIX, weights=[w for _, w, _, _ in _MIX], k=count):
            legacy = rng.random() < LEGACY_SHARE.get(name, (0.0,) * 4)[week]
            hour = rng.randint(1, 3) if name == "nightly-summaries" else rng.choices(range(24), _WORK_HOURS)[0]
            moment = day + timedelta(hours=hour, seconds=rng.uniform(0, 3600))
            plan.append(
                PlannedTask(
                    name,
                    func,
                    "openai" if legacy else account,
                    Era(legacy=legacy, nightly_tier=era_tier),
                    int(moment.timestamp() * 1e9),
                )
            )
    return plan


class _ProgressLine(logging.Handler):
    """The progress bar, and joule-otel's warnings on lines of their own above it (never appended to the bar)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.drawn = False
        self.guard = threading.Lock()

    def draw(self, done: int, total: int, started: float, what: str) -> None:
        width = 32
        filled = int(width * done / max(total, 1))
        rate = done / max(time.monotonic() - started, 1e-9)
        with self.guard:
            sys.stderr.write(
                f"\r  {what:<8} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} tasks  {rate:5.1f}/s"
            )
            sys.stderr.flush()
            self.drawn = True

    def end(self) -> None:
        with self.guard:
            if self.drawn:
                sys.stderr.write("\n")
            self.drawn = False

    def emit(self, record: logging.LogRecord) -> None:
        with self.guard:
            sys.stderr.write(("\n" if self.drawn else "") + "  " + record.getMessage() + "\n")
            sys.stderr.flush()
            self.drawn = False

    @contextmanager
    def warnings_above(self) -> Iterator[None]:
        """Route the ``joule_otel`` logger's warnings through this line while the demo runs."""
        logger = logging.getLogger("joule_otel")
        logger.addHandler(self)
        propagate, logger.propagate = logger.propagate, False
        try:
            yield
        finally:
            logger.removeHandler(self)
            logger.propagate = propagate


def run_traffic(
    base_url: str, plan: list[PlannedTask], seed: int, what: str = "today", line: _ProgressLine | None = None
) -> None:
    """Run the planned tasks through the openai SDK, four at a time, with a progress bar."""
    import openai

    from joule_otel._capture import replayed_at

    clients = {
        "main": openai.OpenAI(base_url=base_url, api_key="jc_demo_main", max_retries=0),
        "batch": openai.OpenAI(base_url=base_url, api_key="jc_demo_batch", max_retries=0),
        "openai": openai.OpenAI(
            base_url=base_url.replace("/v1", OPENAI_PREFIX + "/v1"), api_key="sk-demo-legacy", max_retries=0
        ),
    }
    started = time.monotonic()
    done = 0
    line = line or _ProgressLine()

    def task(index: int, planned: PlannedTask) -> None:
        with joule_otel.workload(planned.name), joule_otel.tags(**(catalog.example_tags(planned.name, index) or {})):
            if planned.moment_ns is None:
                planned.func(clients[planned.account], random.Random(seed * 100_003 + index), planned.era)
            else:
                with replayed_at(planned.moment_ns):
                    planned.func(clients[planned.account], random.Random(seed * 100_003 + index), planned.era)

    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(task, i, planned) for i, planned in enumerate(plan)]
        for future in as_completed(futures):
            future.result()
            done += 1
            line.draw(done, len(plan), started, what)
    line.end()


DEMO_MARK = ("created_by", "joule-otel demo")
"""The ``joule_meta`` row that says a ledger is the demo's own, which a later demo may replace."""


def _is_demo_ledger(db: Path) -> bool:
    from joule_otel.ledger import _reader as reader

    with reader.connect(db) as con:
        if not (con.execute("SELECT count(*) FROM inference_calls").fetchone() or (0,))[0]:
            return True  # nothing to lose
        try:
            found = con.execute("SELECT value FROM ledger.joule_meta WHERE key = ?", [DEMO_MARK[0]]).fetchone()
        except Exception:  # no file (only spooled rows), or no joule_meta
            return False
    return found is not None and found[0] == DEMO_MARK[1]


def _clear_previous_demo(db: Path) -> None:
    """Remove an earlier demo's ledger at ``db``; refuse (ValueError) anything else: a user's data is never deleted."""
    from joule_otel.ledger._spool import Spool

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
    from joule_otel.ledger._compact import compact, open_writable
    from joule_otel.ledger._spool import Spool

    compact(db, timeout_s=30)
    with Spool(db).locked(exclusive=True, timeout_s=30):
        con: Any = open_writable(db)
        try:
            con.execute("INSERT OR REPLACE INTO joule_meta VALUES (?, ?)", list(DEMO_MARK))
        finally:
            con.close()


CRON_KEY = "jc_nightly_cron_c41f"
"""The API key of the demo's one uninstrumented job: the bill names it, the ledger never saw it."""


def run_cron_script(base_url: str, calls: int) -> None:
    """A job with no joule-otel at all, as a shell script or cron job calls the API: plain urllib."""
    import urllib.request

    for index in range(calls):
        body = json.dumps(
            {"model": "auto", "messages": [{"role": "user", "content": f"Summarise yesterday's tickets, part {index}"}]}
        ).encode()
        request = urllib.request.Request(  # noqa: S310 (the simulator's own http URL on loopback)
            base_url + "/chat/completions",
            data=body,
            headers={"Authorization": f"Bearer {CRON_KEY}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
            response.read()


def run_demo(
    *,
    calls: int = 60,
    db: Path | None = None,
    browser: bool = True,
    dashboard: bool = True,
    port: int = 8501,
    seed: int = 42,
    history_days: int = HISTORY_DAYS,
) -> int:
    """Run the demo end to end; returns an exit code."""
    if calls < 1:
        raise ValueError("--calls must be at least 1")
    if history_days < 0:
        raise ValueError("--history-days must be 0 or more")
    if dashboard and port_taken("127.0.0.1", port):  # say so before the traffic, not after it
        raise ValueError(f"port {port} on 127.0.0.1 is already in use; pass another with --port, or --no-dashboard")
    db = db or default_demo_db()
    _clear_previous_demo(db)
    db.parent.mkdir(parents=True, exist_ok=True)
    budgets_file = db.with_name("demo-budgets.json")
    budgets_file.write_text(json.dumps(DEMO_BUDGETS_J, indent=2))
    bill_file = db.with_name("demo-bill.csv")
    bill: list[dict[str, Any]] = []
    cron_calls = max(3, calls // 10)

    history = plan_history(datetime.now(timezone.utc), seed, history_days) if history_days else []
    print(
        f"joule-otel demo: {len(history)} tasks of history over {history_days} days, then {calls} tasks today, "
        "through the openai SDK to a local Joule Cloud simulator (an agent task makes two calls)"
    )
    os.environ.setdefault("OTEL_SERVICE_NAME", DEMO_SERVICE)  # the ledger's service: a name, not unknown_service
    # the budgets the dashboard shows are the ones capture warns about
    joule_otel.instrument(db=db, flush_interval=0.5, budgets=budgets_file)
    line = _ProgressLine()
    try:
        with line.warnings_above():
            if history:
                with running(seed=seed + 1, token_delay_s=DEMO_TOKEN_DELAY_S, latency_s=DEMO_LATENCY_S) as past:
                    run_traffic(past.base_url, history, seed + 1, "history", line)
                    bill += past.bill_records()
            with running(
                seed=seed,
                token_delay_s=DEMO_TOKEN_DELAY_S,
                latency_s=DEMO_LATENCY_S,
                energy_budgets={"jc_demo_batch": BATCH_TOKEN_BUDGET_J},
            ) as sim:
                print(f"  simulator: {sim.base_url}")
                run_traffic(sim.base_url, plan_today(calls, seed, datetime.now(timezone.utc)), seed, "today", line)
                run_cron_script(sim.base_url, cron_calls)
                joule_otel.flush(timeout_s=30)
                bill += sim.bill_records()
    finally:
        joule_otel.uninstrument()
    _mark_as_demo(db)
    write_bill(bill, bill_file)

    from joule_otel import _units as units
    from joule_otel.ledger._maintenance import query

    _, found = query(
        db,
        "SELECT workload, count(*), coalesce(sum(energy_j), 0), coalesce(sum(carbon_mg), 0), count(error_type) "
        "FROM inference_calls GROUP BY 1 ORDER BY 3 DESC",
    )
    print(f"  ledger: {db}")
    # one unit a column, the smallest value's, so no row reads as 0.00 and figures compare at a glance
    least_j = min((r[2] for r in found if r[2] > 0), default=None)
    least_mg = min((r[3] for r in found if r[3] > 0), default=None)
    print_table(
        ["workload", "calls", "energy", "carbon", "errors"],
        [(w, n, units.energy(j, least_j), units.carbon(mg, least_mg), e) for w, n, j, mg, e in found],
    )
    total_calls = sum(r[1] for r in found)
    _, legacy = query(db, "SELECT count(*) FROM inference_calls WHERE provider = 'openai'")
    if legacy[0][0]:
        print(f"  {legacy[0][0]} of them went to OpenAI's API (the simulator's stand-in): see the Migration tab")
    print(
        f"  {total_calls} calls in the ledger: {units.energy(sum(r[2] for r in found))}, "
        f"{units.carbon(sum(r[3] for r in found))}"
    )
    print(
        f"  {cron_calls} more calls came from a cron script without joule-otel: on the bill ({bill_file.name}), "
        "in no ledger; see the Bill tab or joule-otel reconcile"
    )
    print(next_steps(db, budgets_file, dashboard=dashboard))
    if not dashboard:
        return 0
    env = dict(os.environ, JOULE_OTEL_DB=str(db), JOULE_OTEL_BUDGETS=str(budgets_file), JOULE_OTEL_BILL=str(bill_file))
    url = f"http://127.0.0.1:{port}"
    print(f"  dashboard: {url}  (Ctrl-C stops)", flush=True)
    # Streamlit's banner would say the URL a second time: its standard output is only that; errors go to stderr
    proc = subprocess.Popen(dashboard_command(host="127.0.0.1", port=port), env=env, stdout=subprocess.DEVNULL)
    signal.signal(signal.SIGTERM, lambda signum, frame: proc.terminate())  # never leave the server orphaned
    if browser:
        threading.Timer(3.0, lambda: webbrowser.open(url)).start()
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait(timeout=10)
        return 0


def next_steps(db: Path, budgets_file: Path, *, dashboard: bool) -> str:
    """What to run after the demo: where its files are, the commands that read them, how to capture your own app."""
    from shlex import quote

    ledger, budgets = quote(str(db)), quote(str(budgets_file))
    lines = [
        "",
        "Next:",
        f"  the demo's ledger:  {db}",
        f"  its budgets:        {budgets_file}",
        f"  its bill:           {db.with_name('demo-bill.csv')}",
    ]
    if db == default_demo_db():
        lines.append("  (your own apps write the per-user ledger beside it, joule.duckdb; the demo never touches it)")
    lines += [
        f"  joule-otel ledger --db {ledger} stats",
        f'  joule-otel ledger --db {ledger} query "select workload, sum(energy_j) from inference_calls group by 1"',
        f"  joule-otel budgets status {budgets} --db {ledger}",
        f"  joule-otel reconcile --bill {quote(str(db.with_name('demo-bill.csv')))} --db {ledger}",
    ]
    if not dashboard:
        lines.append(f"  JOULE_OTEL_BUDGETS={budgets} joule-otel dashboard --db {ledger}")
    lines += [
        "  your own app: pip install joule-otel, then call joule_otel.instrument() once at start-up",
        "  (the README's 'Instrument your app')",
        "",
    ]
    return "\n".join(lines)
