#!/usr/bin/env bash
# Each network preprocessor on one 512x512 photo-like image (formula weights, f32, CPU), in this
# project and in controlnet_aux 0.0.10/torch, measured in the same run one after the other so
# they do not share the cores. Prints a table of both and their ratio.
#
# Usage: bash tools/bench/annotators.sh [--iters N] [--only softedge_hed,mlsd]
# Needs: cargo, and a Python environment with torch and controlnet_aux==0.0.10
# (PYTHON=/path/to/python to choose; see tools/parity/README.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
args=("$@")
img=$(mktemp --suffix=.png)
trap 'rm -f "$img"' EXIT
# A photo-like test image: smooth gradients, edges, lines and texture (seeded).
"$PYTHON" - "$img" <<'PY'
import sys
import numpy as np
from PIL import Image
rng = np.random.default_rng(7)
y, x = np.mgrid[0:512, 0:512].astype(np.float32)
img = np.stack([x / 2, y / 2, 128 + 100 * np.sin(x / 23) * np.cos(y / 31)], axis=2)
img[100:300, 150:400] = [200, 60, 40]
img[(x - 256) ** 2 + (y - 380) ** 2 < 70 ** 2] = [30, 160, 220]
for k in range(0, 512, 48):
    img[k:k + 3, :] = 250
img += rng.normal(0, 6, img.shape)
Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(sys.argv[1])
PY

cargo build --release --quiet -p neural-annotators --bin bench-annotators
ours=$(./target/release/bench-annotators "$img" "${args[@]}")
echo "$ours" >&2
theirs=$(HF_HUB_OFFLINE=1 "$PYTHON" tools/bench/annotators_torch.py "$img" "${args[@]}" 2>/dev/null)
echo "$theirs" >&2

"$PYTHON" - "$ours" "$theirs" <<'PY'
import json, sys
# Only the JSON lines: the reference modules may print on stdout too.
rows = lambda text: [json.loads(l) for l in text.splitlines() if l.startswith("{")]
ours = {r["preprocessor"]: r for r in rows(sys.argv[1])}
theirs = {r["preprocessor"]: r for r in rows(sys.argv[2])}
first = next(iter(theirs.values()))
print(f"512x512, f32, CPU; reference: {first['impl']} ({first['threads']} threads)")
print(f"{'preprocessor':<20} {'ours median s':>14} {'torch median s':>15} {'ratio ours/torch':>17}")
for name, r in ours.items():
    t = theirs[name]
    print(f"{name:<20} {r['median_s']:>14.3f} {t['median_s']:>15.3f} {r['median_s'] / t['median_s']:>17.2f}")
print("(ratio below 1 = we are faster)")
PY
