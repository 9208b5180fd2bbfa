"""The dashboard's first run, as a newcomer meets it: silent, headless, private, one clear line when it cannot start."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from joule_otel._terminal import dashboard_command

APP = str(Path(__file__).parent.parent / "joule_otel" / "dashboard" / "app.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_streamlit_command_is_headless_private_and_without_developer_menus():
    cmd = dashboard_command(host="127.0.0.1", port=8501)
    options = dict(zip(cmd[5::2], cmd[6::2], strict=True))
    assert options["--server.headless"] == "true"  # no "Email:" prompt, no exit 255 without a terminal
    assert options["--browser.gatherUsageStats"] == "false"
    assert options["--server.address"] == "127.0.0.1"
    assert options["--client.toolbarMode"] == "minimal"  # no Deploy button


def test_dashboard_starts_silently_without_a_terminal_or_a_streamlit_folder(tmp_path):
    port = free_port()
    home = tmp_path / "home"  # no ~/.streamlit: a first run
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "XDG_DATA_HOME": str(tmp_path / "xdg")}
    env.pop("JOULE_OTEL_DB", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "joule_otel._cli", "dashboard", "--port", str(port), "--no-browser"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=tmp_path,  # any working directory
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as response:
                    assert response.status == 200
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                assert time.monotonic() < deadline, "the dashboard did not come up"
                time.sleep(0.3)
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=30)
    assert "Email" not in output
    assert "usage statistics" not in output.lower()
    assert not (home / ".streamlit" / "credentials.toml").exists()


def test_a_taken_port_is_one_clear_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for command in (["dashboard", "--no-browser"], ["demo", "--no-browser", "--calls", "5"]):
            result = subprocess.run(
                [sys.executable, "-m", "joule_otel._cli", *command, "--port", str(port)],
                capture_output=True,
                text=True,
                timeout=60,
                env={**os.environ, "XDG_DATA_HOME": str(tmp_path / "xdg")},
            )
            assert result.returncode == 2
            assert result.stderr.count("\n") == 1 and "--port" in result.stderr and str(port) in result.stderr


def test_no_stray_text_renders_above_the_title(monkeypatch, tmp_path):
    """A bare string statement in the app is Streamlit "magic": it would render on every page."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("JOULE_OTEL_DB", raising=False)
    at = AppTest.from_file(APP, default_timeout=90).run()
    assert not at.exception
    texts = [m.value for m in at.markdown] + [m.value for m in at.sidebar.markdown]
    assert not any("month to date as of the newest call" in t for t in texts)


def test_every_option_has_help_and_ledger_db_goes_where_a_user_types_it(tmp_path):
    import argparse

    from joule_otel._cli import build_parser, main

    def walk(parser: argparse.ArgumentParser) -> list[tuple[str, str | None]]:
        found = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    found += walk(sub)
            elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                found.append((f"{parser.prog} {'/'.join(action.option_strings) or action.dest}", action.help))
        return found

    missing = [name for name, text in walk(build_parser()) if not text]
    assert missing == []
    db = tmp_path / "l.duckdb"
    from joule_otel.ledger._compact import open_writable

    open_writable(db).close()  # type: ignore[attr-defined]
    assert main(["ledger", "stats", "--db", str(db), "--json"]) == 0
    assert main(["ledger", "--db", str(db), "stats"]) == 0
    result = subprocess.run(
        [sys.executable, "-m", "joule_otel._cli", "ledger", "query", "--db", str(db), "select nope from nowhere"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "nowhere" in result.stderr


def test_reading_a_path_never_writes_anything(tmp_path):
    from joule_otel.ledger import _reader as reader

    missing = tmp_path / "no" / "such" / "folder" / "ledger.duckdb"
    with reader.connect(missing) as con:
        assert con.execute("SELECT count(*) FROM inference_calls").fetchone() == (0,)
    assert not (tmp_path / "no").exists()
    plain = tmp_path / "passwd"
    plain.write_text("root:x:0:0\n")
    with reader.connect(plain) as con:  # not a ledger: no rows, and no passwd.lock beside it
        assert con.execute("SELECT count(*) FROM inference_calls").fetchone() == (0,)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["passwd"]


def test_no_string_statement_renders_on_the_page():
    """Streamlit "magic" writes a bare expression statement to the page: the app has none but docstrings."""
    import ast

    import joule_otel

    tree = ast.parse((Path(joule_otel.__file__).parent / "dashboard" / "app.py").read_text())
    docstrings = {id(tree.body[0])} | {
        id(node.body[0]) for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.ClassDef))
    }
    stray = [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and id(node) not in docstrings
    ]
    assert stray == [], f"bare strings at lines {stray} would render on every page"


def test_streamlit_run_from_another_folder_binds_loopback_only(tmp_path):
    """`streamlit run /path/to/checkout/dashboard` elsewhere: the checkout's config still applies (loopback)."""
    import psutil

    port = free_port()
    home = tmp_path / "home"
    home.mkdir()
    checkout_dashboard = Path(__file__).resolve().parent.parent / "dashboard"
    env = {**os.environ, "HOME": str(home), "XDG_DATA_HOME": str(tmp_path / "xdg")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(checkout_dashboard), "--server.port", str(port)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2):
                    break
            except OSError:
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                assert time.monotonic() < deadline, "the dashboard did not come up"
                time.sleep(0.3)
        listening = {
            c.laddr.ip
            for c in psutil.Process(proc.pid).net_connections()
            if c.status == "LISTEN" and c.laddr.port == port
        }
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=30)
    assert listening == {"127.0.0.1"}, listening
    assert "Email" not in output and "usage statistics" not in output.lower()
