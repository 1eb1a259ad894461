// Runs the official Durable Streams server conformance suite against a running server.
// DS_BASE_URL: the server's base URL; DS_LONG_POLL_MS: the server's long-poll timeout in ms.
// DS_TOKEN: a bearer token for a server with --auth. The suite cannot send headers of its
// own (runConformanceTests takes no such option), so every request of the test process
// goes through a fetch that adds `Authorization: Bearer $DS_TOKEN` when it has none.

const baseUrl = process.env.DS_BASE_URL
if (!baseUrl) throw new Error("set DS_BASE_URL to the server under test, e.g. http://127.0.0.1:4437")

const token = process.env.DS_TOKEN
if (token) {
  const plainFetch = globalThis.fetch
  globalThis.fetch = (input, init = {}) => {
    const request = new Request(input, init)
    if (request.url.startsWith(baseUrl) && !request.headers.has("authorization")) {
      request.headers.set("authorization", `Bearer ${token}`)
    }
    return plainFetch(request)
  }
}

// Imported after the wrap, so the suite and its client see the wrapped fetch.
const { runConformanceTests } = await import("@durable-streams/server-conformance-tests")

runConformanceTests({
  baseUrl,
  longPollTimeoutMs: Number(process.env.DS_LONG_POLL_MS ?? "500"),
  subscriptions: process.env.DS_SUBSCRIPTIONS === "1",
})
