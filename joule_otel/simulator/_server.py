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
import hashlib
import json
import random
import time
import urllib.parse
import zlib
from datetime import datetime, timezone
from http.server import ThreadingHTTPServer
from typing import Any

from joule_otel.simulator import _catalog as catalog
from joule_otel.simulator._answers import TOOL_DONE, ChatPlan, fake_arguments, some_words, text_of
from joule_otel.simulator._state import ApiError, Receipt, SimulatorState, fingerprint
from joule_otel.simulator._wire import WireHandler

OPENAI_PREFIX = "/openai"


OPENAI_STAND_INS = {
    "gpt-4o-mini": "llama-3.3-70b-instruct",
    "gpt-4o": "llama-3.3-405b-instruct",
    "gpt-4.1-mini": "llama-3.3-70b-instruct",
    "text-embedding-3-small": "gpt-oss-120b",
}
"""OpenAI model names the ``/openai/v1`` routes accept → the catalog model whose answers they borrow."""


class Handler(WireHandler):
    """One connection's requests (HTTP/1.1 keep-alive)."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server_version = "JouleCloudSimulator/1"

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the simulator serves tests and demos, not an access log."""

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

    def _health(self) -> None:
        self._send_json(200, {"status": "ok"})

    def _models(self) -> None:
        self._token()
        created = 1_730_000_000
        data = [{"id": catalog.AUTO, "object": "model", "created": created, "owned_by": "joule-cloud"}]
        data += [
            {"id": name, "object": "model", "created": created, "owned_by": "joule-cloud"}
            for name in (*catalog.MODELS, catalog.EMBEDDING_MODEL)
        ]
        self._send_json(200, {"object": "list", "data": data})

    def _receipts(self) -> None:
        """The calling account's bill, oldest first, a page at a time.

        ``since``/``until``: ISO 8601 or epoch seconds, half-open; ``limit``: 1-10000 (default 1000);
        ``after=<receipt_id>``: the page after that receipt.
        """
        token = self._token()
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)

        def one(name: str) -> str | None:
            values = query.get(name)
            return values[-1] if values else None

        since, until = _instant(one("since"), "since"), _instant(one("until"), "until")
        raw_limit = one("limit") or "1000"
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_PAGE:
            raise ApiError(400, f"limit must be an integer in [1, {MAX_PAGE}]", "invalid_request_error", None, "limit")
        records = self.server.state.bill_records(token, since, until)
        after = one("after")
        if after is not None:
            ids = [r["receipt_id"] for r in records]
            if after not in ids:
                raise ApiError(
                    404, f"No receipt {after!r} in this account's bill.", "invalid_request_error", None, "after"
                )
            records = records[ids.index(after) + 1 :]
        page = records[: int(raw_limit)]
        self._send_json(
            200,
            {
                "object": "list",
                "data": page,
                "has_more": len(records) > len(page),
                "first_id": page[0]["receipt_id"] if page else None,
                "last_id": page[-1]["receipt_id"] if page else None,
            },
        )

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
        if model != catalog.AUTO and model not in catalog.MODELS and model != catalog.EMBEDDING_MODEL:
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
        routed = catalog.EMBEDDING_MODEL if model == catalog.AUTO else model
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
            fingerprint(token),
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
        self._pause(self.server.state.config.latency_s * catalog.latency_factor(routed))
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
        if model == catalog.EMBEDDING_MODEL:
            raise ApiError(
                400, f"`{model}` is an embeddings model: call /v1/embeddings.", "invalid_request_error", None, "model"
            )
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "`messages` must be a non-empty list.", "invalid_request_error", None, "messages")
        texts, has_images = [], False
        for msg in messages:
            if isinstance(msg, dict):
                text, images = text_of(msg.get("content"))
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
            arguments = json.dumps(fake_arguments(tool.get("parameters"), rng))
            tool_calls = [
                {
                    "id": f"call_{rng.getrandbits(48):012x}",
                    "type": "function",
                    "function": {"name": tool.get("name", "tool"), "arguments": arguments},
                }
            ]
            content, finish, output_tokens = None, "tool_calls", catalog.estimate_tokens(arguments) + 8
        elif json_mode:
            words = some_words(rng, max(3, min(length, 60)))
            content = json.dumps({"answer": " ".join(words), "confidence": round(rng.random(), 3)})
            finish, output_tokens = "stop", catalog.estimate_tokens(content)
        elif any(isinstance(m, dict) and m.get("role") == "tool" for m in messages):
            content, finish = TOOL_DONE, "stop"
            output_tokens = len(TOOL_DONE.split())
        else:
            words = some_words(rng, length)
            content = " ".join(words) + "."
            finish = "length" if isinstance(limit, int) and limit == length else "stop"
            output_tokens = len(words)
        energy = catalog.chat_energy_j(routed, input_tokens, output_tokens, tier, rng)
        receipt = Receipt(
            self.server.state.new_receipt_id(),
            fingerprint(token),
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

    def _wait_before_answering(self, plan: ChatPlan, stream: bool) -> float:
        """Time to the first byte, scaled by the model's size (:func:`~._catalog.latency_factor`).

        A stream then pays ``token_delay_s`` (scaled the same way) an event as it is sent; a whole answer pays for its
        output tokens at that pace before its first byte.
        """
        config = self.server.state.config
        factor = catalog.latency_factor(plan.receipt.routed_to)
        if stream:
            return config.latency_s * factor
        return (config.latency_s + plan.output_tokens * config.token_delay_s) * factor

    def _chat(self) -> None:
        body = self._json_request()
        token, model, tier, region = self._common(body)
        plan = self._plan_chat(body, token, model, tier, region)
        if self.openai_mode:
            plan = dataclasses.replace(plan, model=body["model"])
        else:
            self.server.state.bill(plan.receipt, token)
        self._pause(self._wait_before_answering(plan, bool(body.get("stream"))))
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
        self._pause(self._wait_before_answering(plan, bool(body.get("stream"))))
        if body.get("stream"):
            self._stream_responses(plan)
            return
        self._send_json(200, self._response_object(plan, "completed"), self._joule_headers(plan.receipt))


MAX_PAGE = 10_000
"""The most receipts one page of ``GET /v1/receipts`` holds."""


def _instant(value: str | None, name: str) -> float | None:
    """A query's time: ISO 8601 (naive is UTC) or seconds since the epoch."""
    if value is None or not value.strip():
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ApiError(
            400, f"{name} is neither ISO 8601 nor epoch seconds: {value!r}", "invalid_request_error", None, name
        ) from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


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
