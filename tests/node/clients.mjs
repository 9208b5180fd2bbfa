// Real Node clients of Joule Cloud, traced with OpenTelemetry and exported over OTLP to `joule-otel collect`.
//   node clients.mjs BASE_URL openai|ai-sdk      (the OTLP endpoint comes from OTEL_EXPORTER_OTLP_ENDPOINT)
// The undici instrumentation (Node's fetch, which openai v5+ and the AI SDK use) copies Joule's response headers
// onto the HTTP client span; the AI SDK's OpenTelemetry integration adds the GenAI span around it.
import { NodeSDK } from "@opentelemetry/sdk-node";
import { BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor } from "@opentelemetry/sdk-trace";
import { OTLPTraceExporter } from "@opentelemetry/exporter-trace-otlp-proto";
import { UndiciInstrumentation } from "@opentelemetry/instrumentation-undici";

// Joule's response headers, and content-type (it tells joule-otel collect that a response was a stream)
const JOULE_HEADERS = ["x-energy-joules", "x-carbon-mg", "x-routed-to", "x-tier", "x-region", "x-receipt-id", "content-type"];
const [, , baseURL, mode] = process.argv;

const processors = [new BatchSpanProcessor({ exporter: new OTLPTraceExporter() })];
if (process.env.JOULE_DEBUG_SPANS) processors.push(new SimpleSpanProcessor({ exporter: new ConsoleSpanExporter() }));
const sdk = new NodeSDK({
  serviceName: process.env.OTEL_SERVICE_NAME || "node-shop",
  spanProcessors: processors,
  instrumentations: [
    new UndiciInstrumentation({
      headersToSpanAttributes: { requestHeaders: ["x-region"], responseHeaders: JOULE_HEADERS },
    }),
  ],
});
sdk.start();

const messages = [{ role: "user", content: "Where do my joules go?" }];
if (mode === "openai") {
  const { default: OpenAI } = await import("openai");
  const client = new OpenAI({ baseURL, apiKey: "jc_node", maxRetries: 0 });
  await client.chat.completions.create({ model: "auto", messages });
  const stream = await client.chat.completions.create({
    model: "auto",
    messages,
    stream: true,
    stream_options: { include_usage: true },
  });
  for await (const _chunk of stream) {
    // drain
  }
  const pinned = new OpenAI({ baseURL, apiKey: "jc_node", maxRetries: 0, defaultHeaders: { "X-Region": "eu-se" } });
  await pinned.embeddings.create({ model: "auto", input: "joules per token" });
} else {
  const { registerTelemetry, generateText, streamText } = await import("ai");
  const { OpenTelemetry } = await import("@ai-sdk/otel");
  const { createOpenAI } = await import("@ai-sdk/openai");
  registerTelemetry(new OpenTelemetry());
  const provider = createOpenAI({ baseURL, apiKey: "jc_node" });
  await generateText({ model: provider("auto"), prompt: "hi", telemetry: { functionId: "support-bot" } });
  const streamed = streamText({ model: provider("auto"), prompt: "stream", telemetry: { functionId: "support-bot" } });
  for await (const _text of streamed.textStream) {
    // drain
  }
  await generateText({ model: provider.chat("auto"), prompt: "chat route", telemetry: { functionId: "summaries" } });
}
await sdk.shutdown();
