"""``joule-otel proxy``: a recording gateway for apps without OpenTelemetry — curl, scripts, Go, PHP, vendor tools.

A client points its base URL at ``http://127.0.0.1:8787/v1`` instead of the upstream's; every request under
``/v1/`` is forwarded unchanged and every inference call lands in the ledger, built by the same code as
``instrument()``'s capture (this process runs it on its own upstream client). Streams pass through chunk by chunk.
Loopback by default; any other address requires ``JOULE_OTEL_PROXY_TOKEN``, which clients send as
``X-Joule-Proxy-Token`` (``Authorization`` belongs to the upstream).
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Coroutine
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from joule_otel.proxy._app import DEFAULT_WORKLOAD, Proxy, ProxyConfig, key_hash, load_key_workloads
from joule_otel.proxy._server import HttpServer

__all__ = ["DEFAULT_PORT", "HttpServer", "Proxy", "ProxyConfig", "key_hash", "serve"]

DEFAULT_PORT = 8787
DRAIN_S = 30.0
"""How long requests under way may take to finish after SIGTERM before the proxy stops anyway."""
JOULE_OTEL_PROXY_TOKEN = "JOULE_OTEL_PROXY_TOKEN"


def serve(
    *,
    upstream: str,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    db: Path | None = None,
    workload: str | None = None,
    workloads_file: str | None = None,
    api_key_env: str | None = None,
) -> None:
    """Serve until SIGTERM or Ctrl-C, then let in-flight requests finish and write every row.

    Raises:
        ValueError: an upstream that is not an http(s) URL, an address off loopback without
            ``JOULE_OTEL_PROXY_TOKEN``, ``api_key_env`` without the token or naming an unset variable, a taken
            port, a workloads file that cannot be read, or the server's dependencies missing.
    """
    from joule_otel.collect._server import is_loopback

    parts = urlsplit(upstream)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--upstream must be an http(s) URL such as https://api.greenjoules.cloud, not {upstream!r}")
    token = os.environ.get(JOULE_OTEL_PROXY_TOKEN, "").strip() or None
    if not is_loopback(host) and token is None:
        raise ValueError(
            f"listening on {host} (not loopback) needs a token: set {JOULE_OTEL_PROXY_TOKEN}, and have clients send "
            "it as X-Joule-Proxy-Token"
        )
    api_key = None
    if api_key_env:
        if token is None:
            raise ValueError(f"--api-key-env lends the proxy's key to clients: it needs {JOULE_OTEL_PROXY_TOKEN} too")
        api_key = os.environ.get(api_key_env, "").strip() or None
        if api_key is None:
            raise ValueError(f"--api-key-env {api_key_env}: that environment variable is not set")
    from joule_otel._terminal import port_taken

    if port_taken(host, port):
        raise ValueError(f"port {port} on {host} is already in use; pass another with --port")
    try:
        import httptools  # noqa: F401
    except ImportError:
        raise ValueError("joule-otel proxy needs its HTTP parser: pip install 'joule-otel[collect]'") from None
    config = ProxyConfig(
        upstream=upstream.removesuffix("/").removesuffix("/v1"),
        token=token,
        workload=workload or DEFAULT_WORKLOAD,
        key_workloads=load_key_workloads(workloads_file) if workloads_file else {},
        api_key=api_key,
    )
    import joule_otel

    os.environ.setdefault("OTEL_SERVICE_NAME", "joule-otel-proxy")
    joule_otel.instrument(db=db) if db is not None else joule_otel.instrument()
    where = joule_otel.stats().get("db_path") or "no ledger (JOULE_OTEL_DB=off)"
    try:
        _run(_serve(Proxy(config), host, port, f"{config.upstream}/v1  →  {where}"))
    finally:
        joule_otel.uninstrument()  # the rows of the calls drained are written before the process ends


async def _serve(proxy: Proxy, host: str, port: int, where: str) -> None:
    """Serve until SIGTERM or SIGINT, then let the requests under way finish (their rows are then in capture)."""
    server = HttpServer(proxy.handle, max_body_bytes=proxy.config.max_body_bytes)
    bound = await server.start(host, port)
    print(f"joule-otel proxy: http://{host}:{bound}/v1 → {where}  (Ctrl-C stops)", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
        await server.shutdown(DRAIN_S)
    finally:
        proxy.close()


def _run(main: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop where it is installed (as the collector's uvicorn does), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)
