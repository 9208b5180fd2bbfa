"""What the ``joule-otel`` commands share: printing a table, the dashboard's command line.

A leaf below both :mod:`joule_otel._cli` and :mod:`joule_otel._demo`, so neither imports the other's internals.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any


def dashboard_command(*, host: str, port: int) -> list[str]:
    """The ``streamlit run`` command line for the packaged dashboard: private, silent, the product's toolbar only.

    Always headless: Streamlit's first run otherwise stops at an "Email:" prompt (and, without a terminal, exits
    255); the caller opens the browser itself.
    """
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
        "true",
        "--global.developmentMode",
        "false",
        "--client.toolbarMode",
        "minimal",  # no Deploy button or developer menu in the product
    ]


def port_taken(host: str, port: int) -> bool:
    """Whether something already listens on ``host:port`` (it would serve its own page at our URL)."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def open_browser_when_up(url: str, host: str, port: int) -> None:
    """Open ``url`` in a browser once the server answers, from a detached helper (the caller may exec away)."""
    import subprocess

    helper = (
        "import socket, sys, time, webbrowser\n"
        "for _ in range(150):\n"
        "    try:\n"
        "        socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=1).close()\n"
        "        webbrowser.open(sys.argv[1]); break\n"
        "    except OSError:\n"
        "        time.sleep(0.2)\n"
    )
    subprocess.Popen(
        [sys.executable, "-c", helper, url, host, str(port)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def print_table(columns: list[str], rows: list[tuple[Any, ...]]) -> None:
    """Print ``rows`` under ``columns`` as aligned plain text."""
    text = [[("" if v is None else str(v)) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in text]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in text:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
