#!/usr/bin/env bash
# Runs the official server conformance suite against our server.
# Usage: conformance/run-server-suite.sh memory|sqlite [extra vitest args]
# Needs: the project installed in .venv (or PYTHON set), `npm ci` done in conformance/.
set -euo pipefail
backend="${1:-memory}"; shift || true
here="$(cd "$(dirname "$0")" && pwd)"
python="${PYTHON:-$here/../.venv/bin/python}"
long_poll_ms=500
workdir="$(mktemp -d)"
args=(--host 127.0.0.1 --port 0 --long-poll-timeout 0.5)
[ "$backend" = sqlite ] && args+=(--data-dir "$workdir/data")
# The suite's optional subscription tests (docs/subscriptions.md); DS_SUBSCRIPTIONS=0 skips them.
export DS_SUBSCRIPTIONS="${DS_SUBSCRIPTIONS:-1}"
[ "$DS_SUBSCRIPTIONS" = 1 ] && args+=(--subscriptions)
"$python" -m mock_server "${args[@]}" >"$workdir/server.log" 2>&1 &
server_pid=$!
cleanup() { kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; rm -rf "$workdir"; }
trap cleanup EXIT
url=""
for _ in $(seq 1 100); do
  url="$(grep -oE 'http://127\.0\.0\.1:[0-9]+' "$workdir/server.log" | head -n1 || true)"
  [ -n "$url" ] && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$workdir/server.log"; exit 1; }
  sleep 0.1
done
[ -n "$url" ] || { echo "server did not start"; cat "$workdir/server.log"; exit 1; }
# The banner comes before the first accept: wait until /health answers.
"$python" - "$url" <<'PY' || { echo "server not healthy"; cat "$workdir/server.log"; exit 1; }
import sys, time, urllib.request
deadline = time.monotonic() + 20
while True:
    try:
        urllib.request.urlopen(sys.argv[1] + "/health", timeout=2).read()
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.05)
PY
echo "conformance: $backend backend at $url"
cd "$here"
DS_BASE_URL="$url" DS_LONG_POLL_MS="$long_poll_ms" npx vitest run --config vitest.config.mjs "$@"
kill -0 "$server_pid" 2>/dev/null || { echo "the server died during the suite:"; cat "$workdir/server.log"; exit 1; }
