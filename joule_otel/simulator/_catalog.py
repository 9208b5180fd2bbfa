"""What Joule Cloud serves: models, regions, tiers, the energy model and the ``auto`` router.

The figures follow DESIGN.md: ML.ENERGY per-token measurements scaled by ~1.7 for whole-server
power, a cheap prefill share per input token, a tier multiplier, and grid intensity by the region
that served the call. Everything here is pure and deterministic; randomness comes from the caller's
seeded ``random.Random``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    """One model on the mesh."""

    name: str
    joules_per_output_token: float
    context_tokens: int
    tools: bool = True
    vision: bool = False


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("gpt-oss-120b", 0.42, 128_000),
        ModelSpec("mixtral-8x22b", 0.78, 64_000),
        ModelSpec("deepseek-v3", 0.95, 128_000),
        ModelSpec("claude-haiku-4.5", 0.55, 200_000, vision=True),
        ModelSpec("llama-3.3-70b-instruct", 1.2, 128_000),
        ModelSpec("qwen2.5-72b", 1.25, 128_000, vision=True),
        ModelSpec("llama-3.3-405b-instruct", 4.5, 128_000),
    )
}
"""The seed guide's pinned models, with J per output token."""

AUTO = "auto"

PREFILL_SHARE = 0.08
"""Energy of one input token as a share of one output token (prefill is batched and cheap)."""

EMBEDDING_JOULES_PER_TOKEN = 0.012
"""Energy per input token of an embeddings call (encoder pass only)."""

EMBEDDING_MODEL = "bge-m3"
"""Where ``auto`` sends an embeddings call: an encoder, not a chat model."""

SMALLEST_J_PER_TOKEN = min(spec.joules_per_output_token for spec in MODELS.values())


def latency_factor(model: str) -> float:
    """How much slower than the smallest chat model a model answers: with the square root of its energy per token.

    A 405B model is not faster than a 120B one; an encoder answers in half the smallest chat model's time.
    """
    spec = MODELS.get(model)
    if spec is None:
        return 0.5
    return math.sqrt(spec.joules_per_output_token / SMALLEST_J_PER_TOKEN)


EMBEDDING_DIMENSIONS = 256

GRID_G_PER_KWH: dict[str, float] = {
    "eu-fi": 72.0,
    "eu-fr": 44.0,
    "eu-se": 36.0,
    "eu-de": 344.0,
    "us-east": 370.0,
    "ap-in": 708.0,
}
"""Grid carbon intensity (g CO2e per kWh) of each region the mesh serves from."""

UNPINNED_PLACEMENT: tuple[tuple[str, float], ...] = (
    ("us-east", 0.38),
    ("ap-in", 0.22),
    ("eu-de", 0.18),
    ("eu-fi", 0.10),
    ("eu-fr", 0.07),
    ("eu-se", 0.05),
)
"""Where "cheapest capable worldwide" lands an unpinned call, by share of traffic."""

TIER_MULTIPLIER: dict[str, float] = {"batch": 0.72, "standard": 1.0, "priority": 1.35}
"""Batch runs at high occupancy (cheaper per token); priority reserves headroom (dearer)."""

TIER_ALIASES: dict[str, str] = {
    "auto": "standard",
    "default": "standard",
    "standard": "standard",
    "flex": "batch",
    "batch": "batch",
    "priority": "priority",
    "scale": "priority",
}
"""Request values of ``service_tier`` / ``X-Tier`` and the tier each one means."""


def estimate_tokens(text: str) -> int:
    """Roughly four characters a token, as tokenizers of these models average on English."""
    return max(1, math.ceil(len(text) / 4))


def route_auto(*, input_tokens: int, has_tools: bool, has_images: bool, json_mode: bool) -> str:
    """The cheapest model capable of the request.

    Short plain prompts go to the small MoE; tools and JSON mode need a stronger instruction
    follower; images need a vision model; long contexts go to the long-context MoE.
    """
    if has_images:
        return "claude-haiku-4.5"
    if has_tools:
        return "llama-3.3-70b-instruct"
    if input_tokens > 6_000:
        return "deepseek-v3"
    if json_mode:
        return "mixtral-8x22b"
    return "gpt-oss-120b"


def choose_region(rng: random.Random) -> str:
    """Placement of an unpinned call."""
    names = [name for name, _ in UNPINNED_PLACEMENT]
    weights = [share for _, share in UNPINNED_PLACEMENT]
    return rng.choices(names, weights)[0]


def chat_energy_j(model: str, input_tokens: int, output_tokens: int, tier: str, rng: random.Random) -> float:
    """Joules billed for a chat call: decode + prefill share, tier, ±4 % measurement spread."""
    per_token = MODELS[model].joules_per_output_token
    joules = per_token * (output_tokens + PREFILL_SHARE * input_tokens)
    joules *= TIER_MULTIPLIER[tier] * rng.uniform(0.96, 1.04)
    return round(joules, 3)


def embedding_energy_j(input_tokens: int, tier: str, rng: random.Random) -> float:
    """Joules billed for an embeddings call."""
    joules = EMBEDDING_JOULES_PER_TOKEN * input_tokens * TIER_MULTIPLIER[tier] * rng.uniform(0.96, 1.04)
    return round(max(joules, 0.001), 3)


def carbon_mg(energy_j: float, region: str) -> float:
    """Mg CO2e of ``energy_j`` joules on the grid of ``region``: J × g/kWh ÷ 3600."""
    return round(energy_j * GRID_G_PER_KWH[region] / 3600.0, 4)


TEAMS = {
    "support-bot": "support",
    "ops-agent": "platform",
    "batch-enrichment": "data",
    "nightly-summaries": "data",
    "search-embeddings": "search",
    "marketing-copy": "marketing",
}
"""The team that pays for each of the example company's workloads (the demo's and the sample data's)."""
CUSTOMERS = ("acme", "globex", "initech")
"""The example company's customers, whose requests its customer-facing workloads serve."""


def example_tags(workload: str, pick: int) -> dict[str, str] | None:
    """The chargeback tags of an example call: its workload's team, and a customer for customer-facing work.

    ``pick`` chooses the customer; the rest of the company's work is internal.
    """
    team = TEAMS.get(workload)
    if team is None:
        return None
    if workload in ("support-bot", "search-embeddings"):
        return {"team": team, "customer": CUSTOMERS[pick % len(CUSTOMERS)]}
    return {"team": team}
