#!/usr/bin/env bash
# The gateway test (tools/deploy/gateway_test.py): three replicas behind nginx with the shipped
# docker/nginx config, on loopback. Installs Debian's nginx if it is missing (never starts the
# system service: the test runs its own nginx on a free port).
# Usage: bash tools/deploy/gateway-test.sh [path/to/controlnet-serve]   (default: the debug build)
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
bin="${1:-$root/target/debug/controlnet-serve}"
[ -x "$bin" ] || { echo "no server binary at $bin (build it first)" >&2; exit 2; }
export PATH="$PATH:/usr/sbin"
if ! command -v nginx >/dev/null; then
    apt-get update -qq
    # policy-rc.d keeps the package from starting a system nginx on port 80.
    made_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
        made_policy=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null
    if [ "$made_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
fi
nginx -v
exec python3 "$root/tools/deploy/gateway_test.py" "$bin"
