"""Moves a test run's Python processes to another date: ``JOULE_OTEL_TEST_CLOCK=32`` runs them 32 days from now.

A suite that passes today must pass next month (sample data, budgets' months, rollup hours, time ranges). CI
runs it a second time with the clock moved; ``tests/conftest.py`` moves the test process and puts this folder on
``PYTHONPATH``, so every Python child a test starts (an app, ``collect``, the dashboard's server) moves too.
The clock keeps ticking; monotonic clocks, DuckDB's ``now()``, Chromium and Node keep the real date.
"""

from __future__ import annotations

import os

_days = os.environ.get("JOULE_OTEL_TEST_CLOCK", "").strip()
if _days:
    from datetime import datetime, timedelta, timezone

    import time_machine

    time_machine.travel(datetime.now(timezone.utc) + timedelta(days=float(_days)), tick=True).start()
