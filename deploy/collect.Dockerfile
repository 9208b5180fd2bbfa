# `joule-otel collect` for the compose stack: the OTLP receiver that owns the central ledger.
FROM python:3.12-slim
WORKDIR /src
COPY pyproject.toml README.md CHANGELOG.md ./
COPY joule_otel ./joule_otel
RUN pip install --no-cache-dir '.[collect,otlp]'
VOLUME /data
EXPOSE 4318
# off loopback, collect requires JOULE_OTEL_COLLECT_TOKEN (the compose file passes it)
CMD ["joule-otel", "collect", "--host", "0.0.0.0", "--port", "4318", "--db", "/data/joule.duckdb"]
