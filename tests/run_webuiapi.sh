#!/usr/bin/env bash
# Runs tests/a1111_webuiapi.py (the real A1111 client, webuiapi) against a built server binary.
# Usage: tests/run_webuiapi.sh [path/to/controlnet-serve]   (default target/debug/controlnet-serve)
# Builds nothing. The venv goes to $WEBUIAPI_VENV (default .venv-webuiapi at the repo root) and
# is reused while tests/requirements-webuiapi.txt is unchanged.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
bin="${1:-$root/target/debug/controlnet-serve}"
[ -x "$bin" ] || { echo "no server binary at $bin (build it first)" >&2; exit 2; }
venv="${WEBUIAPI_VENV:-$root/.venv-webuiapi}"
req="$here/requirements-webuiapi.txt"
stamp="$venv/.requirements"
if [ ! -x "$venv/bin/python" ] || ! cmp -s "$req" "$stamp"; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req"
    cp "$req" "$stamp"
fi
exec "$venv/bin/python" "$here/a1111_webuiapi.py" "$bin"
