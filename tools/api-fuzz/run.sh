#!/usr/bin/env bash
# Fuzzes the HTTP API against its own OpenAPI document: starts the server binary on an
# ephemeral port (embedded model, tools/api-fuzz/server.toml's small limits), then runs
# schemathesis with every check (`--checks all`) on the native and the A1111 routes, reading the
# document the server serves (which states the running limits). Exits non-zero on any failure.
# Usage: tools/api-fuzz/run.sh [path/to/controlnet-serve]   (default target/debug/controlnet-serve)
# Builds nothing. Knobs: API_FUZZ_EXAMPLES (examples per operation, default 12), API_FUZZ_SEED
# (default 1), API_FUZZ_TIMEOUT (seconds for the whole schemathesis run, default 900). The venv
# goes to $API_FUZZ_VENV (default tools/api-fuzz/.venv) and is reused while requirements.txt is
# unchanged.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
bin="${1:-$root/target/debug/controlnet-serve}"
[ -x "$bin" ] || { echo "no server binary at $bin (build it first)" >&2; exit 2; }
bin="$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")"
venv="${API_FUZZ_VENV:-$here/.venv}"
req="$here/requirements.txt"
stamp="$venv/.requirements"
if [ ! -x "$venv/bin/schemathesis" ] || ! cmp -s "$req" "$stamp"; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req"
    cp "$req" "$stamp"
fi

work="$(mktemp -d)"
server_pid=""
cleanup() {
    if [ -n "$server_pid" ]; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

# No keys: the fuzz reaches every route (auth has its own tests).
env -u CNS_API_KEY -u CNS_ADMIN_KEY RUST_LOG=info \
    "$bin" serve --bind 127.0.0.1:0 --config "$here/server.toml" \
    >"$work/server.out" 2>"$work/server.log" &
server_pid=$!
base=""
for _ in $(seq 1 600); do
    base="$(sed -n 's/^listening on //p' "$work/server.out" | head -n 1)"
    [ -n "$base" ] && break
    kill -0 "$server_pid" 2>/dev/null || { cat "$work/server.log" >&2; exit 1; }
    sleep 0.1
done
[ -n "$base" ] || { echo "the server did not say where it listens" >&2; exit 1; }
"$venv/bin/python" - "$base" <<'PY'
import sys, time, urllib.request
for _ in range(1200):
    try:
        if urllib.request.urlopen(sys.argv[1] + "/ready", timeout=2).status == 200:
            sys.exit(0)
    except Exception:
        pass
    time.sleep(0.1)
sys.exit("the server did not get ready")
PY
echo "== server ready at $base; fuzzing $base/openapi.yaml"

started=$(date +%s)
status=0
# Run in the temporary folder: schemathesis writes nothing into the tree. One worker: with two,
# hypothesis (6.170) races on a shared cache and reports a spurious "Runtime Error".
(
    cd "$work"
    SCHEMATHESIS_HOOKS="$here/hooks.py" timeout "${API_FUZZ_TIMEOUT:-900}" \
        "$venv/bin/schemathesis" run "$base/openapi.yaml" \
        --checks all \
        --max-examples "${API_FUZZ_EXAMPLES:-12}" \
        --seed "${API_FUZZ_SEED:-1}" \
        --workers 1 \
        --request-timeout 60 \
        --generation-database none \
        --no-color
) || status=$?
echo "== schemathesis: exit $status after $(( $(date +%s) - started )) s"
if [ "$status" -ne 0 ]; then
    echo "== server log (last 40 lines)"
    tail -n 40 "$work/server.log"
fi
exit "$status"
