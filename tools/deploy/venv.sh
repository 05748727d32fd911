#!/usr/bin/env bash
# Makes (or reuses) the virtualenv with the deployment linters of tools/deploy/requirements.txt
# and prints its path. The venv goes to $DEPLOY_VENV (default .venv-deploy at the repo root) and
# is reused while the requirements are unchanged.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
venv="${DEPLOY_VENV:-$root/.venv-deploy}"
req="$root/tools/deploy/requirements.txt"
if [ ! -x "$venv/bin/python" ] || ! cmp -s "$req" "$venv/.requirements"; then
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req" >&2
    cp "$req" "$venv/.requirements"
fi
echo "$venv"
