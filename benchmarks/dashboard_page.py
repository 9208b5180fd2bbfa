"""The dashboard's whole page on one ledger, as Streamlit runs it (AppTest): a fresh process's first page, then
warm pages (the process and DuckDB warm, Streamlit's data cache cleared, so every query runs). Prints JSON.

    python benchmarks/dashboard_page.py LEDGER
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ["JOULE_OTEL_DB"] = sys.argv[1]
started = time.perf_counter()
import streamlit as st
from streamlit.testing.v1 import AppTest

import joule_otel

APP = Path(joule_otel.__file__).parent / "dashboard" / "app.py"
imports_s = time.perf_counter() - started

page = AppTest.from_file(str(APP), default_timeout=600)
t0 = time.perf_counter()
page.run()
cold_s = time.perf_counter() - t0
assert not page.exception, page.exception
warm = []
for _ in range(3):
    st.cache_data.clear()
    t0 = time.perf_counter()
    page.run()
    warm.append(time.perf_counter() - t0)
t0 = time.perf_counter()
page.run()  # within the cache's five seconds: what a rerun without new data costs
cached_s = time.perf_counter() - t0
print(json.dumps({"imports_s": imports_s, "cold_s": cold_s, "warm_s": min(warm), "cached_s": cached_s}))
