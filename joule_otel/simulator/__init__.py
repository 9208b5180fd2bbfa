"""A faithful Joule Cloud stand-in on loopback, for tests, demos and your own test suites.

Usage::

    from joule_otel.simulator import running

    with running(seed=7) as sim:
        client = openai.OpenAI(base_url=sim.base_url, api_key="jc_test")
        client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}])
        sim.receipts  # every receipt issued, to reconcile against the ledger

Behaviour (documented in the README's simulator section):

- ``POST /v1/chat/completions`` (plain, SSE with ``stream_options.include_usage``, tools, JSON mode,
  image parts), ``POST /v1/embeddings``, ``GET /v1/models``; ``GET /v1/receipts`` and
  ``GET /v1/account`` for reconciliation.
- Tiers: ``service_tier`` in the body or an ``X-Tier`` request header: ``batch`` (alias ``flex``),
  ``standard`` (``auto``/``default``), ``priority``. Regions: an ``X-Region`` request header pins
  one; otherwise the call is placed worldwide and the response's ``X-Region`` says where.
- Budgets: ``energy_budgets={"jc_batch": 5_000}`` gives that API token a monthly budget in joules;
  once spent, requests get ``402 insufficient_balance`` in the OpenAI error envelope.
"""

from __future__ import annotations

import csv
import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from joule_otel._threads import start_daemon
from joule_otel.simulator._catalog import GRID_G_PER_KWH, MODELS, TIER_MULTIPLIER
from joule_otel.simulator._server import SimulatorHTTPServer
from joule_otel.simulator._state import BILL_COLUMNS, Receipt, SimulatorConfig, SimulatorState

__all__ = [
    "GRID_G_PER_KWH",
    "MODELS",
    "TIER_MULTIPLIER",
    "Receipt",
    "Simulator",
    "SimulatorConfig",
    "running",
    "write_bill",
]


class Simulator:
    """A running simulator: its address, its receipts, and control over budgets."""

    def __init__(self, config: SimulatorConfig, host: str = "127.0.0.1", port: int = 0) -> None:
        self.config = config
        self.state = SimulatorState(config)
        self._server = SimulatorHTTPServer((host, port), self.state)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The TCP port served (a free one when started with port 0)."""
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible base URL, ending in ``/v1``."""
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def receipts(self) -> list[Receipt]:
        """Every receipt issued so far, in order."""
        with self.state._lock:
            return list(self.state.receipts)

    def bill_records(self, api_key: str | None = None) -> list[dict[str, Any]]:
        """The bill (DESIGN.md's "Bill export"): every receipt issued, or ``api_key``'s account's only, oldest first."""
        return self.state.bill_records(api_key)

    def write_bill(self, path: str | os.PathLike[str], api_key: str | None = None) -> Path:
        """Write :meth:`bill_records` to ``path`` as its extension says: .csv, .jsonl, .json or .parquet."""
        return write_bill(self.bill_records(api_key), Path(path))

    def set_energy_budget(self, api_key: str, joules: float | None) -> None:
        """Give ``api_key`` a monthly energy budget (``None`` removes it)."""
        self.state.set_energy_budget(api_key, joules)

    def start(self) -> Simulator:
        """Serve in a background thread."""
        # stop() waits for the serving loop's next poll: a short one keeps a test's teardown from costing half a second
        self._thread = start_daemon(self._server.serve_forever, "joule-simulator", poll_interval=_STOP_POLL_S)
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread until :meth:`stop` (or Ctrl-C)."""
        self._server.serve_forever(poll_interval=_STOP_POLL_S)

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()


_STOP_POLL_S = 0.02
"""How often the serving loop looks for :meth:`Simulator.stop` (socketserver's default is half a second)."""


@contextmanager
def running(
    seed: int = 0,
    *,
    token_delay_s: float = 0.0,
    latency_s: float = 0.0,
    energy_budgets: dict[str, float] | None = None,
    balances: dict[str, float] | None = None,
    require_auth: bool = True,
    port: int = 0,
) -> Iterator[Simulator]:
    """Run a simulator on 127.0.0.1 for the duration of the ``with`` block."""
    config = SimulatorConfig(
        seed=seed,
        token_delay_s=token_delay_s,
        latency_s=latency_s,
        energy_budgets=dict(energy_budgets or {}),
        balances=dict(balances or {}),
        require_auth=require_auth,
    )
    sim = Simulator(config, port=port).start()
    try:
        yield sim
    finally:
        sim.stop()


def write_bill(records: list[dict[str, Any]], path: Path) -> Path:
    """Write bill records as the extension of ``path`` says: ``.csv``, ``.jsonl``, ``.json`` or ``.parquet``."""
    suffix = path.suffix.lower()
    tmp = path.with_name(path.name + ".part")
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = {name: [r[name] for r in records] for name in BILL_COLUMNS}
        pq.write_table(pa.table(columns), tmp)
    elif suffix in (".jsonl", ".ndjson"):
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    elif suffix == ".json":
        tmp.write_text(json.dumps(records, indent=1), encoding="utf-8")
    elif suffix == ".csv":
        with tmp.open("w", newline="", encoding="utf-8") as out:
            writer = csv.DictWriter(out, fieldnames=BILL_COLUMNS)
            writer.writeheader()
            writer.writerows(records)
    else:
        raise ValueError(f"{path}: write a bill as .csv, .jsonl, .json or .parquet")
    tmp.replace(path)
    return path
