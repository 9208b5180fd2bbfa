"""The Joule Cloud stand-in: an OpenAI-compatible HTTP server on loopback.

Routes: ``POST /v1/chat/completions`` (plain and SSE), ``POST /v1/embeddings``, ``GET /v1/models``,
``GET /v1/receipts`` (every receipt issued, for reconciliation) and ``GET /v1/account`` (the
calling token's balance and budget). Responses carry the Joule headers; errors use the OpenAI
envelope. State (receipts, spend per token) is in memory and guarded by one lock.

Under ``/openai/v1`` the same routes answer as OpenAI's API does, for a team's calls not yet moved
(the migration view): OpenAI's model names (:data:`OPENAI_STAND_INS`), OpenAI's response headers
(``openai-version``, ``openai-processing-ms``, ``x-request-id``), no Joule header, no receipt, no bill.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import itertools
import json
import random
import secrets
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from joule_otel.simulator import _catalog as catalog

_WORDS = [
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

_TOOL_DONE = "Done: the tool returned its result and I have summarised it."


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

    def bill(self, receipt: Receipt, token: str) -> None:
        """Record a receipt and charge its joules to ``token``."""
        with self._lock:
            acct = self.account(token)
            acct.spent_j += receipt.energy_j
            acct.calls += 1
            self.receipts.append(receipt)


class ApiError(Exception):
    """An error answered with the OpenAI envelope."""

    def __init__(self, status: int, message: str, error_type: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def _fingerprint(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:12]


def _text_of(content: Any) -> tuple[str, bool]:
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


def _words(rng: random.Random, count: int) -> list[str]:
    words = [rng.choice(_WORDS) for _ in range(count)]
    if words:
        words[0] = words[0].capitalize()
    return words


def _fake_arguments(parameters: Any, rng: random.Random) -> dict[str, Any]:
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
            args[name] = rng.choice(_WORDS)
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


OPENAI_PREFIX = "/openai"
OPENAI_STAND_INS = {
    "gpt-4o-mini": "llama-3.3-70b-instruct",
    "gpt-4o": "llama-3.3-405b-instruct",
    "gpt-4.1-mini": "llama-3.3-70b-instruct",
    "text-embedding-3-small": "gpt-oss-120b",
}
"""OpenAI model names the ``/openai/v1`` routes accept → the catalog model whose answers they borrow."""


class Handler(BaseHTTPRequestHandler):
    """One connection's requests (HTTP/1.1 keep-alive)."""

    protocol_version = "HTTP/1.1"
    openai_mode = False
    """This request came under ``/openai/v1``: answer as OpenAI's API does (no Joule headers, no bill)."""
    disable_nagle_algorithm = True
    server: SimulatorHTTPServer
    server_version = "JouleCloudSimulator/1"

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the simulator serves tests and demos, not an access log."""

    # -- plumbing -------------------------------------------------------------------------
    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send_json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        payload = json.dumps(body, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        if len(payload) > 256 and "gzip" in (self.headers.get("Accept-Encoding") or ""):
            payload = gzip.compress(payload, compresslevel=5)
            self.send_header("Content-Encoding", "gzip")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _token(self) -> str:
        auth = self.headers.get("Authorization") or ""
        scheme, _, token = auth.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            if self.server.state.config.require_auth:
                raise ApiError(
                    401,
                    "Missing bearer token: pass your Joule Cloud API key.",
                    "invalid_request_error",
                    "invalid_api_key",
                )
            return "anonymous"
        return token

    def _json_request(self) -> dict[str, Any]:
        raw = self._read_body()
        try:
            body = json.loads(raw or b"{}")
        except ValueError as exc:
            raise ApiError(400, f"Request body is not valid JSON: {exc}", "invalid_request_error") from None
        if not isinstance(body, dict):
            raise ApiError(400, "Request body must be a JSON object.", "invalid_request_error")
        return body

    def _dispatch(self, routes: dict[str, Any]) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        self.openai_mode = path.startswith(OPENAI_PREFIX + "/")
        if self.openai_mode:
            path = path.removeprefix(OPENAI_PREFIX)
            routes = {route: handler for route, handler in routes.items() if route in _OPENAI_ROUTES}
        handler = routes.get(path)
        try:
            if handler is None:
                # Drain the body so the connection stays usable.
                self._read_body()
                raise ApiError(404, f"Unknown route {self.command} {path}", "invalid_request_error", "unknown_url")
            handler()
        except ApiError as err:
            # "every response includes X-Energy-Joules" (the migration guide): a refused call bills nothing, says so,
            # and carries no receipt
            refused = self._openai_headers() if self.openai_mode else {"X-Energy-Joules": "0", "X-Carbon-mg": "0"}
            self._send_json(err.status, err.body, refused)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def do_GET(self) -> None:
        self._dispatch(
            {
                "/v1/models": self._models,
                "/v1/receipts": self._receipts,
                "/v1/account": self._account,
                "/healthz": self._health,
            }
        )

    def do_POST(self) -> None:
        self._dispatch(
            {"/v1/chat/completions": self._chat, "/v1/embeddings": self._embeddings, "/v1/responses": self._responses}
        )

    # -- routes ---------------------------------------------------------------------------
    def _health(self) -> None:
        self._send_json(200, {"status": "ok"})

    def _models(self) -> None:
        self._token()
        created = 1_730_000_000
        data = [{"id": catalog.AUTO, "object": "model", "created": created, "owned_by": "joule-cloud"}]
        data += [
            {"id": name, "object": "model", "created": created, "owned_by": "joule-cloud"} for name in catalog.MODELS
        ]
        self._send_json(200, {"object": "list", "data": data})

    def _receipts(self) -> None:
        self._token()
        with self.server.state._lock:
            rows = [asdict(r) for r in self.server.state.receipts]
        self._send_json(200, {"object": "list", "data": rows})

    def _account(self) -> None:
        token = self._token()
        self._send_json(200, self.server.state.account_snapshot(token))

    def _common(self, body: dict[str, Any]) -> tuple[str, str, str, str]:
        """Validate the parts every billed route shares: token, model, tier, region."""
        token = self._token()
        model = body.get("model")
        if not model or not isinstance(model, str):
            raise ApiError(400, "You must provide a model parameter.", "invalid_request_error", None, "model")
        if self.openai_mode:
            if model not in OPENAI_STAND_INS:
                raise ApiError(404, f"The model `{model}` does not exist.", "invalid_request_error", "model_not_found")
            return token, OPENAI_STAND_INS[model], "standard", "us-east"
        if model != catalog.AUTO and model not in catalog.MODELS:
            raise ApiError(
                404,
                f"The model `{model}` does not exist on the mesh.",
                "invalid_request_error",
                "model_not_found",
                "model",
            )
        tier_request = str(body.get("service_tier") or self.headers.get("X-Tier") or "auto").strip().lower()
        tier = catalog.TIER_ALIASES.get(tier_request)
        if tier is None:
            raise ApiError(
                400,
                f"Unknown service_tier {tier_request!r}; use one of {sorted(catalog.TIER_ALIASES)}.",
                "invalid_request_error",
                None,
                "service_tier",
            )
        region = (self.headers.get("X-Region") or "").strip().lower()
        if region and region not in catalog.GRID_G_PER_KWH:
            raise ApiError(
                400,
                f"Unknown region {region!r}; use one of {sorted(catalog.GRID_G_PER_KWH)}.",
                "invalid_request_error",
                None,
                "X-Region",
            )
        if not self.server.state.admit(token):
            raise ApiError(
                402,
                "Insufficient balance: this token's energy budget is spent.",
                "insufficient_balance",
                "insufficient_balance",
            )
        return token, model, tier, region

    def _openai_headers(self) -> dict[str, str]:
        return {
            "openai-version": "2020-10-01",
            "openai-processing-ms": str(int(self.server.state.config.latency_s * 1000) + 1),
            "x-request-id": f"req_{self.server.state.fork_rng().getrandbits(96):024x}",
        }

    def _joule_headers(self, receipt: Receipt) -> dict[str, str]:
        if self.openai_mode:
            return self._openai_headers()
        return {
            "X-Energy-Joules": repr(receipt.energy_j),
            "X-Carbon-mg": repr(receipt.carbon_mg),
            "X-Routed-To": receipt.routed_to,
            "X-Tier": receipt.tier,
            "X-Region": receipt.region,
            "X-Receipt-Id": receipt.receipt_id,
        }

    def _embeddings(self) -> None:
        body = self._json_request()
        token, model, tier, region = self._common(body)
        inputs = body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs:
            raise ApiError(400, "`input` must be a string or a non-empty list.", "invalid_request_error", None, "input")
        rng = self.server.state.fork_rng()
        region = region or catalog.choose_region(rng)
        routed = "gpt-oss-120b" if model == catalog.AUTO else model
        data, input_tokens = [], 0
        for index, item in enumerate(inputs):
            text = item if isinstance(item, str) else json.dumps(item)
            input_tokens += catalog.estimate_tokens(text)
            digest = hashlib.sha256(text.encode()).digest()
            vec_rng = random.Random(int.from_bytes(digest[:8], "big"))
            vector = [vec_rng.gauss(0.0, 1.0) for _ in range(catalog.EMBEDDING_DIMENSIONS)]
            norm = sum(v * v for v in vector) ** 0.5
            data.append({"object": "embedding", "index": index, "embedding": [round(v / norm, 6) for v in vector]})
        energy = catalog.embedding_energy_j(input_tokens, tier, rng)
        receipt = Receipt(
            self.server.state.new_receipt_id(),
            _fingerprint(token),
            "embeddings",
            model,
            routed,
            tier,
            region,
            energy,
            catalog.carbon_mg(energy, region),
            input_tokens,
            0,
            False,
        )
        if not self.openai_mode:
            self.server.state.bill(receipt, token)
        self._pause(self.server.state.config.latency_s)
        self._send_json(
            200,
            {
                "object": "list",
                "data": data,
                "model": body["model"] if self.openai_mode else routed,
                "usage": {"prompt_tokens": input_tokens, "total_tokens": input_tokens},
            },
            self._joule_headers(receipt),
        )

    def _plan_chat(self, body: dict[str, Any], token: str, model: str, tier: str, region: str) -> ChatPlan:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "`messages` must be a non-empty list.", "invalid_request_error", None, "messages")
        texts, has_images = [], False
        for msg in messages:
            if isinstance(msg, dict):
                text, images = _text_of(msg.get("content"))
                texts.append(text)
                has_images = has_images or images
        prompt = "\n".join(texts)
        input_tokens = sum(catalog.estimate_tokens(t) + 4 for t in texts)
        tools = body.get("tools") or []
        wants_tool = (
            bool(tools)
            and body.get("tool_choice") != "none"
            and not any(isinstance(m, dict) and m.get("role") == "tool" for m in messages)
        )
        json_mode = (body.get("response_format") or {}).get("type") in ("json_object", "json_schema")
        routed = (
            model
            if model != catalog.AUTO
            else catalog.route_auto(
                input_tokens=input_tokens, has_tools=bool(tools), has_images=has_images, json_mode=json_mode
            )
        )
        # Each call draws from the seeded source; the prompt's hash varies the answer with the prompt.
        rng = self.server.state.fork_rng()
        rng.seed(rng.getrandbits(64) ^ zlib.crc32(prompt.encode()))
        region = region or catalog.choose_region(rng)
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        length = min(int(limit), 4096) if isinstance(limit, int) and limit > 0 else rng.randint(40, 420)
        content: str | None
        tool_calls = None
        if wants_tool:
            tool = tools[0].get("function", {}) if isinstance(tools[0], dict) else {}
            arguments = json.dumps(_fake_arguments(tool.get("parameters"), rng))
            tool_calls = [
                {
                    "id": f"call_{rng.getrandbits(48):012x}",
                    "type": "function",
                    "function": {"name": tool.get("name", "tool"), "arguments": arguments},
                }
            ]
            content, finish, output_tokens = None, "tool_calls", catalog.estimate_tokens(arguments) + 8
        elif json_mode:
            words = _words(rng, max(3, min(length, 60)))
            content = json.dumps({"answer": " ".join(words), "confidence": round(rng.random(), 3)})
            finish, output_tokens = "stop", catalog.estimate_tokens(content)
        elif any(isinstance(m, dict) and m.get("role") == "tool" for m in messages):
            content, finish = _TOOL_DONE, "stop"
            output_tokens = len(_TOOL_DONE.split())
        else:
            words = _words(rng, length)
            content = " ".join(words) + "."
            finish = "length" if isinstance(limit, int) and limit == length else "stop"
            output_tokens = len(words)
        energy = catalog.chat_energy_j(routed, input_tokens, output_tokens, tier, rng)
        receipt = Receipt(
            self.server.state.new_receipt_id(),
            _fingerprint(token),
            "chat",
            model,
            routed,
            tier,
            region,
            energy,
            catalog.carbon_mg(energy, region),
            input_tokens,
            output_tokens,
            bool(body.get("stream")),
        )
        return ChatPlan(
            f"chatcmpl-{rng.getrandbits(64):016x}",
            int(time.time()),
            routed,
            content,
            tool_calls,
            finish,
            input_tokens,
            output_tokens,
            receipt,
        )

    def _chat(self) -> None:
        body = self._json_request()
        token, model, tier, region = self._common(body)
        plan = self._plan_chat(body, token, model, tier, region)
        if self.openai_mode:
            plan = dataclasses.replace(plan, model=body["model"])
        else:
            self.server.state.bill(plan.receipt, token)
        self._pause(self.server.state.config.latency_s)
        usage = {
            "prompt_tokens": plan.input_tokens,
            "completion_tokens": plan.output_tokens,
            "total_tokens": plan.input_tokens + plan.output_tokens,
        }
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            self._stream_chat(plan, usage if include_usage else None)
            return
        message: dict[str, Any] = {"role": "assistant", "content": plan.content, "refusal": None}
        if plan.tool_calls:
            message["tool_calls"] = plan.tool_calls
        self._send_json(
            200,
            {
                "id": plan.completion_id,
                "object": "chat.completion",
                "created": plan.created,
                "model": plan.model,
                "choices": [{"index": 0, "message": message, "finish_reason": plan.finish_reason, "logprobs": None}],
                "usage": usage,
                "service_tier": plan.receipt.tier,
            },
            self._joule_headers(plan.receipt),
        )

    def _stream_chat(self, plan: ChatPlan, usage: dict[str, int] | None) -> None:
        self._start_stream(plan.receipt)
        delay = self.server.state.config.token_delay_s
        for event in self._chat_events(plan, usage):
            self._write_chunk(b"data: " + event + b"\n\n")
            self._pause(delay)
        self._write_chunk(b"data: [DONE]\n\n")
        self._write_chunk(b"")

    def _start_stream(self, receipt: Receipt) -> None:
        """The head of a server-sent-events response: chunked, with the Joule headers (known before the body)."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        for name, value in self._joule_headers(receipt).items():
            self.send_header(name, value)
        self.end_headers()

    def _chat_events(self, plan: ChatPlan, usage: dict[str, int] | None) -> Iterator[bytes]:
        base = {
            "id": plan.completion_id,
            "object": "chat.completion.chunk",
            "created": plan.created,
            "model": plan.model,
            "service_tier": plan.receipt.tier,
        }

        def event(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
            choices = [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
            return json.dumps({**base, "choices": choices, **extra}, separators=(",", ":")).encode()

        yield event({"role": "assistant", "content": ""})
        if plan.tool_calls:
            for index, call in enumerate(plan.tool_calls):
                yield event(
                    {
                        "tool_calls": [
                            {
                                "index": index,
                                "id": call["id"],
                                "type": "function",
                                "function": {"name": call["function"]["name"], "arguments": ""},
                            }
                        ]
                    }
                )
                yield event(
                    {"tool_calls": [{"index": index, "function": {"arguments": call["function"]["arguments"]}}]}
                )
        elif plan.content is not None:
            words = plan.content.split(" ")
            for index, word in enumerate(words):
                yield event({"content": word if index == 0 else " " + word})
        # The final event carries the measured energy too: a streaming server knows it only at the end.
        joule = {"energy_joules": plan.receipt.energy_j, "carbon_mg": plan.receipt.carbon_mg}
        if self.openai_mode:
            yield event({}, plan.finish_reason)
            if usage is not None:
                yield json.dumps({**base, "choices": [], "usage": usage}, separators=(",", ":")).encode()
            return
        if usage is None:
            yield event({}, plan.finish_reason, joule=joule)
        else:
            yield event({}, plan.finish_reason)
            yield json.dumps({**base, "choices": [], "usage": usage, "joule": joule}, separators=(",", ":")).encode()

    # -- the Responses API (the Vercel AI SDK's default, the OpenAI Agents SDK's, pydantic-ai's) -------------------
    @staticmethod
    def _responses_as_chat(body: dict[str, Any]) -> dict[str, Any]:
        """A Responses request as the chat request it amounts to (instructions, input items, tools, limits)."""
        messages: list[dict[str, Any]] = []
        if isinstance(body.get("instructions"), str):
            messages.append({"role": "system", "content": body["instructions"]})
        items = body.get("input")
        if isinstance(items, str):
            messages.append({"role": "user", "content": items})
        elif isinstance(items, list):
            for item in items:
                if not isinstance(item, dict):
                    continue
                kind = item.get("type", "message")
                if kind == "message":
                    messages.append({"role": item.get("role", "user"), "content": item.get("content")})
                elif kind == "function_call_output":
                    messages.append({"role": "tool", "content": str(item.get("output", ""))})
        tools = [
            {"type": "function", "function": {"name": t.get("name"), "parameters": t.get("parameters")}}
            for t in body.get("tools") or []
            if isinstance(t, dict) and t.get("type") == "function"
        ]
        text_format = ((body.get("text") or {}).get("format") or {}).get("type")
        return {
            "model": body.get("model"),
            "messages": messages,
            "tools": tools,
            "max_tokens": body.get("max_output_tokens"),
            "response_format": {"type": "json_object"} if text_format in ("json_object", "json_schema") else None,
            "stream": body.get("stream"),
        }

    def _responses(self) -> None:
        body = self._json_request()
        token, model, tier, region = self._common(body)
        chat = self._responses_as_chat(body)
        if not chat["messages"]:
            raise ApiError(400, "`input` must be a string or a non-empty list.", "invalid_request_error", None, "input")
        plan = self._plan_chat(chat, token, model, tier, region)
        receipt = dataclasses.replace(plan.receipt, operation="responses")
        plan = dataclasses.replace(plan, completion_id="resp_" + plan.completion_id.split("-", 1)[1], receipt=receipt)
        self.server.state.bill(plan.receipt, token)
        self._pause(self.server.state.config.latency_s)
        if body.get("stream"):
            self._stream_responses(plan)
            return
        self._send_json(200, self._response_object(plan, "completed"), self._joule_headers(plan.receipt))

    def _response_output(self, plan: ChatPlan) -> list[dict[str, Any]]:
        if plan.tool_calls:
            return [
                {
                    "type": "function_call",
                    "id": "fc_" + call["id"].split("_", 1)[1],
                    "call_id": call["id"],
                    "name": call["function"]["name"],
                    "arguments": call["function"]["arguments"],
                    "status": "completed",
                }
                for call in plan.tool_calls
            ]
        text = plan.content or ""
        return [
            {
                "type": "message",
                "id": "msg_" + plan.completion_id[5:],
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
            }
        ]

    def _response_object(self, plan: ChatPlan, status: str) -> dict[str, Any]:
        done = status == "completed"
        return {
            "id": plan.completion_id,
            "object": "response",
            "created_at": plan.created,
            "status": status,
            "error": None,
            "incomplete_details": None,
            "model": plan.model,
            "output": self._response_output(plan) if done else [],
            "service_tier": plan.receipt.tier,
            "usage": {
                "input_tokens": plan.input_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": plan.output_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": plan.input_tokens + plan.output_tokens,
            }
            if done
            else None,
        }

    def _stream_responses(self, plan: ChatPlan) -> None:
        self._start_stream(plan.receipt)
        delay = self.server.state.config.token_delay_s
        for sequence, (kind, payload) in enumerate(self._response_events(plan)):
            event = {"type": kind, "sequence_number": sequence, **payload}
            data = json.dumps(event, separators=(",", ":")).encode()
            self._write_chunk(b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n")
            self._pause(delay)
        self._write_chunk(b"")

    def _response_events(self, plan: ChatPlan) -> Iterator[tuple[str, dict[str, Any]]]:
        yield "response.created", {"response": self._response_object(plan, "in_progress")}
        yield "response.in_progress", {"response": self._response_object(plan, "in_progress")}
        for index, item in enumerate(self._response_output(plan)):
            if item["type"] == "function_call":
                yield "response.output_item.added", {"output_index": index, "item": {**item, "arguments": ""}}
                yield (
                    "response.function_call_arguments.delta",
                    {"item_id": item["id"], "output_index": index, "delta": item["arguments"]},
                )
                yield (
                    "response.function_call_arguments.done",
                    {"item_id": item["id"], "output_index": index, "arguments": item["arguments"]},
                )
                yield "response.output_item.done", {"output_index": index, "item": item}
                continue
            part = item["content"][0]
            added = {**item, "status": "in_progress", "content": []}
            yield "response.output_item.added", {"output_index": index, "item": added}
            where = {"item_id": item["id"], "output_index": index, "content_index": 0}
            yield "response.content_part.added", {**where, "part": {**part, "text": ""}}
            for n, word in enumerate(part["text"].split(" ")):
                yield "response.output_text.delta", {**where, "delta": word if n == 0 else " " + word, "logprobs": []}
            yield "response.output_text.done", {**where, "text": part["text"], "logprobs": []}
            yield "response.content_part.done", {**where, "part": part}
            yield "response.output_item.done", {"output_index": index, "item": item}
        # the measured figures travel in the final event, as in a chat stream's
        joule = {"energy_joules": plan.receipt.energy_j, "carbon_mg": plan.receipt.carbon_mg}
        yield "response.completed", {"response": self._response_object(plan, "completed"), "joule": joule}

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    @staticmethod
    def _pause(seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)


_OPENAI_ROUTES = frozenset({"/v1/chat/completions", "/v1/embeddings", "/v1/models"})
"""What the OpenAI stand-in serves (receipts and accounts are Joule's)."""


class SimulatorHTTPServer(ThreadingHTTPServer):
    """A threading server that knows the simulator's state and closes its sockets cleanly."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], state: SimulatorState) -> None:
        self.state = state
        super().__init__(address, Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up is normal (keep-alive pools closing); anything else is printed."""
        import sys

        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)
