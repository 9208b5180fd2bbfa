"""The calls ``joule-otel collect`` holds while they wait for their GenAI parent span, kept on disk.

A CLIENT span whose parent comes in a later export waits in memory for up to 15 s (Node's and Java's batch
processors export every 5 s). Its request is answered only once the call is on disk here: each receiver rewrites
its journal (the rows of every waiting call, as they would be written without their parent's facts) before it
answers. When the parent comes, the completed row goes to a segment and the journal is rewritten without it.

A receiver killed in that window leaves its journal behind; the next receiver on the ledger writes those rows as
a segment at start (their parent never came in time: the same row expiry would have written). A row completed
and written before the kill is not doubled: compaction keeps the first row of a receipt (or of a trace and span).
Each journal belongs to the receiver holding the ``flock`` on its lock file, so two receivers sharing a ledger
never take each other's journal.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
from pathlib import Path
from typing import Any

from joule_otel.ledger._row import LedgerRow
from joule_otel.ledger._spool import Spool

_log = logging.getLogger("joule_otel.collect")

PREFIX = "collect-waiting-"


class WaitingJournal:
    """This receiver's journal of waiting calls in the ledger's spool folder."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        spool.ensure()
        name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        self.path = spool.dir / f"{name}.journal"
        self._lock_path = spool.dir / f"{name}.lock"
        self._lock_fd = os.open(self._lock_path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a fresh name: never held by another
        self._written = 0
        """How many rows the journal on disk holds (0: no file)."""

    def write(self, rows: list[LedgerRow]) -> bool:
        """Replace the journal with ``rows`` (atomically); False if the disk refused."""
        from joule_otel.ledger._writer import rows_to_arrow

        try:
            if not rows:
                if self._written:
                    self.path.unlink(missing_ok=True)
                self._written = 0
                return True
            from pyarrow import feather

            tmp = self.path.with_name(f".{self.path.name}.tmp")
            feather.write_feather(rows_to_arrow(rows), tmp, compression="uncompressed")
            os.replace(tmp, self.path)
        except OSError as exc:
            _log.warning("joule-otel collect: cannot keep waiting calls on disk (%s); their requests get 503", exc)
            return False
        self._written = len(rows)
        return True

    def close(self) -> None:
        """Remove the journal (its calls were written as rows) and let go of its lock."""
        with contextlib.suppress(OSError):
            self.path.unlink(missing_ok=True)
            self._lock_path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)


def orphaned(spool: Spool) -> list[tuple[Path, Path]]:
    """(journal, lock) of receivers that ended without writing their waiting calls; each lock now held by us."""
    found = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(spool.dir):
            if not (entry.name.startswith(PREFIX) and entry.name.endswith(".lock")):
                continue
            lock = Path(entry.path)
            try:
                fd = os.open(lock, os.O_RDWR)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # its receiver is alive
                os.close(fd)
                continue
            os.close(fd)  # its owner is gone: nobody else takes a dead receiver's lock but a recovering receiver
            found.append((lock.with_suffix(".journal"), lock))
    return found


def read(journal: Path) -> Any | None:
    """The rows a journal holds, as an Arrow table (None if there are none)."""
    from pyarrow import feather

    try:
        return feather.read_table(journal)
    except FileNotFoundError:
        return None
