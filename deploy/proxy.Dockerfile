# `joule-otel proxy` for the compose stack: apps without OpenTelemetry call the API through it, and every call
# becomes a call event the Collector passes on to `joule-otel collect` (the central ledger).
FROM python:3.12-slim
WORKDIR /src
COPY pyproject.toml README.md CHANGELOG.md ./
COPY joule_otel ./joule_otel
RUN pip install --no-cache-dir '.[collect,otlp]'
EXPOSE 8787
# off loopback, the proxy requires JOULE_OTEL_PROXY_TOKEN (the compose file passes it); clients send it as
# X-Joule-Proxy-Token beside their own Authorization
CMD ["sh", "-c", "exec joule-otel proxy --host 0.0.0.0 --port 8787 --upstream \"${JOULE_UPSTREAM:-https://api.greenjoules.cloud}\""]
