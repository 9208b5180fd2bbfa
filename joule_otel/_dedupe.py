"""Which calls were seen already: a call that arrives twice is one row.

A call is known by its receipt id (Joule's idempotency key), else by its trace and span ids (a received span or
event retried by its sender). Within one process a bounded window of recent keys drops a repeat before it reaches
disk; compaction enforces the same keys across processes and hours (:mod:`joule_otel.ledger._compact`).
"""

from __future__ import annotations

from collections import OrderedDict

from joule_otel.ledger._row import LedgerRow

RECENT_CALLS = 200_000
"""Keys remembered: a sender's retry or a client's replay comes within seconds, so far fewer calls than this apart."""

CallKey = tuple[str, ...]


def call_key(row: LedgerRow) -> CallKey | None:
    """The key a repeat of ``row`` would have, or None for a call that cannot be told apart (no receipt, no span)."""
    if row.receipt_id:
        return (row.receipt_id,)
    if row.span_id:
        return (row.trace_id or "", row.span_id)
    return None


class RecentCalls:
    """The keys of the last :data:`RECENT_CALLS` calls; not thread-safe (its owner's one thread uses it)."""

    def __init__(self, window: int = RECENT_CALLS) -> None:
        self.window = window
        self.repeats = 0
        self._keys: OrderedDict[CallKey, None] = OrderedDict()

    def fresh(self, row: LedgerRow, marked: list[CallKey] | None = None) -> bool:
        """Whether ``row`` is not a repeat of a recent call (a repeat is counted).

        Its key is remembered from now on, and added to ``marked`` (to be forgotten if the row does not reach disk).
        """
        key = call_key(row)
        if key is None:
            return True
        keys = self._keys
        if key in keys:
            self.repeats += 1
            return False
        keys[key] = None
        if marked is not None:
            marked.append(key)
        if len(keys) > self.window:
            keys.popitem(last=False)
        return True

    def forget(self, keys: list[CallKey]) -> None:
        """Forget ``keys``: their rows did not reach disk, so a sender's retry of them is not a repeat."""
        for key in keys:
            self._keys.pop(key, None)
