#!/usr/bin/env bash
# The GPU check, run ON the GPU machine in the repository root with the bundle of
# tools/gpu/build-bundle.sh carried in .gpu-bundle/ (tools/gpu/README.md has the exact call).
# Needs there: bash, coreutils' timeout, python3 with torch + pip; no network, no Rust.
#
# Parts (each one's failure is shown and the next one still runs):
#   facts      nvidia-smi, kernel, python/torch
#   bundle     the binary (unpacked if .xz) against the bundle's manifest (sha256)
#   libs       the CUDA 13 user-space libraries (libcublas, libcublasLt, libcurand, libnvrtc)
#              found under python3's site-packages (nvidia/*), and the bundle's lib/
#              (libcudart.so.11.0, linked by the binary): LD_LIBRARY_PATH of our binary; ldd
#              finds every linked library and the binary starts
#   symbols    every CUDA function our binary may look up (tools/gpu/cuda-symbols.txt) exists
#   ours-parity   controlnet-serve device-check --no-bench (f32, f16, bf16 on the fixtures)
#   serve      controlnet-serve serve on a free port, one real generate request, PNG back
#   diffusers  the carried diffusers wheel + tools/gpu/diffusers_bench.py (the same bench)
#   ours-bench controlnet-serve device-check --no-parity (SD 1.5 size, f16, 512², 20 steps)
#   report     gpu-check.md + summary.json
# Everything goes to $OUT: run.log, ours-parity.json, ours-bench.json, diffusers.json,
# gpu-check.md, summary.json (6 files; the device returns at most 8). Exit 1 if any part failed.
#
# Overrides (environment): GPU_CHECK_DEVICE (cuda; `cpu` = a dry run with tiny sizes),
# GPU_CHECK_BIN (default: the bundle's binary), GPU_CHECK_PYTHON (python3),
# GPU_CHECK_DEADLINE (seconds from the start by which every part is over; 480),
# GPU_CHECK_{PARITY,SERVE,DIFFUSERS,BENCH}_TIMEOUT (per part, seconds; cut to the deadline),
# GPU_CHECK_SIZE/STEPS/BATCHES/STEP_ITERS/DTYPE/MODEL, GPU_CHECK_PARITY_DTYPES,
# GPU_CHECK_SYMBOLS (the symbol list; default tools/gpu/cuda-symbols.txt).
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/../.." || exit 2

OUT=${OUT:-/tmp/gpu-check-out}
mkdir -p "$OUT"
DEVICE=${GPU_CHECK_DEVICE:-cuda}
PY=${GPU_CHECK_PYTHON:-python3}
BUNDLE=.gpu-bundle
if [ "$DEVICE" = cpu ]; then
    small=1
else
    small=0
fi
SIZE=${GPU_CHECK_SIZE:-$([ $small = 1 ] && echo 64 || echo 512)}
STEPS=${GPU_CHECK_STEPS:-$([ $small = 1 ] && echo 2 || echo 20)}
BATCHES=${GPU_CHECK_BATCHES:-$([ $small = 1 ] && echo 1,2 || echo 1,4,16)}
STEP_ITERS=${GPU_CHECK_STEP_ITERS:-$([ $small = 1 ] && echo 1 || echo 10)}
BENCH_DTYPE=${GPU_CHECK_DTYPE:-$([ $small = 1 ] && echo f32 || echo f16)}
BENCH_MODEL=${GPU_CHECK_MODEL:-$([ $small = 1 ] && echo tiny || echo sd15)}
PARITY_DTYPES=${GPU_CHECK_PARITY_DTYPES:-$([ $small = 1 ] && echo f32,f16 || echo f32,f16,bf16)}
SERVE_DTYPE=$([ "$BENCH_DTYPE" = bf16 ] && echo f16 || echo "$BENCH_DTYPE")
DEADLINE=${GPU_CHECK_DEADLINE:-480}
PARITY_TIMEOUT=${GPU_CHECK_PARITY_TIMEOUT:-90}
SERVE_TIMEOUT=${GPU_CHECK_SERVE_TIMEOUT:-45}
DIFFUSERS_TIMEOUT=${GPU_CHECK_DIFFUSERS_TIMEOUT:-120}
BENCH_TIMEOUT=${GPU_CHECK_BENCH_TIMEOUT:-200}

STATE=$(mktemp -d /tmp/gpu-check-state.XXXXXX)
PARTS=$STATE/parts.tsv
: >"$PARTS"
FAILED=0
BIN=""

say() { printf '\n=== %s (at %ds) ===\n' "$*" "$SECONDS"; }

# record NAME STATUS RC SECONDS NOTE
record() {
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${5:-}" >>"$PARTS"
    [ "$2" = FAIL ] && FAILED=1
    echo "--- $1: $2 (exit $3, ${4}s)${5:+: $5}"
}

# budget WANTED: WANTED seconds, cut so that the part ends 20 s before the deadline.
budget() {
    local left=$((DEADLINE - SECONDS - 20))
    if [ "$left" -lt "$1" ]; then echo "$left"; else echo "$1"; fi
}

# timed NAME TIMEOUT CMD...: runs CMD under timeout and records the part.
timed() {
    local name=$1 want=$2 t start rc note=""
    shift 2
    t=$(budget "$want")
    if [ "$t" -lt 10 ]; then
        record "$name" FAIL - 0 "not run: only ${t}s left before the ${DEADLINE}s deadline"
        return 1
    fi
    say "$name (timeout ${t}s)"
    echo "+ $*"
    start=$SECONDS
    timeout --kill-after=10 "$t" "$@"
    rc=$?
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then note="timed out after ${t}s"; fi
    if [ "$rc" = 0 ]; then
        record "$name" ok 0 $((SECONDS - start)) "$note"
    else
        record "$name" FAIL "$rc" $((SECONDS - start)) "$note"
    fi
    return "$rc"
}

part_facts() {
    say facts
    local rc=0 facts
    date -u +%FT%TZ
    uname -a
    if command -v nvidia-smi >/dev/null; then
        if facts=$(nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader); then
            echo "$facts" | head -n 1 | tee "$STATE/gpu.txt"
            nvidia-smi
            nvidia-smi -q | head -n 40
        else
            echo "$facts"
            rc=1
        fi
    else
        echo "nvidia-smi: not found"
        rc=1
    fi
    echo "LD_LIBRARY_PATH (before)=${LD_LIBRARY_PATH:-}"
    ldconfig -p 2>/dev/null | grep -E 'libcuda\.so' || echo "ldconfig: no libcuda.so"
    "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], sys.executable); print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())' \
        || echo "python3/torch: not usable"
    if [ $rc = 0 ]; then
        record facts ok 0 0
    elif [ "$DEVICE" = cpu ]; then
        record facts skip "$rc" 0 "no GPU (dry run on the CPU)"
    else
        record facts FAIL "$rc" 0 "nvidia-smi failed"
    fi
}

part_bundle() {
    say bundle
    local note=""
    if [ -n "${GPU_CHECK_BIN:-}" ]; then
        BIN=$GPU_CHECK_BIN
        note="GPU_CHECK_BIN"
    elif [ -f $BUNDLE/controlnet-serve ]; then
        BIN=$BUNDLE/controlnet-serve
    elif [ -f $BUNDLE/controlnet-serve.xz ]; then
        mkdir -p /tmp/gpu-check-bin
        BIN=/tmp/gpu-check-bin/controlnet-serve
        if command -v xz >/dev/null; then
            xz -dc $BUNDLE/controlnet-serve.xz >"$BIN"
        else
            "$PY" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
                $BUNDLE/controlnet-serve.xz "$BIN"
        fi
        note="unpacked from controlnet-serve.xz"
    else
        record bundle FAIL - 0 "no $BUNDLE/controlnet-serve(.xz): run tools/gpu/build-bundle.sh and carry .gpu-bundle"
        BIN=""
        return 1
    fi
    chmod +x "$BIN" 2>/dev/null
    if [ -f $BUNDLE/manifest.json ] && [ -z "${GPU_CHECK_BIN:-}" ]; then
        # Every bundled file against its sha256 (the binary as built, before xz).
        if ! "$PY" - "$BUNDLE" "$BIN" <<'PY'; then
import hashlib, json, os, sys
bundle, binary = sys.argv[1], sys.argv[2]
m = json.load(open(os.path.join(bundle, "manifest.json")))
print("bundle built", m.get("built"), "from", m.get("commit"), "dirty" if m.get("dirty") else "clean",
      "| nvcc", m.get("nvcc"), "| compute cap", m.get("cuda_compute_cap"), "| binary:", m.get("binary"))
bad = 0
for f in m["files"]:
    path = binary if f["path"] in ("controlnet-serve", "controlnet-serve.xz") else os.path.join(bundle, f["path"])
    want = f.get("unpacked_sha256") if f["path"].endswith(".xz") else f["sha256"]
    h = hashlib.sha256(open(path, "rb").read()).hexdigest() if os.path.exists(path) else "missing"
    print(f"  {'ok  ' if h == want else 'BAD '} {f['path']} ({f['bytes']} bytes)")
    bad += h != want
sys.exit(1 if bad else 0)
PY
            record bundle FAIL 1 0 "sha256 mismatch with manifest.json"
            return 1
        fi
    fi
    record bundle ok 0 0 "$note"
}

# The CUDA 13 libraries of the torch venv (site-packages/nvidia/...), for the loader: cudarc
# dlopens libcublas.so, then .so.13, ... by name. CUDA_LD holds their folders; it is given as
# LD_LIBRARY_PATH to our binary and the symbol check only (exported to every Python process, it
# can pull a wrong libpython or libssl into them).
CUDA_LD=${LD_LIBRARY_PATH:-}
part_libs() {
    say libs
    local roots=() sp lib found dirs="" missing="" system="" ldcache links=$STATE/cuda-libs
    mkdir -p "$links"
    ldcache=$(ldconfig -p 2>/dev/null || true)
    while IFS= read -r sp; do
        [ -d "$sp/nvidia" ] && [[ " ${roots[*]:-} " != *" $sp/nvidia "* ]] && roots+=("$sp/nvidia")
    done < <(
        "$PY" -c 'import site, sys; print("\n".join(site.getsitepackages() + sys.path))' 2>/dev/null)
    for sp in /opt/torch/.venv/lib/python3*/site-packages/nvidia /usr/local/cuda/lib64 \
        /usr/local/cuda/targets/x86_64-linux/lib; do
        [ -d "$sp" ] && roots+=("$sp")
    done
    echo "search roots: ${roots[*]:-none}"
    for lib in libcublas.so libcublasLt.so libcurand.so libnvrtc.so; do
        found=""
        for sp in "${roots[@]}"; do
            # The highest major version present under this root (.so.13 before .so.12 ...).
            found=$(find -L "$sp" -maxdepth 4 -name "$lib.[0-9]*" \( -type f -o -type l \) 2>/dev/null \
                | awk -F"$lib." '{split($NF, v, "."); print v[1] "\t" $0}' | sort -t$'\t' -k1,1nr -k2 \
                | head -n 1 | cut -f2)
            [ -n "$found" ] && break
        done
        if [ -n "$found" ]; then
            echo "$lib -> $found"
            # cudarc tries the unversioned name first, which the system loader may resolve to
            # another CUDA (a toolkit's libcublas.so): a link under that name, first in the path,
            # makes the choice above the one loaded.
            ln -sf "$found" "$links/$lib"
            case ":$dirs:" in *":$(dirname "$found"):"*) ;; *) dirs=${dirs:+$dirs:}$(dirname "$found") ;; esac
        elif found=$(grep -m1 -E "^[[:space:]]*$lib(\.[0-9]+)* " <<<"$ldcache"); then
            echo "$lib: not under the roots; the system loader has:$found"
            system="$system $lib"
        else
            echo "$lib: NOT FOUND"
            missing="$missing $lib"
        fi
    done
    # The driver's libcuda.so.1: from the system loader, LD_LIBRARY_PATH, or the driver's folder.
    local d f libdirs=() cuda=""
    IFS=: read -ra libdirs <<<"${CUDA_LD:-}"
    for d in "${libdirs[@]}"; do [ -e "$d/libcuda.so.1" ] && cuda="$d/libcuda.so.1" && break; done
    if [ -z "$cuda" ] && ! grep -q 'libcuda\.so\.1 ' <<<"$ldcache"; then
        cuda=$(find /usr/local/nvidia /usr/lib64 /usr/lib/x86_64-linux-gnu -maxdepth 3 -name libcuda.so.1 2>/dev/null | head -n 1)
        [ -n "$cuda" ] && dirs=${dirs:+$dirs:}$(dirname "$cuda")
    fi
    echo "libcuda.so.1 -> ${cuda:-$(grep -m1 'libcuda\.so\.1 ' <<<"$ldcache" | sed 's/.*=> //')}"
    IFS=: read -ra libdirs <<<"$dirs"
    [ -n "$dirs" ] && dirs=$links:$dirs
    # Last: what the binary links at build time (libcudart.so.11.0), carried in the bundle.
    [ -d "$PWD/$BUNDLE/lib" ] && dirs=${dirs:+$dirs:}$PWD/$BUNDLE/lib
    CUDA_LD=$dirs${CUDA_LD:+:$CUDA_LD}
    echo "LD_LIBRARY_PATH for controlnet-serve: ${CUDA_LD:-(none)}"
    for f in "$links"/*; do [ -L "$f" ] && echo "  $f -> $(readlink "$f")"; done
    for d in "${libdirs[@]}"; do
        for f in "$d"/libnvrtc-builtins*; do [ -e "$f" ] && echo "  $f"; done
    done
    if [ -n "$missing" ] && [ "$DEVICE" != cpu ]; then
        record libs FAIL 1 0 "not found:$missing"
        return 1
    fi
    if [ -n "$BIN" ]; then
        # The libraries the binary links (not the ones it opens at run time), then a first start.
        echo "+ ldd $BIN"
        env LD_LIBRARY_PATH="$CUDA_LD" ldd "$BIN"
        if env LD_LIBRARY_PATH="$CUDA_LD" ldd "$BIN" | grep -q 'not found'; then
            record libs FAIL 1 0 "the binary's linked libraries are not all found (ldd above)"
            return 1
        fi
        if ! env LD_LIBRARY_PATH="$CUDA_LD" "$BIN" --version; then
            record libs FAIL 1 0 "$BIN does not start"
            return 1
        fi
    fi
    record libs ok 0 0 "${missing:+not found:$missing}${system:+ system loader:$system}"
}

part_symbols() {
    local list=${GPU_CHECK_SYMBOLS:-tools/gpu/cuda-symbols.txt}
    if [ ! -f "$list" ]; then
        say symbols
        echo "no $list: skipped"
        record symbols skip - 0 "no $list"
        return 0
    fi
    timed symbols 60 env LD_LIBRARY_PATH="$CUDA_LD" "$PY" tools/gpu/cuda_symbols.py "$list"
}

part_ours_parity() {
    [ -n "$BIN" ] || { record ours-parity FAIL - 0 "no binary"; return 1; }
    timed ours-parity "$PARITY_TIMEOUT" env LD_LIBRARY_PATH="$CUDA_LD" "$BIN" device-check --device "$DEVICE" --no-bench \
        --parity-dtypes "$PARITY_DTYPES" --json "$OUT/ours-parity.json"
}

part_serve() {
    [ -n "$BIN" ] || { record serve FAIL - 0 "no binary"; return 1; }
    local t size=()
    t=$(budget "$SERVE_TIMEOUT")
    [ $small = 1 ] && size=(--size 64 --steps 2)
    timed serve "$SERVE_TIMEOUT" "$PY" tools/gpu/serve_check.py --bin "$BIN" --device "$DEVICE" --ld-library-path "$CUDA_LD" \
        --dtype "$SERVE_DTYPE" --timeout $((t > 15 ? t - 10 : 5)) "${size[@]}"
}

part_diffusers() {
    local site tiny=() wheels=()
    say "diffusers: wheels"
    shopt -s nullglob
    wheels=("$BUNDLE"/wheels/*.whl)
    shopt -u nullglob
    if [ ${#wheels[@]} -gt 0 ]; then
        site=$(mktemp -d /tmp/gpu-check-site.XXXXXX)
        echo "+ pip install --target $site ${wheels[*]}"
        if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "${wheels[@]}"; then
            record diffusers FAIL 1 0 "pip install of the carried wheels failed"
            return 1
        fi
        export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "no $BUNDLE/wheels/*.whl: using the installed diffusers, if any"
    fi
    [ $small = 1 ] && tiny=(--tiny)
    timed diffusers "$DIFFUSERS_TIMEOUT" "$PY" tools/gpu/diffusers_bench.py \
        --device "$DEVICE" --dtype "$BENCH_DTYPE" --size "$SIZE" --steps "$STEPS" \
        --batches "$BATCHES" --step-iters "$STEP_ITERS" "${tiny[@]}" --json "$OUT/diffusers.json"
}

part_ours_bench() {
    [ -n "$BIN" ] || { record ours-bench FAIL - 0 "no binary"; return 1; }
    timed ours-bench "$BENCH_TIMEOUT" env LD_LIBRARY_PATH="$CUDA_LD" "$BIN" device-check --device "$DEVICE" --no-parity \
        --bench-model "$BENCH_MODEL" --bench-dtype "$BENCH_DTYPE" --size "$SIZE" --steps "$STEPS" \
        --batches "$BATCHES" --step-iters "$STEP_ITERS" --json "$OUT/ours-bench.json"
}

main() {
    echo "GPU check: device $DEVICE, bench $BENCH_MODEL $BENCH_DTYPE ${SIZE}px $STEPS steps batches $BATCHES," \
        "step iters $STEP_ITERS, parity $PARITY_DTYPES, deadline ${DEADLINE}s, OUT=$OUT"
    part_facts
    part_bundle
    part_libs
    part_symbols
    part_ours_parity
    part_serve
    part_diffusers
    part_ours_bench
    say report
    "$PY" tools/gpu/report.py "$OUT" "$STATE" || { echo "report.py failed"; FAILED=1; }
    # The report's Parts table was written before this line: a report failure shows here only.
    if [ $FAILED = 0 ]; then
        echo "GPU CHECK PASSED (${SECONDS}s)"
    else
        echo "GPU CHECK FAILED (${SECONDS}s): see the Parts table above"
    fi
    return $FAILED
}

main 2>&1 | tee "$OUT/run.log"
exit "${PIPESTATUS[0]}"
