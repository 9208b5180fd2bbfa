"""Other languages' HTTP client spans → ledger rows.

OpenTelemetry's HTTP client instrumentations put response headers on spans when asked
(``headersToSpanAttributes`` in Node, ``OTEL_INSTRUMENTATION_HTTP_CLIENT_CAPTURE_RESPONSE_HEADERS`` in Java):
``http.response.header.<lower-case name>``, a string array or one comma-joined string. A CLIENT span that
carries a Joule header is one call. Tokens, the requested model and the stream flag come from the GenAI span
around it when there is one (the Vercel AI SDK's ``ai.generateText.doGenerate`` / ``ai.streamText.doStream``),
which may arrive in a later export than the child: children wait for their parent up to :data:`PARENT_WAIT_S`.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from joule_otel._calls import call_row, completed
from joule_otel._genai import INFERENCE_OPERATIONS, JOULE_PROVIDER, OTHER_OPERATION, route_operation
from joule_otel._headers import (
    CARBON_MG,
    ENERGY_JOULES,
    RECEIPT_ID,
    REGION,
    RESPONSE_HEADERS,
    ROUTED_TO,
    TIER,
    clean_label,
    clean_receipt,
    clean_string,
    parse_carbon,
    parse_energy,
    parse_token_count,
)
from joule_otel._tags import from_attributes, merged
from joule_otel.collect._otlp import SPAN_KIND_CLIENT, Span
from joule_otel.ledger._row import LedgerRow, duration_ms, start_problem

PARENT_WAIT_S = 15.0
"""How long a call whose parent span has not arrived waits for it (its tokens and requested model). Node's and
Java's batch span processors export every 5 s, and a parent ends after its child: the next export brings it."""
PARENTS_KEPT = 50_000
"""GenAI parent spans remembered for children that arrive after them."""

AGENT_LEVELS = 6
"""How far above a call's GenAI span an agent's name is looked for."""

_RESPONSE = "http.response.header."
_REQUEST = "http.request.header."


def _header(attributes: dict[str, Any], key: str) -> str | None:
    """The last value of a captured header's attribute: a string array, or one comma-joined string (Node's http)."""
    value = attributes.get(key)
    if type(value) is str and "," not in value:  # the usual case: one value (protobuf's arrays are reduced to it)
        return value.strip()
    if isinstance(value, list):
        value = value[-1] if value else None
    if not isinstance(value, str):
        return None
    return value.rsplit(",", 1)[-1].strip() if "," in value else value.strip()


_ENERGY, _CARBON, _ROUTED, _TIER, _REGION, _RECEIPT, _CONTENT_TYPE = (
    _RESPONSE + name for name in (ENERGY_JOULES, CARBON_MG, ROUTED_TO, TIER, REGION, RECEIPT_ID, "content-type")
)
_REQUEST_REGION = _REQUEST + REGION
_JOULE_ATTRIBUTES = frozenset(_RESPONSE + name for name in RESPONSE_HEADERS)


def is_joule_call(span: Span) -> bool:
    """A CLIENT span that carries any of Joule's response headers."""
    return span.kind == SPAN_KIND_CLIENT and not _JOULE_ATTRIBUTES.isdisjoint(span.attributes)


@dataclass
class GenAIFacts:
    """What a GenAI span around an HTTP call says."""

    input_tokens: int | None
    output_tokens: int | None
    requested_model: str | None
    stream: bool | None
    ttft_ms: float | None
    workload: str | None
    parent_span_id: str
    """Its own parent: AI SDK 7 puts the ``functionId`` (``gen_ai.agent.name``) on the ``invoke_agent`` span there."""


_GENAI_MARKS = frozenset(
    {"gen_ai.usage.input_tokens", "ai.usage.inputTokens", "ai.usage.promptTokens", "gen_ai.request.model"}
)
"""A span with any of these attributes (or an ``ai.*`` name) is a GenAI span."""


def genai_facts(span: Span) -> GenAIFacts | None:
    """The facts of a GenAI span (the AI SDK's ``doGenerate``/``doStream``, a ``gen_ai.*`` span), else None."""
    a = span.attributes
    if _GENAI_MARKS.isdisjoint(a) and not span.name.startswith("ai."):
        return None
    first_chunk = a.get("ai.response.msToFirstChunk")
    return GenAIFacts(
        input_tokens=_first_count(a, "gen_ai.usage.input_tokens", "ai.usage.inputTokens", "ai.usage.promptTokens"),
        output_tokens=_first_count(
            a, "gen_ai.usage.output_tokens", "ai.usage.outputTokens", "ai.usage.completionTokens"
        ),
        requested_model=_text(a.get("gen_ai.request.model") or a.get("ai.model.id")),
        stream=True if "doStream" in span.name or "streamText" in span.name else None,
        ttft_ms=duration_ms(first_chunk),
        workload=_text(a.get("joule.workload") or a.get("ai.telemetry.functionId")),
        parent_span_id=span.parent_span_id,
    )


def agent_name(span: Span) -> str | None:
    """The name a GenAI span gives the work it does (``gen_ai.agent.name``, the AI SDK's ``functionId``)."""
    a = span.attributes
    return _text(a.get("gen_ai.agent.name") or a.get("ai.telemetry.functionId") or a.get("joule.workload"))


def _first_count(attributes: dict[str, Any], *names: str) -> int | None:
    for name in names:
        count = parse_token_count(attributes.get(name))
        if count is not None:
            return count
    return None


def _text(value: Any) -> str | None:
    return clean_string(value) if isinstance(value, str) else None


_split_urls: dict[str, tuple[str | None, str | None]] = {}


def _split(url: str) -> tuple[str | None, str | None]:
    """(path, host) of a URL, remembered: a service calls few distinct URLs."""
    found = _split_urls.get(url)
    if found is None:
        try:
            parts = urlsplit(url)
            found = (parts.path, parts.hostname)
        except ValueError:
            found = (None, None)
        if len(_split_urls) >= 4096:
            _split_urls.clear()
        _split_urls[url] = found
    return found


def _url_parts(a: dict[str, Any]) -> tuple[str | None, str | None]:
    """(path, host) of the span's URL, from whichever attributes the instrumentation set."""
    url = a.get("url.full") or a.get("http.url")
    path = a.get("url.path") or a.get("http.target")
    host = a.get("server.address") or a.get("net.peer.name") or a.get("http.host")
    if isinstance(url, str) and not (isinstance(path, str) and isinstance(host, str)):
        url_path, url_host = _split(url)
        path = path or url_path
        host = host or url_host
    return (path if isinstance(path, str) else None), (host if isinstance(host, str) else None)


def span_row(span: Span, parent: GenAIFacts | None, agent: str | None = None) -> LedgerRow | None:
    """The ledger row of a Joule call seen as an HTTP client span, with its GenAI parent's facts; None if not one.

    ``agent`` is the name of the GenAI work above the parent (its workload when nothing closer names one).
    """
    a = span.attributes
    path, host = _url_parts(a)
    operation = route_operation(path or "")
    if operation is None:
        operation = OTHER_OPERATION
    elif operation not in INFERENCE_OPERATIONS:
        return None
    region = _header(a, _REGION) or _header(a, _REQUEST_REGION)
    workload = _label(a.get("joule.workload") or span.resource.get("joule.workload"))
    service = _label(span.resource.get("service.name"))
    return call_row(
        receipt_id=clean_receipt(_header(a, _RECEIPT)),
        started_us=span.start_ns // 1000,
        duration_ms=(span.end_ns - span.start_ns) / 1e6 if span.end_ns else None,
        ttft_ms=parent.ttft_ms if parent else None,
        service=service,
        workload=workload or (parent.workload if parent else None) or agent,
        operation=operation,
        server_address=_label(host),
        status=a.get("http.response.status_code", a.get("http.status_code")),
        error=_label(a.get("error.type")),
        requested_model=parent.requested_model if parent else None,
        routed_to=clean_label(_header(a, _ROUTED)),
        tier=clean_label(_header(a, _TIER), lower=True),
        region=clean_label(region, lower=True),
        energy_j=parse_energy(_header(a, _ENERGY)),
        carbon_mg=parse_carbon(_header(a, _CARBON)),
        input_tokens=parent.input_tokens if parent else None,
        output_tokens=parent.output_tokens if parent else None,
        stream=_streamed(a, parent),
        trace_id=span.trace_id,
        span_id=span.span_id,
        provider=JOULE_PROVIDER,
        tags=merged(from_attributes(span.resource), from_attributes(a))[0],  # the span's own win its resource's
    )


def _label(value: Any) -> str | None:
    """A name from a small set (a host, a service, a workload, an error type), cleaned once and remembered."""
    return clean_label(value) if isinstance(value, str) else None


def _streamed(attributes: dict[str, Any], parent: GenAIFacts | None) -> bool | None:
    """A stream: the response was server-sent events (``content-type`` captured), or the GenAI span says so."""
    content_type = _header(attributes, _CONTENT_TYPE)
    if content_type is not None:
        return content_type.lower().startswith("text/event-stream")
    return parent.stream if parent is not None else None


class Call(NamedTuple):
    """A Joule call as its client span shows it, before its GenAI parent's facts are known.

    A tuple: thousands cross from a decoding process each second, and tuples pickle fastest.
    """

    row: LedgerRow
    trace_id: str
    span_id: str
    parent_span_id: str
    own_workload: bool
    """The span or its resource named the workload (``joule.workload``): no parent changes it."""
    stream_known: bool
    """The captured content-type said whether the response streamed."""


@dataclass
class Prepared:
    """An export's spans reduced to what the joiner needs: made where the CPU is (a worker process), joined in one."""

    calls: list[Call]
    parents: list[tuple[str, str, GenAIFacts]]
    agents: list[tuple[str, str, str]]
    up: list[tuple[str, str, str]]
    rejected: int = 0
    errors: list[str] | None = None

    def __getstate__(self) -> dict[str, Any]:
        # crossing from a decoding process: calls as flat tuples pickle several times faster than tuples of named tuples
        state = dict(self.__dict__)
        state["calls"] = [(*call.row, *call[1:]) for call in self.calls]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        width = len(LedgerRow._fields)
        state["calls"] = [Call(LedgerRow._make(flat[:width]), *flat[width:]) for flat in state["calls"]]
        self.__dict__.update(state)


def prepare(spans: list[Span]) -> Prepared:
    """The calls, GenAI parents, agent names and parent links of ``spans`` (pure: no state, picklable result)."""
    found = Prepared([], [], [], [])
    for span in spans:
        if span.kind != SPAN_KIND_CLIENT:
            if span.parent_span_id:
                found.up.append((span.trace_id, span.span_id, span.parent_span_id))
            name = agent_name(span)
            if name is not None:
                found.agents.append((span.trace_id, span.span_id, name))
        facts = genai_facts(span)
        if facts is not None:
            found.parents.append((span.trace_id, span.span_id, facts))
        if is_joule_call(span):
            row = span_row(span, None)
            refused = start_problem(row.started_at_us) if row is not None else None
            if refused:  # an unset or wild clock: not a call the ledger can date; the sender is told
                found.rejected += 1
                found.errors = [*(found.errors or []), refused]
            elif row is not None:
                a = span.attributes
                found.calls.append(
                    Call(
                        row=row,
                        trace_id=span.trace_id,
                        span_id=span.span_id,
                        parent_span_id=span.parent_span_id,
                        own_workload=bool(_label(a.get("joule.workload") or span.resource.get("joule.workload"))),
                        stream_known=_header(a, _CONTENT_TYPE) is not None,
                    )
                )
    return found


def with_parent(call: Call, parent: GenAIFacts | None, agent: str | None) -> LedgerRow:
    """The call's row completed with its GenAI parent's facts (what :func:`span_row` makes with a parent)."""
    if parent is None and agent is None:
        return call.row
    row = call.row
    workload = row.workload if call.own_workload else ((parent.workload if parent else None) or agent)
    if parent is None:
        return completed(row, workload=workload)
    return completed(
        row,
        workload=workload,
        ttft_ms=parent.ttft_ms,
        requested_model=parent.requested_model,
        input_tokens=parent.input_tokens,
        output_tokens=parent.output_tokens,
        stream=row.stream if call.stream_known else parent.stream,
    )


class SpanJoiner:
    """Pairs Joule calls with their GenAI parents across exports; not thread-safe (the caller locks)."""

    def __init__(self, wait_s: float = PARENT_WAIT_S) -> None:
        self.wait_s = wait_s
        self._parents: OrderedDict[tuple[str, str], GenAIFacts] = OrderedDict()
        self._waiting: OrderedDict[tuple[str, str], tuple[float, Call]] = OrderedDict()
        """(trace id, span id) of a call → (deadline, the call), oldest first (so in deadline order)."""
        self._by_parent: dict[tuple[str, str], list[tuple[str, str]]] = {}
        self._agents: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._up: OrderedDict[tuple[str, str], str] = OrderedDict()
        """(trace id, span id) → parent span id, for the spans above calls (agent → step → chat → HTTP call)."""
        self.changes = 0
        """Counts every call that starts or stops waiting: the waiting set changed when this did."""

    def add(self, spans: list[Span], now: float | None = None) -> list[LedgerRow]:
        """Take an export's spans; return the rows ready now (with their parent, or without one to wait for)."""
        return self.add_prepared(prepare(spans), now)

    def add_prepared(self, prepared: Prepared, now: float | None = None) -> list[LedgerRow]:
        """:meth:`add` for spans :func:`prepare` reduced already (in a worker process, say)."""
        now = time.monotonic() if now is None else now
        ready: list[LedgerRow] = []
        for trace_id, span_id, parent_id in prepared.up:
            self._up[(trace_id, span_id)] = parent_id
        for trace_id, span_id, name in prepared.agents:
            self._agents[(trace_id, span_id)] = name
        for bounded in (self._up, self._agents):
            while len(bounded) > PARENTS_KEPT:
                bounded.popitem(last=False)
        for trace_id, span_id, facts in prepared.parents:
            key = (trace_id, span_id)
            self._parents[key] = facts
            if len(self._parents) > PARENTS_KEPT:
                self._parents.popitem(last=False)
            for child in self._by_parent.pop(key, ()):
                waiting = self._waiting.pop(child, None)
                if waiting is not None:
                    self.changes += 1
                    ready.append(self._complete(waiting[1], facts))
        for call in prepared.calls:
            parent_key = (call.trace_id, call.parent_span_id)
            if not call.parent_span_id or parent_key in self._parents:
                ready.append(self._complete(call, self._parents.get(parent_key)))
                continue
            key = (call.trace_id, call.span_id)
            self._waiting[key] = (now + self.wait_s, call)
            self.changes += 1
            self._by_parent.setdefault(parent_key, []).append(key)
        ready += self.expire(now)
        return ready

    def _complete(self, call: Call, parent: GenAIFacts | None) -> LedgerRow:
        agent = self._agent_above(call.trace_id, parent.parent_span_id) if parent is not None else None
        return with_parent(call, parent, agent)

    def _agent_above(self, trace_id: str, span_id: str) -> str | None:
        """The nearest agent name among the spans above ``span_id`` (a few levels: agent, step, call)."""
        for _ in range(AGENT_LEVELS):
            if not span_id:
                return None
            name = self._agents.get((trace_id, span_id))
            if name is not None:
                return name
            span_id = self._up.get((trace_id, span_id), "")
        return None

    def expire(self, now: float | None = None, *, everything: bool = False) -> list[LedgerRow]:
        """Rows whose parent did not come in time (or every waiting row, at shutdown): written without its facts."""
        now = time.monotonic() if now is None else now
        ready: list[LedgerRow] = []
        while self._waiting:
            key, (deadline, call) = next(iter(self._waiting.items()))
            if deadline > now and not everything:
                break
            del self._waiting[key]
            self.changes += 1
            parent_key = (call.trace_id, call.parent_span_id)
            siblings = self._by_parent.get(parent_key)
            if siblings is not None:
                siblings.remove(key)
                if not siblings:
                    del self._by_parent[parent_key]
            ready.append(call.row)
        return ready

    def waiting_rows(self) -> list[LedgerRow]:
        """The rows of the waiting calls as expiry would write them (what the receiver keeps on disk meanwhile)."""
        return [call.row for _, call in self._waiting.values()]

    @property
    def waiting(self) -> int:
        """Calls waiting for their parent span."""
        return len(self._waiting)
