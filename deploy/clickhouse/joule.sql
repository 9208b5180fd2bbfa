-- joule-otel's ledger in ClickHouse, made by the engine from what the Collector's `clickhouse` exporter writes.
-- Run after otel-tables.sql: clickhouse-client --multiquery < otel-tables.sql && clickhouse-client --multiquery < joule.sql
--
--   otel.otel_logs   call events (JOULE_OTEL_CALL_EVENTS=true)  --materialized view, at once-->  otel.joule_calls
--   otel.otel_traces Joule calls as HTTP client spans            --refreshed every minute------>  otel.joule_calls
--   otel.joule_calls settled hours                               --refreshed every 10 minutes-->  otel.joule_calls_hourly
--   otel.joule_hours: the hourly figures over both (the rollup where the rows are gone); the Grafana dashboard's source
--
-- One row per call however often the Collector retries: joule_calls is a ReplacingMergeTree keyed by the receipt id,
-- and every query reads it with FINAL (or through the views below), which is right before the engine's merges run.
-- Retention: joule_calls keeps 90 days (TTL, whole days; `ALTER TABLE otel.joule_calls MODIFY TTL toDate(started_at)
-- + INTERVAL 1 YEAR` keeps a year); joule_calls_hourly keeps its totals for ever, as the DuckDB ledger's rollup does.
-- SQL user-defined functions are global to a server: theirs is the `joule_` prefix.

-- A captured response header's value: a string, a comma-joined list (Node's http) or a JSON array (the
-- exporter's rendering of an array attribute, undici's): its last value.
CREATE FUNCTION IF NOT EXISTS joule_header AS (v) -> trimBoth(
    if(startsWith(v, '['), arrayElement(JSONExtract(v, 'Array(String)'), -1), arrayElement(splitByChar(',', v), -1))
);

-- Text as the ledger keeps it: control characters removed, trimmed, at most 256 characters, empty is NULL.
CREATE FUNCTION IF NOT EXISTS joule_text AS (v) -> nullIf(
    trimBoth(substringUTF8(trimBoth(replaceRegexpAll(v, '[[:cntrl:]]', '')), 1, 256)), ''
);

-- A finite, non-negative decimal no larger than `ceiling`, else NULL (`abc`, `NaN`, `inf`, `1_000`, `-1` are NULL),
-- as joule_otel/_headers.py's parse_quantity reads one.
CREATE FUNCTION IF NOT EXISTS joule_quantity AS (v, ceiling) -> if(
    match(v, '^\\s*[+-]?([0-9]+(\\.[0-9]*)?|\\.[0-9]+)([eE][+-]?[0-9]+)?\\s*$')
        AND toFloat64OrZero(replaceRegexpAll(v, '^\\s+|\\s+$', '')) BETWEEN 0 AND ceiling,
    toFloat64OrNull(replaceRegexpAll(v, '^\\s+|\\s+$', '')) + 0,
    NULL
);

-- The operation of an OpenAI-compatible route (`/v1/chat/completions` -> `chat`), `other` for a path Joule answered
-- that is no known route, '' for known routes that bill nothing (models, files...): those are no calls.
CREATE FUNCTION IF NOT EXISTS joule_operation AS (path) -> if(
    position(splitByChar('?', path)[1], '/v1/') = 0,
    'other',
    arrayElement(
        arrayConcat(
            arrayFilter(
                name -> name != '-',
                arrayMap(
                    (prefix, name) -> if(
                        replaceRegexpOne(arrayElement(splitByString('/v1/', splitByChar('?', path)[1]), -1), '/+$', '')
                            = prefix
                        OR startsWith(
                            arrayElement(splitByString('/v1/', splitByChar('?', path)[1]), -1), concat(prefix, '/')
                        ),
                        name,
                        '-'
                    ),
                    ['chat/completions', 'completions', 'embeddings', 'responses', 'images', 'audio', 'models',
                     'moderations', 'files', 'batches', 'uploads', 'fine_tuning', 'vector_stores', 'assistants',
                     'threads'],
                    ['chat', 'text_completion', 'embeddings', 'responses', 'images', 'audio', '', '', '', '', '', '',
                     '', '', '']
                )
            ),
            ['other']
        ),
        1
    )
);

-- The ledger: the columns of the DuckDB ledger's inference_calls (schema v4), and what makes a call one row.
CREATE TABLE IF NOT EXISTS otel.joule_calls
(
    call_key String COMMENT 'the receipt id, else the trace and span ids, else a hash of the record: one row each',
    receipt_id Nullable(String),
    started_at DateTime64(6, 'UTC'),
    duration_ms Nullable(Float64),
    ttft_ms Nullable(Float64),
    service LowCardinality(Nullable(String)),
    workload LowCardinality(Nullable(String)),
    operation LowCardinality(Nullable(String)),
    server_address LowCardinality(Nullable(String)),
    status_code Nullable(Int32),
    error_type LowCardinality(Nullable(String)),
    requested_model LowCardinality(Nullable(String)),
    routed_to LowCardinality(Nullable(String)),
    tier LowCardinality(Nullable(String)),
    region LowCardinality(Nullable(String)),
    energy_j Nullable(Float64),
    carbon_mg Nullable(Float64),
    input_tokens Nullable(Int64),
    output_tokens Nullable(Int64),
    stream Nullable(Bool),
    trace_id String,
    span_id String,
    provider LowCardinality(Nullable(String)),
    tags Map(LowCardinality(String), String),
    source LowCardinality(String) COMMENT 'call_event, span or export (joule-otel ledger export)',
    version UInt8 COMMENT 'the most complete row of a call wins: 2 complete, 1 a span still without its GenAI parent'
)
ENGINE = ReplacingMergeTree(version)
PARTITION BY toDate(started_at)
ORDER BY (toStartOfHour(started_at), call_key)
TTL toDate(started_at) + INTERVAL 90 DAY
SETTINGS ttl_only_drop_parts = 1;

-- Call events: exactly the row the app would have written (joule_otel/_events.py's attribute names).
-- EventName is written by collector-contrib v0.141.0 and later; older ones leave it empty, and a call event is
-- then known by its `joule.operation` attribute, which only call events carry.
CREATE MATERIALIZED VIEW IF NOT EXISTS otel.joule_calls_from_events TO otel.joule_calls AS
SELECT
    multiIf(
        receipt_id IS NOT NULL, receipt_id,
        SpanId != '', concat(TraceId, '/', SpanId),
        hex(sipHash128(Timestamp, LogAttributes))
    ) AS call_key,
    if(length(LogAttributes['joule.receipt_id']) BETWEEN 1 AND 256, LogAttributes['joule.receipt_id'], NULL)
        AS receipt_id,
    toDateTime64(Timestamp, 6, 'UTC') AS started_at,
    joule_quantity(LogAttributes['joule.duration_ms'], 86400000) AS duration_ms,
    joule_quantity(LogAttributes['joule.ttft_ms'], 86400000) AS ttft_ms,
    coalesce(joule_text(LogAttributes['service.name']), joule_text(ServiceName)) AS service,
    coalesce(joule_text(LogAttributes['joule.workload']), service) AS workload,
    joule_text(LogAttributes['joule.operation']) AS operation,
    joule_text(LogAttributes['server.address']) AS server_address,
    if(toInt32OrZero(LogAttributes['http.response.status_code']) BETWEEN 100 AND 599,
       toInt32OrNull(LogAttributes['http.response.status_code']), NULL) AS status_code,
    joule_text(LogAttributes['error.type']) AS error_type,
    joule_text(LogAttributes['gen_ai.request.model']) AS requested_model,
    joule_text(LogAttributes['gen_ai.response.model']) AS routed_to,
    lower(joule_text(LogAttributes['joule.tier'])) AS tier,
    lower(joule_text(LogAttributes['joule.region'])) AS region,
    joule_quantity(LogAttributes['joule.energy'], 1e7) AS energy_j,
    joule_quantity(LogAttributes['joule.carbon'], 1e7) AS carbon_mg,
    toInt64OrNull(LogAttributes['gen_ai.usage.input_tokens']) AS input_tokens,
    toInt64OrNull(LogAttributes['gen_ai.usage.output_tokens']) AS output_tokens,
    multiIf(LogAttributes['joule.stream'] = 'true', true, LogAttributes['joule.stream'] = 'false', false, NULL) AS stream,
    TraceId AS trace_id,
    SpanId AS span_id,
    joule_text(LogAttributes['gen_ai.provider.name']) AS provider,
    mapUpdate(
        mapApply((k, v) -> (substring(k, 11), v), mapFilter((k, v) -> startsWith(k, 'joule.tag.'), ResourceAttributes)),
        mapApply((k, v) -> (substring(k, 11), v), mapFilter((k, v) -> startsWith(k, 'joule.tag.'), LogAttributes))
    ) AS tags,
    'call_event' AS source,
    2 AS version
FROM otel.otel_logs
WHERE EventName = 'joule.inference.call' OR (EventName = '' AND mapContains(LogAttributes, 'joule.operation'));

-- Other languages' HTTP client spans that carry Joule's response headers (`headersToSpanAttributes` in Node,
-- OTEL_INSTRUMENTATION_HTTP_CLIENT_CAPTURE_RESPONSE_HEADERS in Java), as `joule-otel collect` reads them.
CREATE VIEW IF NOT EXISTS otel.joule_call_spans AS
SELECT
    Timestamp, TraceId, SpanId, ParentSpanId, Duration, ResourceAttributes, SpanAttributes, ServiceName,
    SpanAttributes['http.response.header.x-receipt-id'] AS h_receipt,
    coalesce(
        nullIf(SpanAttributes['url.path'], ''),
        nullIf(SpanAttributes['http.target'], ''),
        path(coalesce(nullIf(SpanAttributes['url.full'], ''), SpanAttributes['http.url']))
    ) AS url_path,
    coalesce(
        nullIf(SpanAttributes['server.address'], ''),
        nullIf(SpanAttributes['net.peer.name'], ''),
        nullIf(SpanAttributes['http.host'], ''),
        domain(coalesce(nullIf(SpanAttributes['url.full'], ''), SpanAttributes['http.url']))
    ) AS host
FROM otel.otel_traces
WHERE SpanKind IN ('Client', 'SPAN_KIND_CLIENT')
  AND (mapContains(SpanAttributes, 'http.response.header.x-energy-joules')
       OR mapContains(SpanAttributes, 'http.response.header.x-carbon-mg')
       OR mapContains(SpanAttributes, 'http.response.header.x-routed-to')
       OR mapContains(SpanAttributes, 'http.response.header.x-tier')
       OR mapContains(SpanAttributes, 'http.response.header.x-receipt-id'));

-- GenAI spans: the AI SDK's doGenerate/doStream, or any span with gen_ai.* request or usage attributes.
CREATE VIEW IF NOT EXISTS otel.joule_genai_spans AS
SELECT TraceId, SpanId, ParentSpanId, SpanName, SpanAttributes, Timestamp
FROM otel.otel_traces
WHERE startsWith(SpanName, 'ai.')
   OR mapContains(SpanAttributes, 'gen_ai.usage.input_tokens')
   OR mapContains(SpanAttributes, 'gen_ai.request.model')
   OR mapContains(SpanAttributes, 'ai.usage.inputTokens')
   OR mapContains(SpanAttributes, 'ai.usage.promptTokens');

-- The spans above a GenAI span, with the name each gives the work under it (AI SDK 7's invoke_agent span has
-- gen_ai.agent.name two spans above its "chat" span; older ones put ai.telemetry.functionId on the span itself).
CREATE VIEW IF NOT EXISTS otel.joule_named_spans AS
SELECT
    TraceId,
    SpanId,
    ParentSpanId,
    coalesce(
        joule_text(SpanAttributes['gen_ai.agent.name']),
        joule_text(SpanAttributes['ai.telemetry.functionId']),
        joule_text(SpanAttributes['joule.workload'])
    ) AS name
FROM otel.otel_traces
WHERE Timestamp >= now() - INTERVAL 7 HOUR;

-- The row of a call span, with its GenAI parent's facts (tokens, requested model, stream, time to first chunk)
-- when the parent is in the table, as joule_otel/collect/_spans.py's span_row makes it.
CREATE VIEW IF NOT EXISTS otel.joule_span_rows AS
SELECT
    multiIf(
        receipt_id IS NOT NULL, receipt_id,
        concat(TraceId, '/', SpanId)
    ) AS call_key,
    if(length(joule_header(h_receipt)) BETWEEN 1 AND 256, joule_header(h_receipt), NULL) AS receipt_id,
    toDateTime64(Timestamp, 6, 'UTC') AS started_at,
    if(Duration <= 86400000000000, Duration / 1e6, NULL) AS duration_ms,
    p_ttft_ms AS ttft_ms,
    joule_text(ResourceAttributes['service.name']) AS service,
    coalesce(
        joule_text(SpanAttributes['joule.workload']),
        joule_text(ResourceAttributes['joule.workload']),
        joule_text(p_attributes['joule.workload']),
        joule_text(p_attributes['ai.telemetry.functionId']),
        a1_name, a2_name, a3_name,
        service  -- a call nothing names is its service's, as in the DuckDB ledger
    ) AS workload,
    joule_operation(url_path) AS operation,
    joule_text(host) AS server_address,
    if(toInt32OrZero(coalesce(nullIf(SpanAttributes['http.response.status_code'], ''),
                              SpanAttributes['http.status_code'])) BETWEEN 100 AND 599,
       toInt32OrNull(coalesce(nullIf(SpanAttributes['http.response.status_code'], ''),
                              SpanAttributes['http.status_code'])), NULL) AS status_code,
    multiIf(
        status_code = 402, 'insufficient_balance',
        status_code >= 400, toString(status_code),
        joule_text(SpanAttributes['error.type'])
    ) AS error_type,
    coalesce(joule_text(p_attributes['gen_ai.request.model']), joule_text(p_attributes['ai.model.id']))
        AS requested_model,
    joule_text(joule_header(SpanAttributes['http.response.header.x-routed-to'])) AS routed_to,
    lower(joule_text(joule_header(SpanAttributes['http.response.header.x-tier']))) AS tier,
    lower(joule_text(coalesce(
        nullIf(joule_header(SpanAttributes['http.response.header.x-region']), ''),
        joule_header(SpanAttributes['http.request.header.x-region'])
    ))) AS region,
    joule_quantity(joule_header(SpanAttributes['http.response.header.x-energy-joules']), 1e7) AS energy_j,
    joule_quantity(joule_header(SpanAttributes['http.response.header.x-carbon-mg']), 1e7) AS carbon_mg,
    coalesce(toInt64OrNull(p_attributes['gen_ai.usage.input_tokens']), toInt64OrNull(p_attributes['ai.usage.inputTokens']),
             toInt64OrNull(p_attributes['ai.usage.promptTokens'])) AS input_tokens,
    coalesce(toInt64OrNull(p_attributes['gen_ai.usage.output_tokens']), toInt64OrNull(p_attributes['ai.usage.outputTokens']),
             toInt64OrNull(p_attributes['ai.usage.completionTokens'])) AS output_tokens,
    multiIf(
        mapContains(SpanAttributes, 'http.response.header.content-type'),
            startsWith(lower(joule_header(SpanAttributes['http.response.header.content-type'])), 'text/event-stream'),
        p_name LIKE '%doStream%' OR p_name LIKE '%streamText%', true,
        NULL
    ) AS stream,
    TraceId AS trace_id,
    SpanId AS span_id,
    'joule_cloud' AS provider,
    mapUpdate(
        mapApply((k, v) -> (substring(k, 11), v), mapFilter((k, v) -> startsWith(k, 'joule.tag.'), ResourceAttributes)),
        mapApply((k, v) -> (substring(k, 11), v), mapFilter((k, v) -> startsWith(k, 'joule.tag.'), SpanAttributes))
    ) AS tags,
    'span' AS source,
    if(p_name = '', 1, 2) AS version
FROM
(
    SELECT
        c.Timestamp AS Timestamp, c.TraceId AS TraceId, c.SpanId AS SpanId, c.Duration AS Duration,
        c.ResourceAttributes AS ResourceAttributes, c.SpanAttributes AS SpanAttributes, c.h_receipt AS h_receipt,
        c.url_path AS url_path, c.host AS host,
        p_name, p_attributes, p_ttft_ms, a1.name AS a1_name, a2.name AS a2_name, a3.name AS a3_name
    FROM (SELECT * FROM otel.joule_call_spans WHERE Timestamp >= now() - INTERVAL 6 HOUR) AS c
    LEFT JOIN (
        SELECT TraceId AS p_trace, SpanId AS p_span, ParentSpanId AS p_parent, SpanName AS p_name,
               SpanAttributes AS p_attributes,
               joule_quantity(SpanAttributes['ai.response.msToFirstChunk'], 86400000) AS p_ttft_ms
        FROM otel.joule_genai_spans
        WHERE Timestamp >= now() - INTERVAL 7 HOUR
    ) AS p ON p.p_trace = c.TraceId AND p.p_span = c.ParentSpanId
    -- the name of the work above the parent, up to three spans up
    LEFT JOIN otel.joule_named_spans AS a1 ON a1.TraceId = c.TraceId AND a1.SpanId = p.p_parent
    LEFT JOIN otel.joule_named_spans AS a2 ON a2.TraceId = c.TraceId AND a2.SpanId = a1.ParentSpanId
    LEFT JOIN otel.joule_named_spans AS a3 ON a3.TraceId = c.TraceId AND a3.SpanId = a2.ParentSpanId
)
WHERE joule_operation(url_path) != ''
SETTINGS join_use_nulls = 0;

-- Span calls reach joule_calls within a minute. A materialized view sees one insert at a time, and a span's GenAI
-- parent ends after it and often arrives in a later batch, which that view could not join: so this refresh reads
-- the table instead, every minute, over the calls of the last 6 hours, and writes each call that is new or has
-- gained its parent since (version 2 replaces version 1). Not joined: a parent that arrives more than 6 hours after
-- its call (the call keeps its energy, carbon, model and receipt; its tokens stay empty), and an agent's name more
-- than three spans above the parent (`joule-otel collect` looks up to 6 spans up; this SQL, 3).
CREATE MATERIALIZED VIEW IF NOT EXISTS otel.joule_calls_from_spans
REFRESH EVERY 1 MINUTE APPEND TO otel.joule_calls AS
SELECT *
FROM otel.joule_span_rows
WHERE started_at >= now() - INTERVAL 6 HOUR
  AND (call_key, version) NOT IN (
      SELECT call_key, version FROM otel.joule_calls WHERE started_at >= now() - INTERVAL 6 HOUR
  );

-- Hourly totals of settled hours (two days old: what arrives later than that counts while its rows are kept), each
-- hour written once; they outlive the rows, so long ranges still add up after the TTL has removed them.
CREATE TABLE IF NOT EXISTS otel.joule_calls_hourly
(
    hour DateTime('UTC'),
    service LowCardinality(Nullable(String)),
    provider LowCardinality(Nullable(String)),
    workload LowCardinality(Nullable(String)),
    operation LowCardinality(Nullable(String)),
    requested_model LowCardinality(Nullable(String)),
    routed_to LowCardinality(Nullable(String)),
    region LowCardinality(Nullable(String)),
    tier LowCardinality(Nullable(String)),
    status_code Nullable(Int32),
    error_type LowCardinality(Nullable(String)),
    stream Nullable(Bool),
    calls UInt64,
    energy_j Float64,
    energy_calls UInt64,
    carbon_mg Float64,
    input_tokens Int64,
    output_tokens Int64
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY hour;

-- The hourly figures of the rows kept, one row per hour and group, as the DuckDB ledger's rollup groups them.
CREATE VIEW IF NOT EXISTS otel.joule_calls_by_hour AS
SELECT
    toStartOfHour(started_at) AS hour,
    service, provider, workload, operation, requested_model, routed_to, region, tier, status_code, error_type, stream,
    count() AS calls,
    sum(coalesce(c.energy_j, 0)) AS energy_j,
    count(c.energy_j) AS energy_calls,
    sum(coalesce(c.carbon_mg, 0)) AS carbon_mg,
    sum(coalesce(c.input_tokens, 0)) AS input_tokens,
    sum(coalesce(c.output_tokens, 0)) AS output_tokens
FROM otel.joule_calls AS c FINAL
GROUP BY hour, service, provider, workload, operation, requested_model, routed_to, region, tier, status_code,
         error_type, stream;

CREATE MATERIALIZED VIEW IF NOT EXISTS otel.joule_calls_hourly_refresh
REFRESH EVERY 10 MINUTE APPEND TO otel.joule_calls_hourly AS
SELECT *
FROM otel.joule_calls_by_hour
WHERE hour >= (SELECT max(hour) + INTERVAL 1 HOUR FROM otel.joule_calls_hourly)
  AND hour < toStartOfHour(now() - INTERVAL 2 DAY);

-- Every hour's figures: from the rows while they are kept, from the totals for the days the TTL has removed.
CREATE VIEW IF NOT EXISTS otel.joule_hours AS
SELECT *, false AS from_totals
FROM otel.joule_calls_by_hour
UNION ALL
SELECT *, true AS from_totals
FROM otel.joule_calls_hourly
WHERE hour < (SELECT if(count() = 0, toDateTime('2106-01-01 00:00:00', 'UTC'), toStartOfHour(min(started_at)))
              FROM otel.joule_calls);

-- The calls themselves, one row each (for the receipts panel and your own queries).
CREATE VIEW IF NOT EXISTS otel.joule_calls_final AS
SELECT * EXCEPT (call_key, version) FROM otel.joule_calls FINAL;
