#!/usr/bin/env bash
# The browser test (browser_test.mjs): the page at `/` driven in headless Chromium against the
# server on its embedded model. Installs Debian's chromium if it is missing, and playwright-core
# (which downloads no browser) from package-lock.json.
# Usage: bash tools/browser-test/run.sh [path/to/controlnet-serve]   (default: the debug build)
# Screenshots and the server's log go to $BROWSER_TEST_OUT (default: a new temporary folder).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
bin="${1:-$root/target/debug/controlnet-serve}"
[ -x "$bin" ] || { echo "no server binary at $bin (build it first)" >&2; exit 2; }

if [ ! -x /usr/lib/chromium/chromium ] && ! command -v chromium >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
fi
echo "node $(node --version), $(/usr/lib/chromium/chromium --version 2>/dev/null || chromium --version)"
(cd "$here" && npm ci --no-audit --no-fund --loglevel=error)

out="${BROWSER_TEST_OUT:-$(mktemp -d "${TMPDIR:-/tmp}/browser-test.XXXXXX")}"
mkdir -p "$out"
servers=()
stop() {
    for pid in "${servers[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${servers[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap stop EXIT

# start_server LOG [FLAGS...]: the embedded model and the default adapters, on a free port;
# sets $url from its first stdout line.
start_server() {
    local log="$1"
    shift
    "$bin" serve --bind 127.0.0.1:0 "$@" >"$log" 2>&1 &
    servers+=($!)
    url=""
    for _ in $(seq 1 300); do
        url="$(sed -n 's/^listening on //p' "$log" | head -n 1)"
        [ -n "$url" ] && break
        kill -0 "${servers[-1]}" 2>/dev/null || { echo "the server exited:" >&2; tail -n 20 "$log" >&2; exit 1; }
        sleep 0.1
    done
    [ -n "$url" ] || { echo "the server printed no address" >&2; exit 1; }
    echo "server at $url (log: $log)"
}

# One open server for the whole flow, and one with an API key for the key field.
start_server "$out/server.log"
open_url="$url"
start_server "$out/server-keyed.log" --api-key "browser-test-key-1"
export KEYED_URL="$url" KEYED_KEY="browser-test-key-1"

status=0
node "$here/browser_test.mjs" "$open_url" "$out" || status=$?
if [ "$status" != 0 ]; then
    for log in "$out"/server*.log; do
        echo "--- last lines of $log:" >&2
        tail -n 30 "$log" >&2
    done
fi
exit "$status"
