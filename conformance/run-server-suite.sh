#!/usr/bin/env bash
# Runs the official server conformance suite against our server.
# Usage: conformance/run-server-suite.sh memory|sqlite|memory-auth [extra vitest args]
# `memory` also runs the memory-auth pass after it (the server with --auth, the suite's
# requests carrying an admin token minted by our CLI); DS_AUTH=0 leaves it out.
# Needs: the project installed in .venv (or PYTHON set), `npm ci` done in conformance/.
set -euo pipefail
backend="${1:-memory}"; shift || true
here="$(cd "$(dirname "$0")" && pwd)"
python="${PYTHON:-$here/../.venv/bin/python}"
long_poll_ms=500
# The suite's optional subscription tests (docs/subscriptions.md); DS_SUBSCRIPTIONS=0 skips them.
export DS_SUBSCRIPTIONS="${DS_SUBSCRIPTIONS:-1}"

run_pass() {  # run_pass memory|sqlite|memory-auth [vitest args]
  local pass="$1"; shift
  local workdir server_pid url token=""
  workdir="$(mktemp -d)"
  local args=(--host 127.0.0.1 --port 0 --long-poll-timeout 0.5)
  [ "$pass" = sqlite ] && args+=(--data-dir "$workdir/data")
  [ "$DS_SUBSCRIPTIONS" = 1 ] && args+=(--subscriptions)
  if [ "$pass" = memory-auth ]; then
    head -c 48 /dev/urandom | base64 >"$workdir/secret"
    args+=(--auth --auth-secret-file "$workdir/secret")
    token="$("$python" -m mock_server token --secret-file "$workdir/secret" --stream '*' \
      --can admin --sub conformance --ttl 2h)"
  fi
  "$python" -m mock_server "${args[@]}" >"$workdir/server.log" 2>&1 &
  server_pid=$!
  # shellcheck disable=SC2064  # expand now: the trap outlives these locals
  trap "kill $server_pid 2>/dev/null || true; wait $server_pid 2>/dev/null || true; rm -rf '$workdir'" EXIT
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
  echo "conformance: $pass backend at $url"
  local status=0
  (cd "$here" && DS_BASE_URL="$url" DS_LONG_POLL_MS="$long_poll_ms" DS_TOKEN="$token" \
    npx vitest run --config vitest.config.mjs "$@") || status=$?
  kill -0 "$server_pid" 2>/dev/null || { echo "the server died during the suite:"; cat "$workdir/server.log"; exit 1; }
  kill "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
  rm -rf "$workdir"
  trap - EXIT
  return "$status"
}

failed=0
run_pass "$backend" "$@" || failed=1
if [ "$backend" = memory ] && [ "${DS_AUTH:-1}" = 1 ]; then
  run_pass memory-auth "$@" || failed=1
fi
exit "$failed"
