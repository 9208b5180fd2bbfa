"""The README is a manual that runs: every Python block in it, against the simulator, as a reader would paste it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import duckdb

from joule_otel.simulator import running

pytest_plugins = ["pytester"]

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)

# Prepended to the README's code, never part of it: any address off loopback is refused, so a block that named
# the real service would fail here instead of calling it.
LOOPBACK_ONLY = """
import ipaddress, socket
_resolve = socket.getaddrinfo
def _loopback_only(host, *args, **kwargs):
    found = _resolve(host, *args, **kwargs)
    if any(not ipaddress.ip_address(info[4][0]).is_loopback for info in found):
        raise OSError(f"the README's code reached for {host}, off loopback")
    return found
socket.getaddrinfo = _loopback_only
"""


def test_the_readme_is_a_manual_of_at_most_400_lines():
    assert len(README.read_text().splitlines()) <= 400
    assert len(BLOCKS) >= 3


def test_the_readmes_python_runs_against_the_simulator(tmp_path):
    """The app blocks, in order, as one script: instrument, call, read the ledger back."""
    script = "\n".join(block for block in BLOCKS if "def test_" not in block)
    db = tmp_path / "ledger" / "joule.duckdb"
    with running(seed=3) as sim:
        done = subprocess.run(
            [sys.executable, "-c", LOOPBACK_ONLY + script],
            env={
                "PATH": "/usr/bin:/bin",
                "HOME": str(tmp_path),
                "JC_BASE_URL": sim.base_url,
                "JC_API_KEY": "jc_readme",
                "JOULE_OTEL_DB": str(db),
                "OTEL_SERVICE_NAME": "readme",
            },
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )
        billed = sim.receipts
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(billed) == 1
    with duckdb.connect(str(db), read_only=True) as con:
        rows = con.execute("SELECT receipt_id, workload, energy_j, routed_to FROM inference_calls").fetchall()
    assert rows == [(billed[0].receipt_id, "support-bot", billed[0].energy_j, billed[0].routed_to)]
    # the block that reads the ledger printed joules per routed model
    assert billed[0].routed_to in done.stdout and f"{billed[0].energy_j}"[:5] in done.stdout


def test_the_readmes_pytest_blocks_run_as_a_suite(pytester):
    tests = [block for block in BLOCKS if "def test_" in block]
    assert tests
    pytester.makepyfile(test_readme_blocks="import pytest\n\n" + "\n\n".join(tests))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=len(tests))
