"""The simulator, driven through the real openai SDK, LangChain and raw HTTP on loopback."""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from joule_otel.simulator import GRID_G_PER_KWH, MODELS, TIER_MULTIPLIER, running
from joule_otel.simulator._catalog import EMBEDDING_MODEL, PREFILL_SHARE, latency_factor

HI = [{"role": "user", "content": "hi"}]


def client(sim, key: str = "jc_test", **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=sim.base_url, api_key=key, max_retries=0, **kwargs)


def test_chat_plain_carries_joule_headers_that_match_the_receipt(joule_simulator):
    raw = client(joule_simulator).chat.completions.with_raw_response.create(model="auto", messages=HI)
    completion = raw.parse()
    receipt = joule_simulator.receipts[-1]
    assert completion.choices[0].message.content
    assert raw.headers["x-receipt-id"] == receipt.receipt_id
    assert float(raw.headers["x-energy-joules"]) == receipt.energy_j
    assert float(raw.headers["x-carbon-mg"]) == receipt.carbon_mg
    assert raw.headers["x-routed-to"] == completion.model == receipt.routed_to
    assert raw.headers["x-tier"] == "standard"
    assert raw.headers["x-region"] in GRID_G_PER_KWH
    assert completion.usage.completion_tokens == receipt.output_tokens
    assert completion.usage.prompt_tokens == receipt.input_tokens


def test_energy_model_and_carbon_formula(joule_simulator):
    c = client(joule_simulator)
    for region in GRID_G_PER_KWH:
        raw = c.chat.completions.with_raw_response.create(
            model="llama-3.3-70b-instruct", messages=HI, max_tokens=300, extra_headers={"X-Region": region}
        )
        energy, carbon = float(raw.headers["x-energy-joules"]), float(raw.headers["x-carbon-mg"])
        assert raw.headers["x-region"] == region
        assert carbon == pytest.approx(energy * GRID_G_PER_KWH[region] / 3600, abs=1e-4)
        receipt = joule_simulator.receipts[-1]
        expected = MODELS["llama-3.3-70b-instruct"].joules_per_output_token * (
            receipt.output_tokens + PREFILL_SHARE * receipt.input_tokens
        )
        assert expected * 0.95 <= energy <= expected * 1.05
        # a response of a few hundred tokens is a few hundred joules
        assert 200 < energy < 500


def test_tiers_scale_energy_and_405b_costs_more_than_small_models(joule_simulator):
    c = client(joule_simulator)

    def per_token(model: str, tier: str) -> float:
        raw = c.chat.completions.with_raw_response.create(
            model=model, messages=HI, max_tokens=200, extra_headers={"X-Tier": tier}
        )
        assert raw.headers["x-tier"] == tier
        return float(raw.headers["x-energy-joules"]) / joule_simulator.receipts[-1].output_tokens

    batch, standard, priority = (per_token("llama-3.3-70b-instruct", t) for t in ("batch", "standard", "priority"))
    assert batch < standard < priority
    assert priority / batch == pytest.approx(TIER_MULTIPLIER["priority"] / TIER_MULTIPLIER["batch"], rel=0.1)
    assert per_token("llama-3.3-405b-instruct", "standard") > 3 * per_token("gpt-oss-120b", "standard")
    # service_tier in the body works too, with OpenAI's names
    raw = c.chat.completions.with_raw_response.create(model="auto", messages=HI, service_tier="flex")
    assert raw.headers["x-tier"] == "batch"


def test_auto_router_picks_by_capability(joule_simulator):
    c = client(joule_simulator)
    short = c.chat.completions.create(model="auto", messages=HI)
    tools = c.chat.completions.create(
        model="auto",
        messages=HI,
        tools=[
            {
                "type": "function",
                "function": {"name": "f", "parameters": {"type": "object", "properties": {}}},
            }
        ],
    )
    long = c.chat.completions.create(model="auto", messages=[{"role": "user", "content": "word " * 6000}])
    image = c.chat.completions.create(
        model="auto",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                ],
            }
        ],
    )
    assert short.model == "gpt-oss-120b"
    assert tools.model == "llama-3.3-70b-instruct"
    assert long.model == "deepseek-v3"
    assert image.model == "claude-haiku-4.5"
    pinned = c.chat.completions.create(model="qwen2.5-72b", messages=HI)
    assert pinned.model == "qwen2.5-72b"


def test_streaming_with_and_without_usage(joule_simulator):
    c = client(joule_simulator)
    chunks = list(
        c.chat.completions.create(model="auto", messages=HI, stream=True, stream_options={"include_usage": True})
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    receipt = joule_simulator.receipts[-1]
    assert receipt.stream
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == receipt.output_tokens
    assert chunks[-1].model_extra["joule"]["energy_joules"] == receipt.energy_j
    assert len(text.split()) == receipt.output_tokens
    plain = list(c.chat.completions.create(model="auto", messages=HI, stream=True))
    assert all(ch.usage is None for ch in plain)
    assert plain[-1].choices[0].finish_reason in ("stop", "length")
    assert plain[-1].model_extra["joule"]["energy_joules"] == joule_simulator.receipts[-1].energy_j


def test_streamed_tool_calls_and_tool_loop(joule_simulator):
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                    "required": ["city", "days"],
                },
            },
        }
    ]
    c = client(joule_simulator)
    first = c.chat.completions.create(model="auto", messages=HI, tools=tools)
    call = first.choices[0].message.tool_calls[0]
    assert first.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather"
    assert set(json.loads(call.function.arguments)) == {"city", "days"}
    answer = c.chat.completions.create(
        model="auto",
        tools=tools,
        messages=[
            *HI,
            {"role": "assistant", "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
        ],
    )
    assert answer.choices[0].message.content
    streamed = list(c.chat.completions.create(model="auto", messages=HI, tools=tools, stream=True))
    args = "".join(
        tc.function.arguments or "" for ch in streamed if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])
    )
    assert set(json.loads(args)) == {"city", "days"}


def test_json_mode_returns_valid_json(joule_simulator):
    out = client(joule_simulator).chat.completions.create(
        model="auto", messages=HI, response_format={"type": "json_object"}
    )
    assert isinstance(json.loads(out.choices[0].message.content), dict)


def test_embeddings_and_models(joule_simulator):
    c = client(joule_simulator)
    emb = c.embeddings.create(model="auto", input=["alpha", "beta", "alpha"])
    assert [len(d.embedding) for d in emb.data] == [256, 256, 256]
    assert emb.data[0].embedding == emb.data[2].embedding != emb.data[1].embedding
    assert joule_simulator.receipts[-1].operation == "embeddings"
    assert joule_simulator.receipts[-1].routed_to == EMBEDDING_MODEL  # auto sends embeddings to an encoder
    ids = {m.id for m in c.models.list()}
    assert ids == {"auto", *MODELS, EMBEDDING_MODEL}
    with pytest.raises(openai.BadRequestError, match="embeddings model"):
        c.chat.completions.create(model=EMBEDDING_MODEL, messages=HI)


def test_bigger_models_answer_slower():
    """Latency grows with the model's size (its energy per token), as on the mesh: a 405B model is the slowest."""
    by_energy = sorted(MODELS, key=lambda m: MODELS[m].joules_per_output_token)
    factors = [latency_factor(m) for m in by_energy]
    assert factors == sorted(factors) and factors[0] == 1.0 and latency_factor(EMBEDDING_MODEL) < 1.0
    with running(seed=3, latency_s=0.05, token_delay_s=0.0) as sim:  # 50 ms against 160 ms before the first byte
        took = {}
        for model in ("gpt-oss-120b", "llama-3.3-405b-instruct"):
            started = time.perf_counter()
            client(sim).chat.completions.create(model=model, messages=HI)
            took[model] = time.perf_counter() - started
    assert took["llama-3.3-405b-instruct"] > took["gpt-oss-120b"], took


def test_error_statuses_surface_as_openai_exceptions(joule_simulator):
    c = client(joule_simulator)
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(messages=HI, model="")
    with pytest.raises(openai.NotFoundError) as not_found:
        c.chat.completions.create(model="gpt-4o", messages=HI)
    assert not_found.value.code == "model_not_found"
    no_key = httpx.post(joule_simulator.base_url + "/chat/completions", json={"model": "auto", "messages": HI})
    assert no_key.status_code == 401
    assert no_key.json()["error"]["code"] == "invalid_api_key"
    joule_simulator.set_energy_budget("jc_small", 1.0)
    small = client(joule_simulator, "jc_small")
    small.chat.completions.create(model="auto", messages=HI)  # the call that crosses the budget is billed
    with pytest.raises(openai.APIStatusError) as refused:
        small.chat.completions.create(model="auto", messages=HI)
    assert refused.value.status_code == 402
    assert refused.value.code == "insufficient_balance"
    assert "x-receipt-id" not in refused.value.response.headers
    with pytest.raises(openai.AuthenticationError):
        c.chat.completions.create(model="auto", messages=HI, extra_headers={"Authorization": ""})


def test_missing_model_is_400():
    with running(seed=3) as sim:
        r = httpx.post(
            sim.base_url + "/chat/completions", json={"messages": HI}, headers={"Authorization": "Bearer jc"}
        )
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "model"


def test_async_client_and_concurrency(joule_simulator):
    async def main() -> list[str]:
        c = openai.AsyncOpenAI(base_url=joule_simulator.base_url, api_key="jc", max_retries=0)
        results = await asyncio.gather(*(c.chat.completions.create(model="auto", messages=HI) for _ in range(20)))
        stream = await c.chat.completions.create(model="auto", messages=HI, stream=True)
        async for _ in stream:
            pass
        return [r.id for r in results]

    ids = asyncio.run(main())
    assert len(set(ids)) == 20
    with ThreadPoolExecutor(8) as pool:
        list(
            pool.map(
                lambda _: client(joule_simulator).chat.completions.create(model="auto", messages=HI),
                range(40),
            )
        )
    receipts = [r.receipt_id for r in joule_simulator.receipts]
    assert len(receipts) == len(set(receipts)) == 61


def test_figures_repeat_under_a_seed_and_receipts_never_repeat():
    def run() -> list[tuple]:
        with running(seed=11) as sim:
            c = client(sim)
            for _ in range(3):
                c.chat.completions.create(model="auto", messages=HI)
            c.embeddings.create(model="auto", input=["a b c"])
            return [(r.receipt_id, r.energy_j, r.region, r.output_tokens) for r in sim.receipts]

    first, second = run(), run()
    assert [r[1:] for r in first] == [r[1:] for r in second]  # the same figures, routing and placement
    receipts = [r[0] for r in first + second]
    assert len(set(receipts)) == 8, "a real service never issues a receipt twice, whatever the seed"
    assert all(re.fullmatch(r"rcpt_[0-9a-f]{20}", r) for r in receipts)


def test_gzip_when_accepted_and_curl_style_requests(joule_simulator):
    body = json.dumps({"model": "auto", "messages": HI}).encode()
    request = urllib.request.Request(
        joule_simulator.base_url + "/chat/completions",
        data=body,
        headers={
            "Authorization": "Bearer jc_test",
            "Content-Type": "application/json",
            "Accept-Encoding": "gzip",
        },
    )
    with urllib.request.urlopen(request) as response:
        assert response.headers["Content-Encoding"] == "gzip"
        payload = json.loads(gzip.decompress(response.read()))
        assert response.headers["X-Receipt-Id"] == joule_simulator.receipts[-1].receipt_id
    assert payload["object"] == "chat.completion"
    receipts = httpx.get(joule_simulator.base_url + "/receipts", headers={"Authorization": "Bearer jc_test"}).json()
    assert receipts["data"][-1]["receipt_id"] == joule_simulator.receipts[-1].receipt_id
    others = httpx.get(joule_simulator.base_url + "/receipts", headers={"Authorization": "Bearer jc_other"}).json()
    assert others["data"] == [] and others["has_more"] is False  # an account sees its own bill only


def test_langchain_chat_openai(joule_simulator):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=joule_simulator.base_url, api_key="jc_test", model="auto", max_retries=0)
    message = llm.invoke("hello from langchain")
    assert message.content
    assert message.response_metadata["model_name"] == joule_simulator.receipts[-1].routed_to
    streamed = "".join(chunk.content for chunk in llm.stream("stream please"))
    assert streamed.strip()


def test_cli_simulate_serves_until_terminated(tmp_path):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "joule_otel._cli",
            "simulate",
            "--port",
            "0",
            "--token-delay",
            "0",
            "--latency",
            "0",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        base_url = line.split()[4]
        assert base_url.startswith("http://127.0.0.1:")
        for _ in range(50):
            try:
                r = httpx.post(
                    base_url + "/chat/completions",
                    json={"model": "auto", "messages": HI},
                    headers={"Authorization": "Bearer jc"},
                )
                break
            except httpx.ConnectError:
                time.sleep(0.1)
        assert r.status_code == 200
        assert r.headers["x-receipt-id"].startswith("rcpt_")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
