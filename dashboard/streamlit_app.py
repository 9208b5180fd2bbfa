"""`streamlit run dashboard` from a checkout: runs the packaged app (joule_otel/dashboard/app.py)."""

import runpy
from pathlib import Path

runpy.run_path(str(Path(__file__).resolve().parent.parent / "joule_otel" / "dashboard" / "app.py"), run_name="__main__")
