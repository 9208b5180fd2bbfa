"""What the simulator answers: words, tool-call arguments made to fit a schema, and the plan of a chat answer."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from joule_otel.simulator._state import Receipt

WORDS = [
    "energy",
    "joules",
    "model",
    "token",
    "carbon",
    "grid",
    "region",
    "tier",
    "router",
    "receipt",
    "latency",
    "cache",
    "batch",
    "request",
    "stream",
    "answer",
    "summary",
    "search",
    "vector",
    "agent",
    "tool",
    "budget",
    "cluster",
    "node",
    "watt",
    "power",
    "efficient",
    "green",
    "capacity",
    "workload",
    "window",
    "prompt",
    "context",
    "reply",
    "user",
    "assistant",
    "the",
    "a",
    "of",
    "to",
    "and",
    "in",
    "is",
    "for",
    "on",
    "with",
    "that",
    "this",
    "it",
    "as",
    "be",
    "are",
    "by",
    "at",
    "from",
]


TOOL_DONE = "Done: the tool returned its result and I have summarised it."


def text_of(content: Any) -> tuple[str, bool]:
    """The text of a message's content and whether it has image parts."""
    if isinstance(content, str):
        return content, False
    if isinstance(content, list):
        texts, images = [], False
        for part in content:
            if isinstance(part, dict):
                if part.get("type") in ("text", "input_text", "output_text"):
                    texts.append(str(part.get("text", "")))
                elif part.get("type") in ("image_url", "input_image"):
                    images = True
        return " ".join(texts), images
    return "", False


def some_words(rng: random.Random, count: int) -> list[str]:
    words = [rng.choice(WORDS) for _ in range(count)]
    if words:
        words[0] = words[0].capitalize()
    return words


def fake_arguments(parameters: Any, rng: random.Random) -> dict[str, Any]:
    """Arguments that satisfy a JSON schema's required properties."""
    if not isinstance(parameters, dict):
        return {}
    props = parameters.get("properties") or {}
    args: dict[str, Any] = {}
    for name in parameters.get("required") or list(props)[:1]:
        kind = (props.get(name) or {}).get("type", "string")
        if kind in ("integer", "number"):
            args[name] = rng.randint(1, 100)
        elif kind == "boolean":
            args[name] = True
        elif kind == "array":
            args[name] = []
        else:
            args[name] = rng.choice(WORDS)
    return args


@dataclass
class ChatPlan:
    """Everything a chat response will say, decided before the first byte is sent."""

    completion_id: str
    created: int
    model: str
    content: str | None
    tool_calls: list[dict[str, Any]] | None
    finish_reason: str
    input_tokens: int
    output_tokens: int
    receipt: Receipt
