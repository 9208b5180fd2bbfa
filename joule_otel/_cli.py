"""``joule-otel``: the demo, the simulator, the dashboard and ledger maintenance.

joule-otel demo [--calls N] [--no-browser] [--no-dashboard]
joule-otel simulate [--port 8088] [--seed 0] [--budget TOKEN=JOULES] [--token-delay S]
joule-otel dashboard [--db PATH] [--port 8501] [--host 127.0.0.1] [--no-browser]
joule-otel collect [--host 127.0.0.1] [--port 4318] [--grpc-port 4317] [--db PATH]
joule-otel ledger stats|compact|export|query [--db PATH] ...
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import os
import signal
import sys
from pathlib import Path

from joule_otel._terminal import dashboard_command, open_browser_when_up, port_taken, print_table
from joule_otel._version import __version__


def _db(args: argparse.Namespace) -> Path:
    from joule_otel._config import db_path_from_env

    if args.db:
        return Path(args.db).expanduser()
    path = db_path_from_env()
    if path is None:
        raise SystemExit("joule-otel: the ledger is off (JOULE_OTEL_DB=off); pass --db PATH")
    return path


def _cmd_simulate(args: argparse.Namespace) -> int:
    from joule_otel.simulator import Simulator, SimulatorConfig

    budgets: dict[str, float] = {}
    for item in args.budget or []:
        token, _, joules = item.partition("=")
        try:
            budgets[token] = float(joules)
        except ValueError:
            raise SystemExit(f"joule-otel simulate: --budget wants TOKEN=JOULES, got {item!r}") from None
    config = SimulatorConfig(
        seed=args.seed,
        token_delay_s=args.token_delay,
        latency_s=args.latency,
        energy_budgets=budgets,
        require_auth=True,
    )
    sim = Simulator(config, host=args.host, port=args.port)
    print(
        f"Joule Cloud simulator serving {sim.base_url.replace('127.0.0.1', args.host)}  (Ctrl-C stops)",
        flush=True,
    )
    print(
        f'  curl {sim.base_url}/chat/completions -H "Authorization: Bearer jc_test" '
        '-H \'Content-Type: application/json\' -d \'{"model":"auto","messages":[{"role":"user",'
        '"content":"hi"}]}\'',
        flush=True,
    )
    if args.bill_out:
        print(f"  the bill is written to {args.bill_out} when the simulator stops", flush=True)

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        sim.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        sim.stop()
        if args.bill_out:
            written = sim.write_bill(args.bill_out)
            print(f"bill: {len(sim.bill_records())} receipts in {written}", flush=True)
    return 0


def _cmd_dashboard(args: argparse.Namespace) -> int:
    try:
        import streamlit  # noqa: F401
    except ImportError:
        raise SystemExit("joule-otel dashboard needs Streamlit: pip install 'joule-otel[dashboard]'") from None
    env = dict(os.environ)
    if args.db:
        env["JOULE_OTEL_DB"] = str(Path(args.db).expanduser())
    if port_taken(args.host, args.port):
        raise ValueError(f"port {args.port} on {args.host} is already in use; pass another with --port")
    cmd = dashboard_command(host=args.host, port=args.port)
    url = f"http://{args.host}:{args.port}"
    if not args.no_browser:
        open_browser_when_up(url, args.host, args.port)
    print(f"Dashboard on {url}  (Ctrl-C stops)", flush=True)
    os.execve(sys.executable, cmd, env)  # noqa: S606 - become Streamlit: signals reach the server, no orphan is left


def _cmd_demo(args: argparse.Namespace) -> int:
    from joule_otel._demo import run_demo

    return run_demo(
        calls=args.calls,
        history_days=args.history_days,
        db=Path(args.db).expanduser() if args.db else None,
        browser=not args.no_browser,
        dashboard=not args.no_dashboard,
        port=args.port,
        seed=args.seed,
    )


def _cmd_collect(args: argparse.Namespace) -> int:
    from joule_otel.collect import serve

    serve(
        host=args.host,
        port=args.port,
        grpc_port=args.grpc_port,
        db=Path(args.db).expanduser() if args.db else None,
    )
    return 0


def _cmd_sample_data(args: argparse.Namespace) -> int:
    from joule_otel.dashboard._sample_data import write

    count = write(Path(args.output), calls=args.calls, days=args.days, seed=args.seed)
    print(f"wrote {count} sample rows to {args.output} (and budgets.json beside it)")
    return 0


def _cmd_ledger(args: argparse.Namespace) -> int:
    from joule_otel.ledger import _maintenance as maintenance
    from joule_otel.ledger._reader import require_ledger

    path = _db(args)
    require_ledger(path, "--db or JOULE_OTEL_DB choose another")
    if args.ledger_command == "stats":
        info = maintenance.ledger_stats(path)
        if args.json:
            print(json.dumps(info, default=str, indent=2))
            return 0
        unknown = {"schema_version": "– (no file yet: every row is still in the spool)"}
        for key, value in info.items():
            print(f"{key:>22}: {unknown.get(key, '–') if value is None else value}")
        if not info["rows"]:
            print(f"{path} holds no calls yet")
        return 0
    if args.ledger_command == "compact":
        result = maintenance.compact_now(path, timeout_s=args.timeout, rebuild_rollup=args.rebuild_rollup)
        print(
            f"compacted {result.segments} segments, {result.rows_inserted} new rows"
            + (f", {len(result.quarantined)} unreadable segments quarantined" if result.quarantined else "")
            + (f"; rollup rebuilt ({result.rollup_rows} rows)" if result.rollup_rows is not None else "")
        )
        return 0
    if args.ledger_command == "prune":
        return _prune(path, args)
    if args.ledger_command == "erase":
        return _erase(path, args)
    if args.ledger_command == "export":
        if args.clickhouse:
            return _export_clickhouse(path, Path(args.output), args)
        count = maintenance.export(path, Path(args.output), fmt=args.format, where=args.where)
        print(f"wrote {count} rows to {args.output}")
        return 0
    columns, rows = maintenance.query(path, args.sql)
    if args.json:
        print(json.dumps([dict(zip(columns, r, strict=True)) for r in rows], default=str, indent=2))
    else:
        print_table(columns, rows)
    return 0


def _export_clickhouse(path: Path, output: Path, args: argparse.Namespace) -> int:
    from joule_otel.ledger import _maintenance as maintenance

    if args.where or args.format == "csv" or output.suffix.lower() == ".csv":
        raise ValueError("--clickhouse writes the whole ledger as Parquet: drop --where and --format csv")
    rows, hourly, hourly_path = maintenance.export_clickhouse(path, output)
    print(f"wrote {rows:,} rows in the columns of otel.joule_calls to {output}")
    load = "clickhouse-client --query 'INSERT INTO otel.{table} FORMAT Parquet' < {file}"
    print("  load them (once or twice: a call stays one row): " + load.format(table="joule_calls", file=output))
    if hourly_path is not None:
        print(f"wrote the totals of {hourly:,} pruned hourly groups to {hourly_path}")
        print("  load them once: " + load.format(table="joule_calls_hourly", file=hourly_path))
    return 0


def _prune(path: Path, args: argparse.Namespace) -> int:
    from joule_otel import _report
    from joule_otel.ledger._reader import connect
    from joule_otel.ledger._retention import boundary, prune

    day = _report.period(args.before).start  # a date (its midnight, UTC) or any form a report takes
    cut = boundary(day)
    if not args.yes:
        with connect(path) as con:
            found = con.execute("SELECT count(*), sum(energy_j) FROM inference_calls WHERE started_at < ?", [cut])
            count, energy = found.fetchone() or (0, None)
        print(
            f"would delete {count:,} rows of calls before {cut:%Y-%m-%d %H:%M} UTC ({energy or 0:,.1f} J); their "
            "hourly totals stay for the dashboard, budgets and reports. Add --yes to delete them."
        )
        return 1
    result = prune(path, cut, timeout_s=args.timeout)
    if args.json:
        print(json.dumps(dataclasses.asdict(result), default=str, indent=2))
    else:
        print(
            f"deleted {result.rows_deleted:,} rows of calls before {result.pruned_before:%Y-%m-%d %H:%M} UTC; "
            f"the file is {result.bytes_after:,} bytes (was {result.bytes_before:,})"
            + (", rewritten to give the space back" if result.rewritten else "")
        )
    return 0


def _erase(path: Path, args: argparse.Namespace) -> int:
    from joule_otel import _report, _tags
    from joule_otel.ledger._retention import erase

    tag = None
    if args.tag:
        key, sep, value = args.tag.partition("=")
        if not sep or _tags.clean_key(key) is None or not value.strip():
            raise ValueError(f"--tag wants KEY=VALUE with a tag key such as team, got {args.tag!r}")
        tag = (_tags.clean_key(key) or "", value.strip())
    before = _report.period(args.before).start if args.before else None
    result = erase(
        path,
        workload=args.workload,
        service=args.service,
        tag=tag,
        before=before,
        apply=args.yes,
        timeout_s=args.timeout,
    )
    what = f"workload {args.workload}" if args.workload else f"service {args.service}" if args.service else args.tag
    when = f" before {before:%Y-%m-%d}" if before else ""
    if not args.yes:
        print(
            f"would erase {result.rows:,} calls of {what}{when} ({result.energy_j:,.1f} J) and their totals; add --yes"
        )
        return 1
    print(
        f"erased {result.rows:,} calls of {what}{when} ({result.energy_j:,.1f} J); "
        + f"{result.rollup_rows:,} hourly totals {'re-summed' if tag else 'removed'}"
        + (
            "; the totals of pruned hours keep no tags, so any of its calls there remain in them"
            if result.pruned_hours_kept
            else ""
        )
    )
    return 0


def _cmd_budgets(args: argparse.Namespace) -> int:
    from joule_otel._budgets import load_budgets, parse_thresholds, prometheus_rules

    budgets = load_budgets(args.file)
    if not budgets:
        raise ValueError(f"{args.file} holds no budgets")
    if args.budgets_command == "rules":
        text = prometheus_rules(
            budgets,
            thresholds=parse_thresholds(args.thresholds),
            exhaustion_days=args.exhaustion_days,
            burn_window=args.burn_window,
        )
        if args.output in (None, "-"):
            sys.stdout.write(text)
        else:
            Path(args.output).write_text(text)
            print(f"wrote {len(budgets)} budgets' rules to {args.output}", file=sys.stderr)
        return 0
    from datetime import datetime, timezone

    from joule_otel._budget_watch import ledger_month_to_date, month_start
    from joule_otel._config import db_path_from_env
    from joule_otel._units import energy
    from joule_otel.ledger._reader import require_ledger

    db = Path(args.db).expanduser() if args.db else db_path_from_env()
    if db is None:
        raise ValueError("JOULE_OTEL_DB is off: pass --db")
    require_ledger(db, "--db or JOULE_OTEL_DB choose another")
    month = month_start(datetime.now(timezone.utc))
    spent = ledger_month_to_date(db, month)
    rows = []
    for budget in budgets:
        used = sum(j for (w, s), j in spent.items() if w == budget.workload and budget.service in (None, s))
        rows.append((budget.label, energy(budget.joules), energy(used), f"{used / budget.joules:.0%}"))
    print_table(["budget", "per month", "this month", "used"], rows)
    if not spent:
        print(f"{db} has no calls since {month:%Y-%m-%d} 00:00 UTC: every budget is unused so far this month")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from joule_otel import _report as rp

    report = rp.build(_db(args), rp.dimensions(args.by), rp.period(args.period))
    text = rp.RENDER[args.format](report)
    if args.out:
        Path(args.out).expanduser().write_text(text, encoding="utf-8")
        if args.format != "table":
            sys.stdout.write(rp.table_text(report))
    else:
        sys.stdout.write(text)
    return 0


def _cmd_reconcile(args: argparse.Namespace) -> int:
    from joule_otel import _reconcile as rc

    tz = rc.zone(args.tz)
    start, end = rc.instant(args.start, tz, "--from"), rc.instant(args.end, tz, "--to")
    mapping: dict[str, str] = {}
    for item in args.map or []:
        name, sep, column = item.partition("=")
        if not sep or not name.strip() or not column.strip():
            raise ValueError(f"--map wants FIELD=COLUMN, got {item!r}")
        mapping[name.strip().lower()] = column.strip()
    if not 0 <= args.min_coverage <= 100:
        raise ValueError(f"--min-coverage is a percentage in [0, 100], got {args.min_coverage}")
    ledgers = [Path(p).expanduser() for p in args.db] if args.db else [_db(args)]
    bill: Path | list[dict[str, object]]
    if args.from_api:
        key = rc.api_key_from_env(args.api_key_env)
        bill = list(rc.fetch_bill(args.from_api, key, start, end))
        name = f"{args.from_api.rstrip('/')}/receipts"
    else:
        bill, name = Path(args.bill).expanduser(), args.bill
    result = rc.reconcile(bill, ledgers, start=start, end=end, tz=tz, skew_s=args.skew, mapping=mapping, bill_name=name)
    share = args.min_coverage / 100
    if args.format == "json":
        text = json.dumps(rc.to_json(result, share), indent=2, default=str) + "\n"
    elif args.format == "markdown":
        text = rc.render_markdown(result, share)
    elif args.format == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=rc.CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rc.csv_rows(result))
        text = buffer.getvalue()
    else:
        text = rc.render_text(result, share)
    if args.out:
        Path(args.out).expanduser().write_text(text, encoding="utf-8")
        if args.format != "text":
            sys.stdout.write(rc.render_text(result, share))
    else:
        sys.stdout.write(text)
    return 0 if result.explains(share) else 1


def _cmd_proxy(args: argparse.Namespace) -> int:
    from joule_otel.proxy import key_hash, serve

    if args.hash_key:
        key = sys.stdin.readline().strip()
        if not key:
            raise ValueError("--hash-key reads one API key from standard input")
        print(key_hash(key))
        return 0
    if not args.upstream:
        raise ValueError("--upstream is required (e.g. https://api.greenjoules.cloud)")
    serve(
        upstream=args.upstream,
        host=args.host,
        port=args.port,
        db=Path(args.db).expanduser() if args.db else None,
        workload=args.workload,
        workloads_file=args.workloads,
        api_key_env=args.api_key_env,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``joule-otel`` argument parser."""
    parser = argparse.ArgumentParser(prog="joule-otel", description="Energy observability for Joule Cloud.")
    parser.add_argument("--version", action="version", version=f"joule-otel {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="simulator + realistic traffic + ledger + dashboard, offline")
    demo.add_argument("--calls", type=int, default=60, help="tasks to run today (default 60)")
    demo.add_argument(
        "--history-days",
        type=int,
        default=28,
        help="days of earlier traffic to write first, dated through the capture path (default 28; 0 for none)",
    )
    demo.add_argument("--db", help="ledger to write (default: demo.duckdb in the user data folder)")
    demo.add_argument("--no-browser", action="store_true", help="do not open a browser")
    demo.add_argument("--no-dashboard", action="store_true", help="exit after the traffic instead of serving")
    demo.add_argument("--port", type=int, default=8501, help="dashboard port (default 8501)")
    demo.add_argument("--seed", type=int, default=42, help="simulator and traffic seed (default 42)")
    demo.set_defaults(func=_cmd_demo)

    sim = sub.add_parser("simulate", help="serve the Joule Cloud simulator until Ctrl-C")
    sim.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1)")
    sim.add_argument("--port", type=int, default=8088, help="port (default 8088; 0 picks a free one)")
    sim.add_argument("--seed", type=int, default=0, help="seed of every figure and answer (default 0)")
    sim.add_argument(
        "--budget",
        action="append",
        metavar="TOKEN=JOULES",
        help="monthly energy budget of an API token (repeatable)",
    )
    sim.add_argument("--token-delay", type=float, default=0.02, help="seconds between streamed tokens (default 0.02)")
    sim.add_argument("--latency", type=float, default=0.05, help="seconds before the first byte (default 0.05)")
    sim.add_argument(
        "--bill-out",
        metavar="FILE",
        help="write the bill of every receipt issued when the simulator stops (.csv, .jsonl, .json or .parquet)",
    )
    sim.set_defaults(func=_cmd_simulate)

    dash = sub.add_parser("dashboard", help="serve the Streamlit dashboard on 127.0.0.1")
    dash.add_argument("--db", help="ledger to show (default: JOULE_OTEL_DB or the per-user ledger)")
    dash.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1)")
    dash.add_argument("--port", type=int, default=8501, help="port (default 8501)")
    dash.add_argument("--no-browser", action="store_true", help="do not open a browser")
    dash.set_defaults(func=_cmd_dashboard)

    collect = sub.add_parser(
        "collect",
        help="receive OTLP (other languages' spans, joule-otel apps' call events) into the ledger",
        description="An OTLP/HTTP receiver: POST /v1/traces, POST /v1/logs, GET /healthz. Off loopback it requires "
        "JOULE_OTEL_COLLECT_TOKEN.",
    )
    collect.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    collect.add_argument("--port", type=int, default=4318, help="port (default 4318, OTLP/HTTP's)")
    collect.add_argument(
        "--grpc-port", type=int, default=4317, help="OTLP/gRPC port when grpcio is installed (default 4317; 0: off)"
    )
    collect.add_argument("--db", help="ledger to write (default: JOULE_OTEL_DB or the per-user ledger)")
    collect.set_defaults(func=_cmd_collect)

    sample = sub.add_parser("sample-data", help="regenerate the bundled sample ledger (Parquet)")
    sample.add_argument("output", help="the Parquet file to write (budgets.json is written beside it)")
    sample.add_argument("--calls", type=int, default=24_000, help="rows to generate (default 24000)")
    sample.add_argument("--days", type=int, default=21, help="days of history (default 21)")
    sample.add_argument("--seed", type=int, default=7, help="seed (default 7)")
    sample.set_defaults(func=_cmd_sample_data)

    budgets = sub.add_parser("budgets", help="energy budgets: Prometheus alert rules, month to date")
    bsub = budgets.add_subparsers(dest="budgets_command", required=True)
    rules = bsub.add_parser(
        "rules",
        help="write Prometheus recording and alerting rules for a budgets file",
        description="Rules over the joule.budget.* gauges apps export: a warning per threshold, a critical alert "
        "when the burn rate would spend a budget within --exhaustion-days, and one for any 402.",
    )
    rules.add_argument("file", help="budgets file (JSON, TOML or CSV), as JOULE_OTEL_BUDGETS names it")
    rules.add_argument("-o", "--output", help="rules file to write (default: standard output)")
    rules.add_argument("--thresholds", default="0.8,1", help="shares that alert, e.g. 0.5,0.8,1 (default 0.8,1)")
    rules.add_argument(
        "--exhaustion-days", type=float, default=7.0, help="alert when a budget runs out within this (default 7)"
    )
    rules.add_argument("--burn-window", default="6h", help="PromQL range the burn rate is measured over (default 6h)")
    status = bsub.add_parser("status", help="each budget against the ledger's energy this month")
    status.add_argument("file", help="budgets file (JSON, TOML or CSV)")
    status.add_argument("--db", help="ledger path (default: JOULE_OTEL_DB or the per-user ledger)")
    budgets.set_defaults(func=_cmd_budgets)

    proxy = sub.add_parser(
        "proxy",
        help="a recording gateway: apps without OpenTelemetry (curl, Go, PHP) call the API through it",
    )
    proxy.add_argument("--upstream", help="the API's base URL, e.g. https://api.greenjoules.cloud (required)")
    proxy.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    proxy.add_argument("--port", type=int, default=8787, help="port (default 8787)")
    proxy.add_argument("--db", help="ledger to write (default: JOULE_OTEL_DB or the per-user ledger)")
    proxy.add_argument("--workload", help="workload of calls that name none (default proxy)")
    proxy.add_argument(
        "--workloads", metavar="FILE", help='JSON {"<sha256 of an API key>": "workload"}: see --hash-key'
    )
    proxy.add_argument(
        "--api-key-env",
        metavar="NAME",
        help="send this variable's key upstream for clients that send none (needs JOULE_OTEL_PROXY_TOKEN)",
    )
    proxy.add_argument(
        "--hash-key", action="store_true", help="read an API key on standard input, print its hash for --workloads"
    )
    proxy.set_defaults(func=_cmd_proxy)

    rep = sub.add_parser(
        "report",
        help="energy, carbon, calls and tokens for a period, grouped by tags or columns (chargeback)",
        description="The ledger's calls in a period (UTC), grouped: by a tag key (team, customer...), workload, "
        "service, provider, model, requested_model, region, tier, operation, day, week or month. Calls without the "
        "tag are '(untagged)'. The total line is the ledger's for the period.",
    )
    rep.add_argument("--by", required=True, help="comma-separated groups, e.g. team or team,workload or customer,month")
    rep.add_argument(
        "--period", required=True, help="2026-11 (a month), 2026-11-05 (a day), 2026 or 2026-11-01..2026-11-15"
    )
    rep.add_argument("--format", choices=("table", "csv", "json", "markdown"), default="table", help="default table")
    rep.add_argument("--out", metavar="FILE", help="write the report here (a table still prints)")
    rep.add_argument("--db", help="ledger to read (default: JOULE_OTEL_DB or the per-user ledger)")
    rep.set_defaults(func=_cmd_report)

    rec = sub.add_parser(
        "reconcile",
        help="compare the ledger with Joule Cloud's bill: exit 0 when it explains the bill, 1 when not, 2 on bad input",
    )
    source = rec.add_mutually_exclusive_group(required=True)
    source.add_argument("--bill", metavar="FILE", help="the bill: CSV, JSON Lines, a JSON array or Parquet")
    source.add_argument(
        "--from-api", metavar="BASE_URL", help="read the bill from the service's receipts endpoint (BASE_URL/receipts)"
    )
    rec.add_argument(
        "--api-key-env",
        default="JOULE_API_KEY",
        metavar="NAME",
        help="environment variable holding the account's API key, for --from-api (default JOULE_API_KEY)",
    )
    rec.add_argument(
        "--db",
        action="append",
        metavar="LEDGER",
        help="a ledger; repeat for several hosts' files (default: JOULE_OTEL_DB or the per-user ledger)",
    )
    rec.add_argument(
        "--from", dest="start", metavar="DATE", help="start of the period, inclusive (default: the bill's)"
    )
    rec.add_argument("--to", dest="end", metavar="DATE", help="end of the period, exclusive (default: the bill's)")
    rec.add_argument("--tz", default="UTC", help="time zone of --from, --to and the days reported (default UTC)")
    rec.add_argument(
        "--map", action="append", metavar="FIELD=COLUMN", help="the bill's column for a field (e.g. energy_j=kwh_j)"
    )
    rec.add_argument("--format", choices=("text", "json", "csv", "markdown"), default="text", help="default text")
    rec.add_argument("--out", metavar="FILE", help="write the full result here (the summary still prints)")
    rec.add_argument(
        "--min-coverage",
        type=float,
        default=100.0,
        metavar="PERCENT",
        help="share of billed joules the ledgers must hold for exit 0 (default 100)",
    )
    rec.add_argument(
        "--skew",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="clock-skew allowance at the period's edges (default 2)",
    )
    rec.set_defaults(func=_cmd_reconcile)

    ledger = sub.add_parser("ledger", help="inspect and maintain the ledger")
    ledger.add_argument("--db", help="ledger path (default: JOULE_OTEL_DB or the per-user ledger)")
    lsub = ledger.add_subparsers(dest="ledger_command", required=True)
    stats = lsub.add_parser("stats", help="rows, receipts, time span, pending segments")
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")
    compact = lsub.add_parser("compact", help="move spooled segments into the DuckDB file now")
    compact.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the lock (default 30)")
    compact.add_argument(
        "--rebuild-rollup",
        action="store_true",
        help="recompute the dashboard's hourly rollup from every row (after editing rows by hand)",
    )
    prune_ = lsub.add_parser(
        "prune",
        help="delete calls before a date, keeping their hourly totals (retention)",
        description="Delete the ledger's single calls before DATE (midnight UTC); the hourly rollup keeps their "
        "totals, so the dashboard, budgets and reports by workload, model, region and tier still show them. The "
        "file is rewritten when that gives space back. Without --yes, says what it would delete.",
    )
    prune_.add_argument("--before", required=True, metavar="DATE", help="e.g. 2026-09-01")
    prune_.add_argument("--yes", action="store_true", help="delete (without it: say what would be deleted)")
    prune_.add_argument("--json", action="store_true", help="print the result as JSON")
    prune_.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the lock (default 60)")
    erase_ = lsub.add_parser(
        "erase",
        help="delete one workload's, service's or tag's calls and their totals (a customer who leaves)",
        description="Delete the calls of one workload, service or tag (KEY=VALUE), optionally only before DATE, and "
        "their share of the hourly totals. Without --yes, says what it would erase.",
    )
    chosen = erase_.add_mutually_exclusive_group(required=True)
    chosen.add_argument("--workload", help="a workload's calls")
    chosen.add_argument("--service", help="a service's calls")
    chosen.add_argument("--tag", metavar="KEY=VALUE", help="the calls with this tag, e.g. customer=acme")
    erase_.add_argument("--before", metavar="DATE", help="only calls before this date (UTC)")
    erase_.add_argument("--yes", action="store_true", help="erase (without it: say what would be erased)")
    erase_.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the lock (default 60)")
    export = lsub.add_parser("export", help="write inference_calls to Parquet or CSV")
    export.add_argument("output", help="the file to write: .parquet or .csv")
    export.add_argument("--format", choices=("parquet", "csv"), default=None, help="default: from the output's suffix")
    export.add_argument("--where", help="SQL filter, e.g. \"workload = 'support-bot'\"")
    export.add_argument(
        "--clickhouse",
        action="store_true",
        help="in the columns of ClickHouse's otel.joule_calls (deploy/clickhouse), with pruned hours' totals beside",
    )
    query = lsub.add_parser("query", help="run SQL against inference_calls")
    query.add_argument("sql", help='e.g. "select workload, sum(energy_j) from inference_calls group by 1"')
    query.add_argument("--json", action="store_true", help="print JSON instead of a table")
    # --db where a user types it: before or after the subcommand
    for subcommand in (stats, compact, prune_, erase_, export, query):
        subcommand.add_argument(
            "--db", default=argparse.SUPPRESS, help="ledger path (default: JOULE_OTEL_DB or the per-user ledger)"
        )
    ledger.set_defaults(func=_cmd_ledger)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``joule-otel`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except Exception as exc:
        message = _one_line(exc)
        if message is None:
            raise  # a bug of ours: the traceback is what a report needs
        print(f"joule-otel: {message}", file=sys.stderr)
        return 2


def _one_line(exc: Exception) -> str | None:
    """What to tell a user about an expected failure (bad input, a busy or full disk, a SQL error), in one line."""
    from joule_otel.ledger._compact import LedgerUnavailable, is_disk_full
    from joule_otel.ledger._spool import LockBusy

    if is_disk_full(exc):
        return f"disk full: {str(exc).splitlines()[0]} (free some space; spooled rows wait and nothing is lost)"
    if isinstance(exc, LockBusy):
        return f"the ledger is busy (another process holds {exc}); try again, or raise --timeout"
    expected: tuple[type[Exception], ...] = (ValueError, OSError, LedgerUnavailable)
    try:
        import duckdb

        expected = (*expected, duckdb.Error)
    except ImportError:
        pass
    if isinstance(exc, expected):
        return " ".join(str(exc).split())
    return None


if __name__ == "__main__":
    sys.exit(main())
