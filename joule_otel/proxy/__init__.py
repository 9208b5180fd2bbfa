"""``joule-otel proxy``: a recording gateway for apps without OpenTelemetry — curl, scripts, Go, PHP, vendor tools.

A client points its base URL at ``http://127.0.0.1:8787/v1`` instead of the upstream's; every request under
``/v1/`` is forwarded unchanged and every inference call lands in the ledger, built by the same code as
``instrument()``'s capture (this process runs it on its own upstream client). Streams pass through chunk by chunk.
Loopback by default; any other address requires ``JOULE_OTEL_PROXY_TOKEN``, which clients send as
``X-Joule-Proxy-Token`` (``Authorization`` belongs to the upstream).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from urllib.parse import urlsplit

from joule_otel.proxy._app import DEFAULT_WORKLOAD, Proxy, ProxyConfig, key_hash, load_key_workloads

__all__ = ["DEFAULT_PORT", "Proxy", "ProxyConfig", "key_hash", "serve"]

DEFAULT_PORT = 8787
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
        import uvicorn
    except ImportError:
        raise ValueError("joule-otel proxy needs its server: pip install 'joule-otel[collect]'") from None
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
    server = uvicorn.Server(
        uvicorn.Config(
            Proxy(config),
            host=host,
            port=port,
            log_level="warning",
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=30,
            proxy_headers=False,  # X-Forwarded-For is the upstream's to read: it goes on unchanged
            server_header=False,  # the upstream's Server and Date go back unchanged
            date_header=False,
        )
    )
    where = joule_otel.stats().get("db_path") or "no ledger (JOULE_OTEL_DB=off)"
    print(f"joule-otel proxy: http://{host}:{port}/v1 → {config.upstream}/v1  →  {where}  (Ctrl-C stops)", flush=True)
    # uvicorn drains in-flight requests on SIGTERM/SIGINT, then raises the signal again for the handler it found:
    # a quiet one, so the rows still in memory are written below and the exit status is 0
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)
    try:
        server.run()
    finally:
        joule_otel.uninstrument()
