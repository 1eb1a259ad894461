// Starts the Node reference server (@durable-streams/server) on loopback, for
// interoperability tests and benchmarks. Prints "READY <url>" when listening;
// stops on SIGTERM/SIGINT or when stdin closes.
import { DurableStreamTestServer } from "@durable-streams/server"

const port = Number(process.env.DS_PORT ?? "0")
const longPollTimeout = Number(process.env.DS_LONG_POLL_MS ?? "500")
const server = new DurableStreamTestServer({ port, host: "127.0.0.1", longPollTimeout })
await server.start()
console.log(`READY ${server.url}`)

const stop = async () => {
  await server.stop()
  process.exit(0)
}
process.on("SIGTERM", stop)
process.on("SIGINT", stop)
process.stdin.on("end", stop)
process.stdin.resume()
