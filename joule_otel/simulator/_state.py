"""The simulator's state: accounts (spend and budget per API token), the receipts it issued, its configuration.

Guarded by one lock; every handler thread bills through :meth:`SimulatorState.bill`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import random
import secrets
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any


@dataclass
class Account:
    """Spend of one API token. ``energy_budget_j`` caps the month; ``balance_j`` the prepaid funds."""

    balance_j: float = float("inf")
    energy_budget_j: float | None = None
    spent_j: float = 0.0
    calls: int = 0
    refused: int = 0

    def exhausted(self) -> bool:
        """True once the balance or the monthly budget is spent."""
        if self.spent_j >= self.balance_j:
            return True
        return self.energy_budget_j is not None and self.spent_j >= self.energy_budget_j


@dataclass(frozen=True)
class Receipt:
    """What the simulator billed for one call; ``X-Receipt-Id`` names it."""

    receipt_id: str
    token_fingerprint: str
    operation: str
    requested_model: str
    routed_to: str
    tier: str
    region: str
    energy_j: float
    carbon_mg: float
    input_tokens: int
    output_tokens: int
    stream: bool
    billed_at: float = 0.0
    """When the call was billed (seconds since the epoch), set by :meth:`SimulatorState.bill`."""
    token: str = ""
    """The API key as the bill names it (``jc_…c41f``): never the secret."""

    def bill_record(self) -> dict[str, Any]:
        """This receipt as a line of the bill (DESIGN.md's "Bill export"): what reconcile reads."""
        return {
            "receipt_id": self.receipt_id,
            "billed_at": datetime.fromtimestamp(self.billed_at, timezone.utc).isoformat(timespec="microseconds"),
            "token": self.token,
            "operation": self.operation,
            "requested_model": self.requested_model,
            "model": self.routed_to,
            "tier": self.tier,
            "region": self.region,
            "energy_j": self.energy_j,
            "carbon_mg": self.carbon_mg,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
        }


BILL_COLUMNS = tuple(Receipt("", "", "", "", "", "", "", 0.0, 0.0, 0, 0, False).bill_record())
"""The columns of the simulator's bill, in order."""


def key_name(token: str) -> str:
    """How a bill names an API key: its prefix and last four characters (``jc_…c41f``), never the secret."""
    prefix = token.split("_", 1)[0] + "_" if "_" in token[:8] else ""
    return f"{prefix}…{token[-4:]}" if len(token) > 8 else f"{prefix}…{fingerprint(token)[:4]}"


@dataclass
class SimulatorConfig:
    """How the simulator behaves.

    Attributes:
        seed: makes receipts, routing, placement and figures reproducible.
        token_delay_s: pause between streamed tokens (0 for tests; ~0.02 looks real in a demo).
        latency_s: extra time before the first byte of every response (prefill, queueing).
        balances: prepaid joules per API token; tokens not listed have unlimited funds.
        energy_budgets: monthly energy budget in joules per API token (one token per workload).
        require_auth: refuse requests without a bearer token (401), as Joule Cloud does.
    """

    seed: int = 0
    token_delay_s: float = 0.0
    latency_s: float = 0.0
    balances: dict[str, float] = field(default_factory=dict)
    energy_budgets: dict[str, float] = field(default_factory=dict)
    require_auth: bool = True


class SimulatorState:
    """Accounts, receipts and the seeded random source, shared by all handler threads."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._rng = random.Random(config.seed)
        self._accounts: dict[str, Account] = {}
        self.receipts: list[Receipt] = []
        # Receipt ids come from outside the seeded source: a real service never issues one twice, so two
        # simulators (one per test, one per process) seeded alike must not either, or a ledger that
        # dedupes by receipt would drop the second one's calls. The figures stay reproducible by seed.
        self._receipt_prefix = secrets.token_hex(6)
        self._receipt_serial = itertools.count()
        for token, balance in config.balances.items():
            self.account(token).balance_j = balance
        for token, budget in config.energy_budgets.items():
            self.account(token).energy_budget_j = budget

    def account(self, token: str) -> Account:
        """The account of ``token``, created on first use."""
        return self._accounts.setdefault(token, Account())

    def set_energy_budget(self, token: str, joules: float | None) -> None:
        """Set (or clear) the monthly energy budget of ``token``."""
        with self._lock:
            self.account(token).energy_budget_j = joules

    def account_snapshot(self, token: str) -> dict[str, Any]:
        """The account of ``token`` as JSON-ready data."""
        with self._lock:
            acct = self.account(token)
            data = asdict(acct)
        return {k: (None if isinstance(v, float) and v == float("inf") else v) for k, v in data.items()}

    def fork_rng(self) -> random.Random:
        """A per-request random source drawn from the seeded one, so threads stay deterministic per call order."""
        with self._lock:
            return random.Random(self._rng.getrandbits(64))

    def new_receipt_id(self) -> str:
        """A receipt id no simulator has issued before: ``rcpt_`` and 20 hex digits."""
        with self._lock:
            serial = next(self._receipt_serial)
        return f"rcpt_{self._receipt_prefix}{serial:08x}"

    def admit(self, token: str) -> bool:
        """False (and counted) when the token's balance or budget is spent."""
        with self._lock:
            acct = self.account(token)
            if acct.exhausted():
                acct.refused += 1
                return False
            return True

    def bill(self, receipt: Receipt, token: str) -> Receipt:
        """Record a receipt, dated now, and charge its joules to ``token``; the receipt as billed."""
        billed = dataclasses.replace(receipt, billed_at=time.time(), token=key_name(token))
        with self._lock:
            acct = self.account(token)
            acct.spent_j += receipt.energy_j
            acct.calls += 1
            self.receipts.append(billed)
        return billed

    def bill_records(
        self, token: str | None = None, since: float | None = None, until: float | None = None
    ) -> list[dict[str, Any]]:
        """The bill: every receipt (of ``token``'s account only, when given) billed in [since, until), oldest first."""
        with self._lock:
            receipts = list(self.receipts)
        wanted = fingerprint(token) if token is not None else None
        return [
            r.bill_record()
            for r in receipts
            if (wanted is None or r.token_fingerprint == wanted)
            and (since is None or r.billed_at >= since)
            and (until is None or r.billed_at < until)
        ]


class ApiError(Exception):
    """An error answered with the OpenAI envelope."""

    def __init__(self, status: int, message: str, error_type: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def fingerprint(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:12]
