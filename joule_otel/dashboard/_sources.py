"""Where the dashboard's data comes from: a ledger, a Parquet/CSV export, or the bundled sample."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from joule_otel._config import JOULE_OTEL_DB, default_db_path
from joule_otel.ledger import _reader as reader
from joule_otel.ledger import _schema as schema
from joule_otel.ledger._spool import Spool

SAMPLE_PATH = Path(__file__).parent / "sample" / "inference_calls.parquet"
SAMPLE_BUDGETS_PATH = Path(__file__).parent / "sample" / "budgets.json"
_WEEK = timedelta(weeks=1)


@functools.cache
def _sample_last() -> datetime:
    import duckdb

    with duckdb.connect(":memory:") as con:
        found = con.execute("SELECT max(started_at) FROM read_parquet(?)", [str(SAMPLE_PATH)]).fetchone()
    assert found is not None
    last: datetime = found[0]
    return last.astimezone(timezone.utc)


def sample_shift(now: datetime | None = None) -> timedelta:
    """How far the bundled sample's calls are moved so that they end in the week before ``now``.

    The sample was generated once, with fixed dates; shown as recorded it would slide out of "Last 30 days"
    as the calendar moves on. A whole number of weeks keeps its weekdays and hours of day (weekends quiet,
    nightly jobs at night), and the newest call lands at most a week before now, so all three weeks show.
    """
    moment = now if now is not None else datetime.now(timezone.utc)
    return max((moment - _sample_last()) // _WEEK, 0) * _WEEK


@dataclass(frozen=True)
class Source:
    """A place to read ``inference_calls`` from."""

    path: Path
    kind: str  # "ledger" | "parquet" | "csv" | "sample"
    why: str

    @property
    def kind_label(self) -> str:
        """What kind of source this is, as a person says it."""
        return {"ledger": "Ledger", "parquet": "Parquet export", "csv": "CSV export", "sample": "Bundled sample data"}[
            self.kind
        ]

    @property
    def label(self) -> str:
        """What the sidebar shows."""
        return f"{self.kind_label}: {self.path}"

    def signature(self) -> tuple[Any, ...]:
        """Changes whenever the data may have changed (a cache key for the queries)."""
        stamps: list[Any] = [self.path]
        try:
            stamps.append(self.path.stat().st_mtime_ns)
        except OSError:
            stamps.append(None)
        if self.kind == "ledger":
            stamps.append(tuple(p.name for p in Spool(self.path).segments()))
        if self.kind == "sample":
            stamps.append(sample_shift())
        return tuple(stamps)

    @contextmanager
    def connect(self) -> Iterator[Any]:
        """A DuckDB connection with an ``inference_calls`` view over this source."""
        if self.kind == "ledger":
            with reader.connect(self.path) as con:
                yield con
            return
        import duckdb

        con = duckdb.connect(":memory:")
        try:
            function = "read_csv_auto" if self.kind == "csv" else "read_parquet"
            quoted = "'" + str(self.path).replace("'", "''") + "'"
            relation = f"{function}({quoted})"
            present = {r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {relation}").fetchall()}
            if not {"started_at", "energy_j"} <= present:  # never list what it has: a CSV's header is its first line
                raise ValueError(
                    f"{self.path} is not an export of inference_calls (no started_at and energy_j columns)"
                )
            # an export of an older version lacks later columns (provider): they read as NULL
            select = f"SELECT {schema.select_list(present)} FROM {relation}"
            if self.kind == "sample":
                days = sample_shift().days
                select = f"SELECT * REPLACE (started_at + INTERVAL {days} DAY AS started_at) FROM ({select})"
            con.execute(f"CREATE VIEW inference_calls AS {select}")
            yield con
        finally:
            con.close()


def _has_rows(path: Path) -> bool:
    if not path.exists() and not Spool(path).segments():
        return False
    try:
        with reader.connect(path, timeout_s=2) as con:
            return bool((con.execute("SELECT count(*) FROM inference_calls").fetchone() or (0,))[0])
    except Exception:
        return False


def source_for(path: str | os.PathLike[str], why: str) -> Source:
    """A source for a user-given path (ledger, ``.parquet`` or ``.csv``)."""
    resolved = Path(path).expanduser()
    suffix = resolved.suffix.lower()
    kind = "parquet" if suffix == ".parquet" else "csv" if suffix == ".csv" else "ledger"
    return Source(resolved, kind, why)


def resolve_source() -> Source:
    """``JOULE_OTEL_DB``, else the per-user ledger when it holds data, else the bundled sample."""
    configured = os.environ.get(JOULE_OTEL_DB, "").strip()
    if configured and configured.lower() != "off":
        return source_for(configured, f"from {JOULE_OTEL_DB}")
    default = default_db_path()
    if _has_rows(default):
        return Source(default, "ledger", "the per-user default ledger")
    return Source(SAMPLE_PATH, "sample", "no ledger with data was found, so this is sample data")
