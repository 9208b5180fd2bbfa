"""The bundled sample ledger: three weeks of a small company's Joule Cloud traffic.

Made by the simulator's energy model, router and grid figures with a fixed seed.

Regenerate with ``joule-otel sample-data joule_otel/dashboard/sample/inference_calls.parquet``.
"""

from __future__ import annotations

import json
import math
import random
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from joule_otel.ledger._row import LedgerRow
from joule_otel.ledger._schema import COLUMN_NAMES
from joule_otel.simulator import _catalog as catalog

SAMPLE_BUDGETS_J = {
    "batch-enrichment": 500_000.0,
    "support-bot": 1_200_000.0,
    "nightly-summaries": 3_000_000.0,
    "ops-agent": 400_000.0,
}

# workload: (service, share of calls, requested model, operation, tier, pinned region, stream, hours, tokens out)
_WORKLOADS: dict[str, tuple[str, float, str, str, str, str | None, bool, tuple[int, int], tuple[int, int]]] = {
    "support-bot": ("support-api", 0.40, "auto", "chat", "standard", "eu-fi", True, (7, 20), (60, 260)),
    "search-embeddings": ("support-api", 0.24, "auto", "embeddings", "standard", "eu-se", False, (0, 23), (0, 0)),
    "ops-agent": ("ops-api", 0.10, "auto", "chat", "priority", "us-east", False, (0, 23), (20, 120)),
    "nightly-summaries": (
        "data-pipeline",
        0.06,
        "llama-3.3-405b-instruct",
        "chat",
        "batch",
        None,
        False,
        (1, 4),
        (250, 650),
    ),
    "batch-enrichment": (
        "data-pipeline",
        0.14,
        "llama-3.3-70b-instruct",
        "chat",
        "batch",
        None,
        False,
        (0, 23),
        (150, 420),
    ),
    "marketing-copy": ("marketing-web", 0.06, "auto", "chat", "standard", None, True, (9, 18), (120, 500)),
}


def generate(
    calls: int = 24_000, days: int = 21, seed: int = 7, end: datetime = datetime(2026, 11, 20, tzinfo=timezone.utc)
) -> list[LedgerRow]:
    """Ledger rows (in schema order, ``started_at`` in µs) for ``calls`` calls over ``days`` days."""
    rng = random.Random(seed)
    start = end - timedelta(days=days)
    names = list(_WORKLOADS)
    weights = [_WORKLOADS[n][1] for n in names]
    drafts = []
    for _ in range(calls):
        name = rng.choices(names, weights)[0]
        hours = _WORKLOADS[name][7]
        day = rng.randrange(days)
        weekend = (start + timedelta(days=day)).weekday() >= 5
        if weekend and name in ("support-bot", "marketing-copy") and rng.random() < 0.6:
            continue
        moment = start + timedelta(days=day, hours=rng.uniform(hours[0], hours[1] + 1))
        drafts.append((moment, name))
    drafts.sort()
    spent: dict[tuple[str, int], float] = {}
    rows: list[LedgerRow] = []
    for moment, name in drafts:
        service, _, requested, operation, tier, pinned, stream, _, out_range = _WORKLOADS[name]
        region = pinned or catalog.choose_region(rng)
        receipt = f"rcpt_{rng.getrandbits(80):020x}"
        trace_id = f"{rng.getrandbits(128):032x}" if name in ("support-bot", "ops-agent") else None
        span_id = f"{rng.getrandbits(64):016x}" if trace_id else None
        month_key = (name, moment.month)
        budget = SAMPLE_BUDGETS_J.get(name)
        if name == "batch-enrichment" and budget is not None and spent.get(month_key, 0.0) >= budget * 0.9:
            rows.append(
                _row(
                    None,
                    moment,
                    rng.uniform(30, 90),
                    None,
                    service,
                    name,
                    operation,
                    402,
                    "insufficient_balance",
                    requested,
                    None,
                    None,
                    None,
                    None,
                    None,
                    None,
                    None,
                    stream,
                    None,
                    None,
                )
            )
            continue
        if operation == "embeddings":
            input_tokens = rng.randint(200, 4000)
            energy = catalog.embedding_energy_j(input_tokens, tier, rng)
            routed, output_tokens, ttft = catalog.EMBEDDING_MODEL, None, None
            duration = rng.uniform(20, 90)
        else:
            input_tokens = rng.randint(800, 3500) if name == "nightly-summaries" else rng.randint(20, 900)
            routed = (
                requested
                if requested != "auto"
                else catalog.route_auto(
                    input_tokens=input_tokens,
                    has_tools=name == "ops-agent",
                    has_images=False,
                    json_mode=name == "marketing-copy" and rng.random() < 0.3,
                )
            )
            output_tokens = rng.randint(*out_range)
            energy = catalog.chat_energy_j(routed, input_tokens, output_tokens, tier, rng)
            per_token_s = 0.012 + 0.02 * math.log10(catalog.MODELS[routed].joules_per_output_token * 10)
            ttft = rng.uniform(80, 400) * (2 if routed.endswith("405b-instruct") else 1) if stream else None
            duration = (ttft or rng.uniform(80, 300)) + output_tokens * per_token_s * 1000 * rng.uniform(0.8, 1.2)
        spent[month_key] = spent.get(month_key, 0.0) + energy
        rows.append(
            _row(
                receipt,
                moment,
                duration,
                ttft,
                service,
                name,
                operation,
                200,
                None,
                requested,
                routed,
                tier,
                region,
                energy,
                catalog.carbon_mg(energy, region),
                input_tokens,
                output_tokens,
                stream,
                trace_id,
                span_id,
            )
        )
    return rows


def _row(*values: Any) -> LedgerRow:
    (
        receipt,
        moment,
        duration,
        ttft,
        service,
        workload,
        operation,
        status,
        error,
        requested,
        routed,
        tier,
        region,
        energy,
        carbon,
        input_tokens,
        output_tokens,
        stream,
        trace_id,
        span_id,
    ) = values
    record = {
        "receipt_id": receipt,
        "started_at": int(moment.timestamp() * 1_000_000),
        "duration_ms": duration,
        "ttft_ms": ttft,
        "service": service,
        "workload": workload,
        "operation": operation,
        "server_address": "api.greenjoules.cloud",
        "status_code": status,
        "error_type": error,
        "requested_model": requested,
        "routed_to": routed,
        "tier": tier,
        "region": region,
        "energy_j": energy,
        "carbon_mg": carbon,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "stream": stream,
        "trace_id": trace_id,
        "span_id": span_id,
        "provider": "joule_cloud",
        # drawn from the start time, not the random stream: the tags column leaves every other figure as it was
        "tags": catalog.example_tags(workload, int(moment.timestamp() * 1_000_000) // 7),
    }
    return LedgerRow(*(record[name] for name in COLUMN_NAMES))


def write(path: Path, **kwargs: Any) -> int:
    """Write the sample as Parquet (any DuckDB version reads it) and its budgets beside it."""
    import pyarrow.parquet as pq

    from joule_otel.ledger._writer import rows_to_arrow

    rows = generate(**kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(rows_to_arrow(rows), path, compression="zstd")
    (path.parent / "budgets.json").write_text(json.dumps(SAMPLE_BUDGETS_J, indent=2) + "\n")
    return len(rows)
