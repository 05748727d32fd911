#!/usr/bin/env bash
# One denoiser step (ControlNet + UNet, SD 1.5 size, random weights, batch 2 for CFG, 32x32
# latent, f32, CPU) in this project and in diffusers/torch, measured in the same run, one after
# the other so they do not share the cores. Prints both and their ratio.
#
# Usage: bash tools/bench/denoiser_step.sh [--warmup N] [--iters N] [--profile] [--threads N]
# --profile: each side first prints the time of one step by operator class (ours:
# diffusion::profile; theirs: torch.profiler).
# --threads N (default: every core): both sides run N threads (RAYON_NUM_THREADS; torch's
# OMP_NUM_THREADS/MKL_NUM_THREADS), pinned to the same N cores (taskset, when present).
# Needs: cargo, and the Python environment of tools/parity (PYTHON=/path/to/python to choose).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
threads=$(nproc)
args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --threads) threads=$2; shift 2 ;;
        *) args+=("$1"); shift ;;
    esac
done
pin=()
if command -v taskset > /dev/null; then
    cores=$("$PYTHON" -c "import os; print(','.join(map(str, sorted(os.sched_getaffinity(0))[:$threads])))")
    pin=(taskset -c "$cores")
fi
export RAYON_NUM_THREADS=$threads OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads

cargo build --release --quiet --bin bench-denoiser-step
ours=$("${pin[@]}" ./target/release/bench-denoiser-step "${args[@]}" | tail -n 1)
# torch's warnings are noise, except for the --profile table.
torch_stderr=/dev/null
if [[ " ${args[*]} " == *" --profile "* ]]; then torch_stderr=/dev/stderr; fi
theirs=$(HF_HUB_OFFLINE=1 "${pin[@]}" "$PYTHON" tools/bench/denoiser_step_torch.py "${args[@]}" 2>"$torch_stderr" | tail -n 1)

"$PYTHON" - "$ours" "$theirs" <<'PY'
import json, sys
ours, theirs = (json.loads(a) for a in sys.argv[1:3])
print(f"{'implementation':<28} {'threads':>7} {'median s/step':>14} {'min s/step':>11}")
for r in (ours, theirs):
    print(f"{r['impl']:<28} {r['threads']:>7} {r['step_seconds_median']:>14.3f} {r['step_seconds_min']:>11.3f}")
ratio = ours["step_seconds_median"] / theirs["step_seconds_median"]
ratio_min = ours["step_seconds_min"] / theirs["step_seconds_min"]
print(f"ratio ours/diffusers: median {ratio:.2f}, min {ratio_min:.2f} (below 1 = we are faster)")
PY
