"""Zero-code: ``opentelemetry-instrument python app.py`` fills the ledger with no change to app.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import duckdb
import pytest

APP = textwrap.dedent("""
    import sys
    import openai

    client = openai.OpenAI(base_url=sys.argv[1], api_key="jc_zero_code", max_retries=0)
    for _ in range(3):
        client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}])
    for _ in client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}],
                                            stream=True, stream_options={"include_usage": True}):
        pass
""")


def test_opentelemetry_instrument_fills_the_ledger(tmp_path: Path, joule_simulator):
    app = tmp_path / "app.py"
    app.write_text(APP)
    db = tmp_path / "zero.duckdb"
    env = dict(
        os.environ,
        JOULE_OTEL_DB=str(db),
        JOULE_OTEL_WORKLOAD="zero-code",
        OTEL_SERVICE_NAME="zc-app",
        OTEL_TRACES_EXPORTER="none",
        OTEL_METRICS_EXPORTER="none",
        OTEL_LOGS_EXPORTER="none",
    )
    instrument = shutil.which("opentelemetry-instrument", path=str(Path(sys.executable).parent))
    assert instrument, "opentelemetry-instrument is installed with opentelemetry-instrumentation"
    result = subprocess.run(
        [instrument, sys.executable, str(app), joule_simulator.base_url],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    with duckdb.connect(str(db), read_only=True) as con:
        found = con.execute("SELECT receipt_id, workload, service, energy_j FROM inference_calls").fetchall()
        total = con.execute("SELECT workload, sum(energy_j) FROM inference_calls GROUP BY 1").fetchall()
    issued = {r.receipt_id: r.energy_j for r in joule_simulator.receipts}
    assert {r[0]: r[3] for r in found} == issued
    assert {r[1] for r in found} == {"zero-code"}
    assert {r[2] for r in found} == {"zc-app"}
    # each row is exact (above); the total only differs in the last bit by the order DuckDB adds them in
    assert total[0][1] == pytest.approx(sum(issued.values()), rel=1e-12)


def test_opentelemetry_instrument_with_the_distros_defaults_captures(tmp_path: Path, joule_simulator):
    """opentelemetry-distro defaults every exporter to OTLP over gRPC; with joule-otel[otlp] that starts and captures.

    Nothing listens on the OTLP port here: export fails quietly in the background while the ledger fills.
    """
    app = tmp_path / "app.py"
    app.write_text(APP)
    db = tmp_path / "distro.duckdb"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(
        JOULE_OTEL_DB=str(db),
        OTEL_SERVICE_NAME="distro-app",
        # where the distro's gRPC exporters send: a closed loopback port, and a short timeout, so exit is quick
        OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9",
        OTEL_EXPORTER_OTLP_TIMEOUT="1",
    )
    instrument = shutil.which("opentelemetry-instrument", path=str(Path(sys.executable).parent))
    assert instrument
    result = subprocess.run(
        [instrument, sys.executable, str(app), joule_simulator.base_url],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    assert "Failed to auto initialize" not in result.stderr
    with duckdb.connect(str(db), read_only=True) as con:
        found = con.execute("SELECT receipt_id, service FROM inference_calls").fetchall()
    assert sorted(r[0] for r in found) == sorted(r.receipt_id for r in joule_simulator.receipts)
    assert {r[1] for r in found} == {"distro-app"}
