"""What the ``joule-otel`` commands share: printing a table, the dashboard's command line.

A leaf below both :mod:`joule_otel.cli` and :mod:`joule_otel.demo`, so neither imports the other's internals.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any


def dashboard_command(*, host: str, port: int, browser: bool) -> list[str]:
    """The ``streamlit run`` command line for the packaged dashboard, private by default."""
    app = Path(__file__).parent / "dashboard" / "app.py"
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(app),
        "--server.address",
        host,
        "--server.port",
        str(port),
        "--browser.gatherUsageStats",
        "false",
        "--server.headless",
        "false" if browser else "true",
        "--global.developmentMode",
        "false",
    ]


def print_table(columns: list[str], rows: list[tuple[Any, ...]]) -> None:
    """Print ``rows`` under ``columns`` as aligned plain text."""
    text = [[("" if v is None else str(v)) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in text]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in text:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
