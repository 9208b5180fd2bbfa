"""What `joule-otel proxy` adds to a call, beside the gateways users already run, measured side by side in one run.

The upstream is the simulator in a process of its own (no latency, no token delay). Each gateway forwards to it:
joule-otel's proxy (recording every call to a ledger), LiteLLM's proxy and Portkey's gateway when they are
installed. The load generator is a raw HTTP/1.1 client on keep-alive sockets in its own process, the same for every
path, sending at a fixed rate (open loop) for each of 1, 50 and 500 requests a second; calls to the upstream directly
and through each gateway take turns, so the machine's noise falls on all alike. The figure is the added latency:
a percentile through a gateway minus the same percentile direct.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from joule_otel._dedupe import RECENT_CALLS

LOADGEN = r"""
import asyncio, json, sys, time

host, port, prefix, rate, count, stream, extra = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4]), int(sys.argv[5]), sys.argv[6] == "1", json.loads(sys.argv[7])
body = json.dumps({"model": "auto", "messages": [{"role": "user", "content": "hi"}], "stream": stream}).encode()
head = (f"POST {prefix}/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer jc_bench\r\n"
        "Content-Type: application/json\r\n" + "".join(f"{k}: {v}\r\n" for k, v in extra.items()) +
        f"Content-Length: {len(body)}\r\n\r\n").encode()
request = head + body

async def one(pool):
    reader, writer = pool.pop() if pool else await asyncio.open_connection(host, port)
    t0 = time.perf_counter()
    writer.write(request)
    await writer.drain()
    status = await reader.readline()
    first = None
    headers = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        k, _, v = line.decode().partition(":")
        headers[k.strip().lower()] = v.strip()
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
        first = time.perf_counter()
    else:  # chunked: the first chunk, then the rest
        while True:
            size = int((await reader.readline()).strip() or b"0", 16)
            data = await reader.readexactly(size + 2)
            if first is None and size:
                first = time.perf_counter()
            if size == 0:
                break
    done = time.perf_counter()
    pool.append((reader, writer))
    return (done - t0) * 1000, ((first or done) - t0) * 1000, int(status.split()[1])

async def closed(concurrency):
    pool, results = [], []
    async def worker(n):
        for _ in range(n):
            results.append(await one(pool))
    share = count // concurrency
    await asyncio.gather(*(worker(share) for _ in range(concurrency)))
    return results

async def main():
    if rate <= 0:  # a closed loop: a few connections, each sending as soon as its answer is in
        print(json.dumps(await closed(16)))
        return
    pool, tasks = [], []
    start = time.perf_counter()
    for i in range(count):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(pool)))
    results = await asyncio.gather(*tasks)
    print(json.dumps(results))

asyncio.run(main())
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(port: int, what: str, proc: subprocess.Popen[str], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited: {proc.stderr.read() if proc.stderr else ''}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not start")


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _load(port: int, prefix: str, rate: float, count: int, stream: bool, extra: dict[str, str]) -> list[list[float]]:
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            LOADGEN,
            "127.0.0.1",
            str(port),
            prefix,
            str(rate),
            str(count),
            "1" if stream else "0",
            json.dumps(extra),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the load generator failed on :{port}{prefix}: {done.stderr[-1500:]}")
    results: list[list[float]] = json.loads(done.stdout)
    bad = [r for r in results if r[2] != 200]
    if bad:
        raise RuntimeError(f"{len(bad)} of {len(results)} calls answered {bad[0][2]}")
    return results


def _gateways(upstream_port: int, tmp: Path) -> dict[str, tuple[subprocess.Popen[str], int, str, dict[str, str]]]:
    """Every gateway installed here: name → (process, port, path prefix, extra request headers)."""
    found: dict[str, tuple[subprocess.Popen[str], int, str, dict[str, str]]] = {}
    upstream = f"http://127.0.0.1:{upstream_port}"
    port = _free_port()
    env = dict(os.environ, JOULE_OTEL_DB=str(tmp / "proxy.duckdb"), OTEL_SDK_DISABLED="false")
    proc = subprocess.Popen(
        [sys.executable, "-m", "joule_otel._cli", "proxy", "--upstream", upstream, "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait(port, "joule-otel proxy", proc)
    found["joule-otel proxy"] = (proc, port, "/v1", {})
    # LiteLLM's proxy needs its `proxy` extra, whose packages may not install beside joule-otel's: LITELLM_BIN names
    # a litellm of its own venv (python3 -m venv /tmp/llvenv && /tmp/llvenv/bin/pip install 'litellm[proxy]')
    litellm = os.environ.get("LITELLM_BIN") or shutil.which("litellm", path="/tmp/llvenv/bin")
    if litellm:
        port = _free_port()
        config = tmp / "litellm.yaml"
        config.write_text(
            "model_list:\n  - model_name: auto\n    litellm_params:\n      model: openai/auto\n"
            f"      api_base: {upstream}/v1\n      api_key: jc_bench\n"
            "litellm_settings:\n  telemetry: false\n  drop_params: true\n"
        )
        proc = subprocess.Popen(
            [litellm, "--config", str(config), "--port", str(port), "--num_workers", "1"],
            env=dict(os.environ, LITELLM_LOG="ERROR"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            _wait(port, "LiteLLM proxy", proc, 120)
            found["LiteLLM proxy"] = (proc, port, "/v1", {})
        except RuntimeError as exc:
            print(f"LiteLLM proxy skipped: {exc}", file=sys.stderr)
            proc.kill()
    gateway = Path(
        os.environ.get("PORTKEY_GATEWAY", "/tmp/portkey/node_modules/@portkey-ai/gateway/build/start-server.js")
    )
    if gateway.exists() and shutil.which("node"):
        port = _free_port()
        proc = subprocess.Popen(
            ["node", str(gateway), f"--port={port}", "--headless"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            _wait(port, "Portkey gateway", proc, 60)
            headers = {"x-portkey-provider": "openai", "x-portkey-custom-host": f"{upstream}/v1"}
            found["Portkey gateway"] = (proc, port, "/v1", headers)
        except RuntimeError as exc:
            print(f"Portkey gateway skipped: {exc}", file=sys.stderr)
            proc.kill()
    return found


def proxy_overhead(rates: list[float], seconds: float, memory_calls: int) -> list[list[dict[str, object]]]:
    """Added latency per gateway, rate and kind of call; and joule-otel's proxy's memory over many calls."""
    import psutil

    tmp = Path(tempfile.mkdtemp(prefix="joule-otel-bench-proxy-"))
    upstream_port = _free_port()
    sim = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "joule_otel._cli",
            "simulate",
            "--port",
            str(upstream_port),
            "--latency",
            "0",
            "--token-delay",
            "0",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    gateways: dict[str, tuple[subprocess.Popen[str], int, str, dict[str, str]]] = {}
    rows: list[dict[str, object]] = []
    memory: list[dict[str, object]] = []
    try:
        _wait(upstream_port, "simulator", sim)
        gateways = _gateways(upstream_port, tmp)
        for _, port, prefix, extra in gateways.values():  # warm every path up
            _load(port, prefix, 50, 50, False, extra)
        _load(upstream_port, "/v1", 50, 50, False, {})
        failed: dict[tuple[str, bool], str] = {}
        for stream in (False, True):
            for rate in rates:
                count = max(int(rate * seconds), 30)
                direct: list[list[float]] = []
                through: dict[str, list[list[float]]] = {name: [] for name in gateways}
                for _ in range(2):  # in turns: direct, then each gateway, twice
                    direct += _load(upstream_port, "/v1", rate, count // 2, stream, {})
                    for name, (_, port, prefix, extra) in gateways.items():
                        if (name, stream) in failed:
                            continue
                        try:
                            through[name] += _load(port, prefix, rate, count // 2, stream, extra)
                        except RuntimeError as exc:  # a gateway that cannot do this job here: said, not measured
                            failed[(name, stream)] = str(exc).splitlines()[0][:120]
                column = 1 if stream else 0  # a stream: its first chunk; a plain call: the whole answer
                base = [r[column] for r in direct]
                for name, found in through.items():
                    row: dict[str, object] = {
                        "gateway": name,
                        "call": "stream, first chunk" if stream else "plain",
                        "req/s": rate,
                        "calls": len(found),
                        "direct p50 ms": _pct(base, 0.5),
                    }
                    if (name, stream) in failed:
                        row.update({"added p50 ms": None, "added p99 ms": "failed: " + failed[(name, stream)]})
                    else:
                        values = [r[column] for r in found]
                        row["added p50 ms"] = _pct(values, 0.5) - _pct(base, 0.5)
                        row["added p99 ms"] = _pct(values, 0.99) - _pct(base, 0.99)
                    rows.append(row)
        proc, port, prefix, extra = gateways["joule-otel proxy"]
        process = psutil.Process(proc.pid)
        # past start-up (imports, pools, the first segments) and past the dedupe window's filling: what grows after
        # that is what would grow forever
        _load(port, prefix, 0, RECENT_CALLS + 5_000, False, extra)
        before = process.memory_info().rss
        sent = 0
        while sent < memory_calls:
            batch = min(20_000, memory_calls - sent)
            _load(port, prefix, 0, batch, False, extra)
            sent += batch
        after = process.memory_info().rss
        memory.append(
            {
                "warm-up calls": f"{RECENT_CALLS + 5_000:,}",
                "calls after warm-up": f"{memory_calls:,}",
                "RSS before MB": before / 2**20,
                "RSS after MB": after / 2**20,
                "growth MB": (after - before) / 2**20,
            }
        )
    finally:
        for proc, *_ in gateways.values():
            proc.send_signal(signal.SIGTERM)
        for proc, *_ in gateways.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        sim.terminate()
        sim.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)
    return [rows, memory]
