"""Environment variables and the settings ``instrument()`` runs with.

Arguments are programming errors when invalid (``ValueError`` at once); environment values are
warned about and replaced by their default, so a typo in a deployment never stops the app.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from joule_otel import _tags
from joule_otel._headers import clean_string

METRICS_MODES = ("all", "energy", "none")

_log = logging.getLogger("joule_otel")

JOULE_OTEL_DB = "JOULE_OTEL_DB"
"""Ledger path; ``off`` disables the ledger. Default: ``joule.duckdb`` in the user's data folder."""
JOULE_OTEL_WORKLOAD = "JOULE_OTEL_WORKLOAD"
"""Default workload tag."""
JOULE_OTEL_FLUSH_INTERVAL = "JOULE_OTEL_FLUSH_INTERVAL"
"""Seconds between ledger flushes (bounds loss on kill -9). Default 1."""
JOULE_OTEL_PROMETHEUS_PORT = "JOULE_OTEL_PROMETHEUS_PORT"
"""Serve a Prometheus scrape endpoint on this port (loopback unless JOULE_OTEL_PROMETHEUS_HOST)."""
JOULE_OTEL_PROMETHEUS_HOST = "JOULE_OTEL_PROMETHEUS_HOST"
"""Address the Prometheus endpoint binds. Default 127.0.0.1."""
JOULE_OTEL_TRACE_URL = "JOULE_OTEL_TRACE_URL"
"""Template with ``{trace_id}`` that the dashboard links receipts to."""
JOULE_OTEL_BILL = "JOULE_OTEL_BILL"
"""A bill (CSV, JSON Lines, JSON or Parquet) the dashboard's Bill tab opens first; ``joule-otel demo`` sets it."""
JOULE_OTEL_BUDGETS = "JOULE_OTEL_BUDGETS"
"""File of monthly energy budgets per workload (JSON, TOML or CSV): the dashboard, warnings, gauges, alert rules."""
JOULE_OTEL_BUDGET_THRESHOLDS = "JOULE_OTEL_BUDGET_THRESHOLDS"
"""Shares of a budget that log a warning, e.g. ``0.8,1`` (the default) or ``50%,90%,100%``."""
JOULE_OTEL_METRICS = "JOULE_OTEL_METRICS"
"""Which metrics are recorded: ``all`` (default), ``energy`` (the ``joule.*`` ones only), ``none``."""
JOULE_OTEL_CALL_EVENTS = "JOULE_OTEL_CALL_EVENTS"
"""Send one OTLP log record per call (for ``joule-otel collect``). Default off."""
JOULE_OTEL_COLLECT_TOKEN = "JOULE_OTEL_COLLECT_TOKEN"
"""Bearer token ``joule-otel collect`` requires; required when it listens off loopback."""
JOULE_OTEL_TAGS = "JOULE_OTEL_TAGS"
"""Tags on every call this process makes, e.g. ``team=search,env=prod`` (a ``tags()`` block wins a key it sets)."""
JOULE_OTEL_METRIC_TAGS = "JOULE_OTEL_METRIC_TAGS"
"""Tag keys that are also metric attributes (``team,customer``), each capped at JOULE_OTEL_MAX_WORKLOADS values."""
JOULE_OTEL_RETENTION = "JOULE_OTEL_RETENTION"
"""How long the ledger keeps single calls (``90d``, ``12w``, ``6m``, ``1y``); their hourly totals are kept."""
JOULE_OTEL_MAX_WORKLOADS = "JOULE_OTEL_MAX_WORKLOADS"
"""Distinct workload values metrics carry before the rest become ``other``. Default 50."""
OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
"""Opt-in prompt capture onto spans (never the ledger or metrics)."""

DEFAULT_FLUSH_INTERVAL_S = 1.0
DEFAULT_MAX_WORKLOADS = 50


def default_db_path() -> Path:
    """``joule.duckdb`` in the user's data folder (``~/.local/share/joule-otel/`` on Linux)."""
    from platformdirs import user_data_path

    return user_data_path("joule-otel", appauthor=False) / "joule.duckdb"


def db_path_from_env() -> Path | None:
    """The ledger path ``JOULE_OTEL_DB`` names, the default when unset, ``None`` when ``off``."""
    raw = os.environ.get(JOULE_OTEL_DB, "").strip()
    if raw.lower() == "off":
        return None
    return Path(raw).expanduser() if raw else default_db_path()


def _env_float(name: str, default: float, low: float, high: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not low < value <= high:
        _log.warning("joule_otel: %s=%r is not a number in (%s, %s]; using %s", name, raw, low, high, default)
        return default
    return value


def _env_port(name: str) -> int | None:
    raw = os.environ.get(name, "").strip()
    if not raw or raw.lower() == "off":
        return None
    if raw.isdigit() and 0 <= int(raw) < 65536:
        return int(raw)
    _log.warning("joule_otel: %s=%r is not a TCP port; the Prometheus endpoint stays off", name, raw)
    return None


def _env_choice(name: str, choices: tuple[str, ...], default: str) -> str:
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw not in choices:
        _log.warning("joule_otel: %s=%r is not one of %s; using %s", name, raw, ", ".join(choices), default)
        return default
    return raw


def _truthy(raw: str | None) -> bool:
    return (raw or "").strip().lower() in ("1", "true", "yes", "on")


OPTION_ALIASES = {"flush_interval_s": "flush_interval"}
"""Older spellings ``instrument()`` still takes."""


def _check_workload(value: object, where: str) -> str:
    cleaned = clean_string(value) if isinstance(value, str) else None
    if not cleaned:
        raise ValueError(f"{where} must be a non-empty string, not {value!r}")
    return cleaned


@dataclass(frozen=True)
class Settings:
    """Resolved configuration of one ``instrument()`` call; each option mirrors an environment variable."""

    db_path: Path | None
    workload: str | None
    flush_interval_s: float
    prometheus_port: int | None
    prometheus_host: str
    otlp_endpoint: str | None
    capture_content: bool
    max_workloads: int
    metrics: str
    call_events: bool
    budgets: tuple[Any, ...] = ()
    """:class:`joule_otel._budgets.Budget` s to watch (from ``budgets=`` or ``JOULE_OTEL_BUDGETS``)."""
    budget_thresholds: tuple[float, ...] = (0.8, 1.0)
    tags: tuple[tuple[str, str], ...] = ()
    """The process's tags, as ``((key, value), ...)`` (from ``tags=`` or ``JOULE_OTEL_TAGS``)."""
    metric_tags: tuple[str, ...] = ()
    """Tag keys on metrics (``metric_tags=`` or ``JOULE_OTEL_METRIC_TAGS``)."""

    OPTIONS: ClassVar[dict[str, str]] = {
        "db": JOULE_OTEL_DB,
        "workload": JOULE_OTEL_WORKLOAD,
        "flush_interval": JOULE_OTEL_FLUSH_INTERVAL,
        "metrics": JOULE_OTEL_METRICS,
        "prometheus_port": JOULE_OTEL_PROMETHEUS_PORT,
        "prometheus_host": JOULE_OTEL_PROMETHEUS_HOST,
        "max_workloads": JOULE_OTEL_MAX_WORKLOADS,
        "otlp_endpoint": "OTEL_EXPORTER_OTLP_ENDPOINT",
        "capture_content": OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT,
        "call_events": JOULE_OTEL_CALL_EVENTS,
        "budgets": JOULE_OTEL_BUDGETS,
        "budget_thresholds": JOULE_OTEL_BUDGET_THRESHOLDS,
        "tags": JOULE_OTEL_TAGS,
        "metric_tags": JOULE_OTEL_METRIC_TAGS,
    }
    """``instrument()`` option → the environment variable it overrides."""

    @classmethod
    def resolve(cls, **options: Any) -> Settings:
        """Options (named as in :attr:`OPTIONS`) win over the environment; an invalid option raises ``ValueError``."""
        options = {k: v for k, v in options.items() if v is not None}
        for old, new in OPTION_ALIASES.items():
            if old in options:
                if new in options:
                    raise ValueError(f"pass {new}= or {old}=, not both")
                options[new] = options.pop(old)
        unknown = sorted(set(options) - set(cls.OPTIONS))
        if unknown:
            raise ValueError(
                f"instrument() got unknown option(s) {', '.join(unknown)}; valid options: "
                + ", ".join(sorted([*cls.OPTIONS, "tracer_provider", "meter_provider"]))
            )
        db = options.get("db")
        if db is not None and not isinstance(db, (str, os.PathLike)):
            raise ValueError(f"db must be a path or 'off', not {type(db).__name__}")
        workload = options.get("workload")
        if workload is not None:
            workload = _check_workload(workload, "workload")
        flush_interval = options.get("flush_interval")
        if flush_interval is not None and (
            isinstance(flush_interval, bool)
            or not isinstance(flush_interval, (int, float))
            or not 0 < flush_interval <= 60
        ):
            raise ValueError(f"flush_interval must be a number of seconds in (0, 60], not {flush_interval!r}")
        for name in ("prometheus_port", "max_workloads"):
            value = options.get(name)
            high = 65535 if name == "prometheus_port" else 100_000
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high):
                raise ValueError(f"{name} must be a whole number in [0, {high}], not {value!r}")
        host = options.get("prometheus_host")
        if host is not None and (not isinstance(host, str) or not host.strip()):
            raise ValueError(f"prometheus_host must be an address such as 127.0.0.1, not {host!r}")
        endpoint = options.get("otlp_endpoint")
        if endpoint is not None and not (isinstance(endpoint, str) and "://" in endpoint):
            raise ValueError(f"otlp_endpoint must be a URL such as http://127.0.0.1:4318, not {endpoint!r}")
        metrics_mode = options.get("metrics")
        if metrics_mode is not None and metrics_mode not in METRICS_MODES:
            raise ValueError(f"metrics must be one of {', '.join(METRICS_MODES)}, not {metrics_mode!r}")
        for name in ("capture_content", "call_events"):
            if options.get(name) is not None and not isinstance(options[name], bool):
                raise ValueError(f"{name} must be True or False, not {options[name]!r}")
        capture_content = options.get("capture_content")
        call_events = options.get("call_events")
        budgets, thresholds = _budget_options(options.get("budgets"), options.get("budget_thresholds"))
        tags = options.get("tags")
        if tags is not None:
            if not isinstance(tags, dict):
                raise ValueError(f"tags must be a dict of tag → value, not {type(tags).__name__}")
            tags = _tags.checked(tags, "tags")
        else:
            tags = _env_tags()
        metric_tags = options.get("metric_tags")
        if metric_tags is not None:
            if not isinstance(metric_tags, (list, tuple)) or not all(_tags.clean_key(k) == k for k in metric_tags):
                raise ValueError(f"metric_tags must be a list of tag keys such as ['team'], not {metric_tags!r}")
            metric_tags = tuple(dict.fromkeys(metric_tags))
        else:
            metric_tags = _env_metric_tags()

        if db is None:
            db_path = db_path_from_env()
        elif str(db).strip().lower() == "off":
            db_path = None
        else:
            db_path = Path(db).expanduser()
        if workload is None:
            raw = os.environ.get(JOULE_OTEL_WORKLOAD, "")
            workload = clean_string(raw)
            if raw.strip() and workload != raw.strip():
                _log.warning(
                    "joule_otel: %s was cleaned to %r (control characters, 256 characters at most)",
                    JOULE_OTEL_WORKLOAD,
                    workload,
                )
        return cls(
            db_path=db_path,
            workload=workload,
            flush_interval_s=float(flush_interval)
            if flush_interval is not None
            else _env_float(JOULE_OTEL_FLUSH_INTERVAL, DEFAULT_FLUSH_INTERVAL_S, 0, 60),
            prometheus_port=options.get("prometheus_port", _env_port(JOULE_OTEL_PROMETHEUS_PORT)),
            prometheus_host=(host or os.environ.get(JOULE_OTEL_PROMETHEUS_HOST, "")).strip() or "127.0.0.1",
            otlp_endpoint=endpoint,
            capture_content=capture_content
            if capture_content is not None
            else _truthy(os.environ.get(OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT)),
            max_workloads=options.get(
                "max_workloads", int(_env_float(JOULE_OTEL_MAX_WORKLOADS, DEFAULT_MAX_WORKLOADS, 0, 100_000))
            ),
            metrics=metrics_mode or _env_choice(JOULE_OTEL_METRICS, METRICS_MODES, "all"),
            call_events=call_events if call_events is not None else _truthy(os.environ.get(JOULE_OTEL_CALL_EVENTS)),
            budgets=budgets,
            budget_thresholds=thresholds,
            tags=tuple(tags.items()),
            metric_tags=metric_tags,
        )


def _env_metric_tags() -> tuple[str, ...]:
    """``JOULE_OTEL_METRIC_TAGS``: keys that cannot be tag keys are warned about and left out."""
    found = []
    for raw in os.environ.get(JOULE_OTEL_METRIC_TAGS, "").split(","):
        if not raw.strip():
            continue
        key = _tags.clean_key(raw)
        if key is None:
            _log.warning("joule_otel: %s: %r is not a tag key; left out", JOULE_OTEL_METRIC_TAGS, raw.strip())
        elif key not in found:
            found.append(key)
    return tuple(found)


def _env_tags() -> dict[str, str]:
    """``JOULE_OTEL_TAGS``; a value that cannot be read is warned about and ignored (the app runs on)."""
    raw = os.environ.get(JOULE_OTEL_TAGS, "")
    if not raw.strip():
        return {}
    try:
        found = _tags.parse(raw)
        if len(found) > _tags.MAX_TAGS:
            raise ValueError(f"{JOULE_OTEL_TAGS}: {len(found)} tags; a call keeps at most {_tags.MAX_TAGS}")
    except ValueError as exc:
        _log.warning("joule_otel: %s; the process's tags are ignored", exc)
        return {}
    return found


def _budget_options(budgets: Any, thresholds: Any) -> tuple[tuple[Any, ...], tuple[float, ...]]:
    """``budgets=`` (a file, or ``{workload: joules}``) and ``budget_thresholds=``, else their variables.

    An invalid option raises ``ValueError``; an invalid variable or file named by one is warned about and
    ignored (capture goes on without budgets).
    """
    from joule_otel._budgets import DEFAULT_THRESHOLDS, budgets_of, load_budgets, parse_thresholds

    if thresholds is not None:
        if isinstance(thresholds, (str, bytes)) or not all(
            isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t <= 10 for t in thresholds
        ):
            raise ValueError(f"budget_thresholds must be shares such as (0.8, 1.0), not {thresholds!r}")
        shares = tuple(sorted({float(t) for t in thresholds})) or DEFAULT_THRESHOLDS
    else:
        try:
            shares = parse_thresholds(os.environ.get(JOULE_OTEL_BUDGET_THRESHOLDS))
        except ValueError as exc:
            _log.warning("joule_otel: %s; using 80%% and 100%%", exc)
            shares = DEFAULT_THRESHOLDS
    if isinstance(budgets, dict):
        return tuple(budgets_of(budgets)), shares  # ValueError: says which entry and why
    if budgets is not None and not isinstance(budgets, (str, os.PathLike)):
        raise ValueError(f"budgets must be a file path or a {{workload: joules}} dict, not {type(budgets).__name__}")
    if budgets is not None:
        return tuple(load_budgets(budgets)), shares  # ValueError: says which entry and why
    try:
        return tuple(load_budgets()), shares
    except ValueError as exc:
        _log.warning("joule_otel: %s (%s); budget warnings and gauges are off", exc, JOULE_OTEL_BUDGETS)
        return (), shares
