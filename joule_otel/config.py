"""Environment variables and the settings ``instrument()`` runs with.

Arguments are programming errors when invalid (``ValueError`` at once); environment values are
warned about and replaced by their default, so a typo in a deployment never stops the app.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

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
JOULE_OTEL_BUDGETS = "JOULE_OTEL_BUDGETS"
"""File of per-workload energy budgets for the dashboard (TOML, JSON or CSV)."""
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


def _truthy(raw: str | None) -> bool:
    return (raw or "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Settings:
    """Resolved configuration of one ``instrument()`` call."""

    db_path: Path | None
    workload: str | None
    flush_interval_s: float
    prometheus_port: int | None
    prometheus_host: str
    otlp_endpoint: str | None
    capture_content: bool
    max_workloads: int

    @classmethod
    def resolve(
        cls,
        *,
        db: str | os.PathLike[str] | None = None,
        workload: str | None = None,
        flush_interval_s: float | None = None,
        prometheus_port: int | None = None,
        otlp_endpoint: str | None = None,
        capture_content: bool | None = None,
    ) -> Settings:
        """Arguments win over the environment; invalid arguments raise ``ValueError``."""
        if db is not None and not isinstance(db, (str, os.PathLike)):
            raise ValueError(f"db must be a path or 'off', not {type(db).__name__}")
        if workload is not None and (not isinstance(workload, str) or not workload.strip()):
            raise ValueError("workload must be a non-empty string")
        if flush_interval_s is not None and (
            isinstance(flush_interval_s, bool)
            or not isinstance(flush_interval_s, (int, float))
            or not 0 < flush_interval_s <= 60
        ):
            raise ValueError(f"flush_interval_s must be a number in (0, 60], not {flush_interval_s!r}")
        if prometheus_port is not None and (
            isinstance(prometheus_port, bool)
            or not isinstance(prometheus_port, int)
            or not 0 <= prometheus_port < 65536
        ):
            raise ValueError(f"prometheus_port must be a TCP port number, not {prometheus_port!r}")
        if otlp_endpoint is not None and not (isinstance(otlp_endpoint, str) and "://" in otlp_endpoint):
            raise ValueError(f"otlp_endpoint must be a URL such as http://127.0.0.1:4318, not {otlp_endpoint!r}")

        if db is None:
            db_path = db_path_from_env()
        elif str(db).strip().lower() == "off":
            db_path = None
        else:
            db_path = Path(db).expanduser()
        max_workloads = int(_env_float(JOULE_OTEL_MAX_WORKLOADS, DEFAULT_MAX_WORKLOADS, 0, 100_000))
        return cls(
            db_path=db_path,
            workload=(workload or os.environ.get(JOULE_OTEL_WORKLOAD, "").strip() or None),
            flush_interval_s=float(flush_interval_s)
            if flush_interval_s is not None
            else _env_float(JOULE_OTEL_FLUSH_INTERVAL, DEFAULT_FLUSH_INTERVAL_S, 0, 60),
            prometheus_port=prometheus_port if prometheus_port is not None else _env_port(JOULE_OTEL_PROMETHEUS_PORT),
            prometheus_host=os.environ.get(JOULE_OTEL_PROMETHEUS_HOST, "").strip() or "127.0.0.1",
            otlp_endpoint=otlp_endpoint,
            capture_content=capture_content
            if capture_content is not None
            else _truthy(os.environ.get(OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT)),
            max_workloads=max_workloads,
        )
