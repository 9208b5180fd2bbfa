"""Energy estimates for calls another provider served, from EcoLogits (the optional ``estimates`` extra).

Joule Cloud measures every call; OpenAI and the others send no figure. For the migration view the
dashboard estimates theirs with EcoLogits (https://ecologits.ai), the field's well-kept estimator,
and always shows the estimate as a range, labelled, never added to measured sums.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

J_PER_KWH = 3.6e6

ECOLOGITS_PROVIDERS = {
    "openai": "openai",
    "api.openai.com": "openai",
    "api.anthropic.com": "anthropic",
    "api.mistral.ai": "mistralai",
    "generativelanguage.googleapis.com": "google_genai",
    "api.cohere.com": "cohere",
    "api.cohere.ai": "cohere",
}
"""The ledger's ``provider`` (OpenAI by name, others by host) → EcoLogits' provider name."""


PROVIDER_NAMES = {
    "joule_cloud": "Joule Cloud",
    "openai": "OpenAI",
    "api.openai.com": "OpenAI",
    "api.anthropic.com": "Anthropic",
    "api.mistral.ai": "Mistral AI",
    "generativelanguage.googleapis.com": "Google Gemini",
    "api.cohere.com": "Cohere",
    "api.cohere.ai": "Cohere",
}
"""The ledger's ``provider`` → the name a person knows it by (others are shown as they are, a host)."""


def provider_name(provider: str) -> str:
    """The provider as a person names it: ``Joule Cloud``, ``OpenAI``; an unknown host as it is."""
    return PROVIDER_NAMES.get(provider, provider)


class Estimate(NamedTuple):
    """An estimated range for some calls: energy (J) and carbon (mg CO2e), low and high."""

    low_j: float
    high_j: float
    low_mg: float
    high_mg: float


def available() -> bool:
    """Whether EcoLogits is installed (``pip install 'joule-otel[estimates]'``)."""
    try:
        import ecologits.tracers.utils  # noqa: F401
    except ImportError:
        return False
    return True


def estimate(
    provider: str, model: str | None, calls: int, mean_output_tokens: float, mean_latency_s: float
) -> Estimate | None:
    """EcoLogits' range for ``calls`` calls of this shape, or None (no EcoLogits, or a model it does not know)."""
    name = ECOLOGITS_PROVIDERS.get(provider)
    if name is None or not model or calls <= 0:
        return None
    try:
        from ecologits.tracers.utils import llm_impacts
    except ImportError:
        return None
    quiet = logging.getLogger("ecologits")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its notes on model architectures are for developers, not a dashboard
    try:
        impacts: Any = llm_impacts(
            provider=name,
            model_name=model,
            output_token_count=max(1, round(mean_output_tokens)),
            request_latency=max(mean_latency_s, 0.001),
        )
    except Exception:  # an estimator's failure is a missing estimate, never a broken page
        return None
    finally:
        quiet.setLevel(level)
    if impacts is None or getattr(impacts, "energy", None) is None:
        return None
    energy, gwp = impacts.energy.value, impacts.gwp.value
    low_kwh, high_kwh = getattr(energy, "min", energy), getattr(energy, "max", energy)
    low_kg, high_kg = getattr(gwp, "min", gwp), getattr(gwp, "max", gwp)
    return Estimate(
        low_j=float(low_kwh) * J_PER_KWH * calls,
        high_j=float(high_kwh) * J_PER_KWH * calls,
        low_mg=float(low_kg) * 1e6 * calls,
        high_mg=float(high_kg) * 1e6 * calls,
    )
