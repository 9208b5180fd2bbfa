"""Writing answers: JSON with the Joule (or OpenAI) headers, and server-sent event streams, chunk by chunk.

The base of the simulator's request handler; the routes (:mod:`._server`) decide what to answer, this module how
it goes on the wire.
"""

from __future__ import annotations

import gzip
import json
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any

from joule_otel.simulator._answers import ChatPlan
from joule_otel.simulator._catalog import latency_factor
from joule_otel.simulator._state import Receipt

if TYPE_CHECKING:
    from joule_otel.simulator._server import SimulatorHTTPServer


class WireHandler(BaseHTTPRequestHandler):
    """How a response is written: headers, JSON bodies, and streams."""

    openai_mode = False
    """This request came under ``/openai/v1``: answer as OpenAI's API does (no Joule headers, no bill)."""
    server: SimulatorHTTPServer

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

    def _start_stream(self, receipt: Receipt) -> None:
        """The head of a server-sent-events response: chunked, with the Joule headers (known before the body)."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        for name, value in self._joule_headers(receipt).items():
            self.send_header(name, value)
        self.end_headers()

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    @staticmethod
    def _pause(seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)

    def _stream_chat(self, plan: ChatPlan, usage: dict[str, int] | None) -> None:
        self._start_stream(plan.receipt)
        delay = self.server.state.config.token_delay_s * latency_factor(plan.receipt.routed_to)
        for event in self._chat_events(plan, usage):
            self._write_chunk(b"data: " + event + b"\n\n")
            self._pause(delay)
        self._write_chunk(b"data: [DONE]\n\n")
        self._write_chunk(b"")

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
        delay = self.server.state.config.token_delay_s * latency_factor(plan.receipt.routed_to)
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
