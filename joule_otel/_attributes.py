"""Span and metric attribute keys, each documented once.

GenAI semantic-convention keys are used where they fit; ``joule.*`` keys carry what only Joule
Cloud reports.
"""

from __future__ import annotations

GEN_AI_OPERATION_NAME = "gen_ai.operation.name"
"""Semconv operation: ``chat``, ``text_completion``, ``embeddings`` (only the values semconv defines)."""
GEN_AI_PROVIDER_NAME = "gen_ai.provider.name"
"""``joule_cloud``, ``openai`` or the host called: the ledger's ``provider`` (see ``_genai.provider_for``)."""
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
"""The ``model`` the app asked for (``auto`` or a pinned model)."""
GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
"""The model that served the call (``X-Routed-To``)."""
GEN_AI_TOKEN_TYPE = "gen_ai.token.type"
"""``input`` or ``output`` on the token-usage histogram."""
GEN_AI_INPUT_MESSAGES = "gen_ai.input.messages"
"""Prompt messages (JSON), on spans only and only with content capture opted in."""
SERVER_ADDRESS = "server.address"
"""Host called."""
ERROR_TYPE = "error.type"
"""``insufficient_balance`` for a 402, the HTTP status otherwise; absent on success."""

JOULE_ENERGY = "joule.energy"
"""Joules billed (``X-Energy-Joules``), on spans."""
JOULE_CARBON = "joule.carbon"
"""mg CO2e billed (``X-Carbon-mg``), on spans."""
JOULE_TIER = "joule.tier"
"""Capacity tier that served the call (``X-Tier``, lower-cased)."""
JOULE_REGION = "joule.region"
"""Region that served the call (response ``X-Region``, else the request's)."""
JOULE_RECEIPT_ID = "joule.receipt_id"
"""Billing receipt (``X-Receipt-Id``), on spans only: unbounded, so never on metrics."""
JOULE_WORKLOAD = "joule.workload"
"""The workload tag; also the baggage key that carries it across services."""
JOULE_BUDGET_SERVICE = "joule.budget.service"
"""On ``joule.budget.*`` gauges: the service a budget covers, when it covers one only."""
JOULE_ENERGY_SOURCE = "joule.energy.source"
"""Where the energy figure came from: ``header``, ``stream_final`` or ``absent``."""

METRIC_ATTRIBUTES = (
    JOULE_WORKLOAD,
    GEN_AI_OPERATION_NAME,
    GEN_AI_PROVIDER_NAME,
    GEN_AI_REQUEST_MODEL,
    GEN_AI_RESPONSE_MODEL,
    JOULE_TIER,
    JOULE_REGION,
    ERROR_TYPE,
)
"""The only attributes metrics carry: all bounded."""
