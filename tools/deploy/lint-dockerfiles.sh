#!/usr/bin/env bash
# Lints docker/Dockerfile and docker/Dockerfile.cuda with hadolint (from tools/deploy/venv.sh).
# Errors fail; warnings and style notes are printed so they are seen, but do not fail: the
# deliberate ones are silenced in the Dockerfiles with a reason.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
venv="$(bash "$root/tools/deploy/venv.sh")"
"$venv/bin/hadolint" --version
status=0
for file in docker/Dockerfile docker/Dockerfile.cuda; do
    echo "hadolint $file"
    (cd "$root" && "$venv/bin/hadolint" --no-color --failure-threshold error "$file") || status=1
done
[ "$status" -eq 0 ] && echo "Dockerfiles: no hadolint errors"
exit "$status"
