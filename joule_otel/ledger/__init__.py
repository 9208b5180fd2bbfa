"""The ledger: one DuckDB file (``inference_calls``, one row per billed call) plus the segments not yet compacted.

What users may import: :func:`read_ledger` (also ``joule_otel.read_ledger``), :func:`connect` for SQL of their own
while apps keep writing, :class:`LedgerRow` (a row's shape, in table order) and :data:`COLUMN_NAMES`. The writer,
the spool and compaction are internal: apps write through ``instrument()``, ``joule-otel collect`` and
``joule-otel proxy``.
"""

from __future__ import annotations

from joule_otel.ledger._reader import connect
from joule_otel.ledger._reader import read_calls as read_ledger
from joule_otel.ledger._row import LedgerRow
from joule_otel.ledger._schema import COLUMN_NAMES, LedgerTooNew

__all__ = ["COLUMN_NAMES", "LedgerRow", "LedgerTooNew", "connect", "read_ledger"]
