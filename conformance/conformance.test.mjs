// Runs the official Durable Streams server conformance suite against a running server.
// DS_BASE_URL: the server's base URL; DS_LONG_POLL_MS: the server's long-poll timeout in ms.
import { runConformanceTests } from "@durable-streams/server-conformance-tests"

const baseUrl = process.env.DS_BASE_URL
if (!baseUrl) throw new Error("set DS_BASE_URL to the server under test, e.g. http://127.0.0.1:4437")

runConformanceTests({
  baseUrl,
  longPollTimeoutMs: Number(process.env.DS_LONG_POLL_MS ?? "500"),
  subscriptions: process.env.DS_SUBSCRIPTIONS === "1",
})
