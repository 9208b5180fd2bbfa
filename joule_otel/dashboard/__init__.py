"""The energy dashboard: ``joule-otel dashboard`` (or ``streamlit run`` on this package's ``app.py``).

Nothing here is imported by users; ``app.py`` is the Streamlit script, the rest is its private parts.
"""

__all__: list[str] = []
