#!/usr/bin/env bash
# Builds what the GPU machine needs and cannot make (it has no Rust toolchain and no network)
# into .gpu-bundle/ (git-ignored; carried with the `run` call, tools/gpu/README.md):
#
#   controlnet-serve      the release binary with the cuda feature, stripped (PTX for compute
#                         capability 8.0, which the driver compiles for the H200's 9.0);
#                         controlnet-serve.xz instead when the plain one would not fit
#   lib/                  CUDA runtime libraries the binary links (not loads) at build time:
#                         libcudart.so.11.0, which candle-kernels links for its MoE kernels
#   wheels/*.whl          diffusers (the version of tools/parity/requirements.txt), pure Python;
#                         its other requirements are already on the machine (KINDS.md), and
#                         importlib_metadata is imported by diffusers only on Python < 3.8
#   manifest.json         commit, toolchain, and every file's size and sha256 (run.sh checks them)
#
# Fails if the bundle plus the files that travel anyway (tracked and untracked-not-ignored)
# exceed GPU_BUNDLE_LIMIT_MIB (56; the device takes 64 MiB in all).
#
# Usage: tools/gpu/build-bundle.sh [--binary PATH]
#   --binary PATH   package this binary instead of building (to test the packaging)
# Environment: CUDA_COMPUTE_CAP (80: nvcc 11.8 cannot target 90), GPU_BUNDLE_LIMIT_MIB (56),
#   GPU_BUNDLE_XZ (auto: compress the binary only if over the limit; always; never),
#   GPU_BUNDLE_EXTRA_WHEELS (more NAME==VERSION to carry, space-separated), PYTHON (python3).
set -euo pipefail
cd "$(dirname "$0")/../.."

BUNDLE=.gpu-bundle
LIMIT_MIB=${GPU_BUNDLE_LIMIT_MIB:-56}
XZ=${GPU_BUNDLE_XZ:-auto}
PYTHON=${PYTHON:-python3}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-80}
binary=""
while [ $# -gt 0 ]; do
    case $1 in
        --binary) binary=$2; shift 2 ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done

if [ -z "$binary" ]; then
    if ! command -v nvcc >/dev/null; then
        # tools/check-cuda.sh installs Debian's CUDA 11.8 toolkit (non-free) when nvcc is
        # missing, then `cargo check`s the cuda build into the same target dir: its kernel
        # build (nvcc) is reused by the build below.
        echo "nvcc not found: running tools/check-cuda.sh to install it"
        bash tools/check-cuda.sh
    fi
    nvcc --version | tail -n 1
    echo "building: CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP cargo build --release -p server --features cuda --target-dir target/cuda"
    cargo build --release -p server --features cuda --target-dir target/cuda
    binary=target/cuda/release/controlnet-serve
    source="cargo build --release -p server --features cuda"
fi
source=${source:-"given with --binary: $binary (not necessarily a cuda build)"}
[ -x "$binary" ] || { echo "no executable at $binary" >&2; exit 1; }

rm -rf "$BUNDLE"
mkdir -p "$BUNDLE/wheels"
strip -o "$BUNDLE/controlnet-serve" "$binary"
unpacked_sha=$(sha256sum "$BUNDLE/controlnet-serve" | cut -d' ' -f1)

# CUDA libraries the binary links at build time go along: candle-kernels links its static MoE
# kernels against libcudart (CUDA 11.8's libcudart.so.11.0 here), and the GPU machine has only
# CUDA 13's. The driver (libcuda.so.1) is never bundled: it must match the machine's kernel module.
mkdir -p "$BUNDLE/lib"
if ldd "$binary" | grep -q 'not found'; then
    ldd "$binary" | grep 'not found' >&2
    echo "the binary needs libraries this machine does not have: cannot bundle them" >&2
    exit 1
fi
while read -r soname path; do
    case $soname in
        libcudart.so* | libcublas*.so* | libcurand.so* | libnvrtc*.so*)
            cp -L "$path" "$BUNDLE/lib/$soname"
            echo "bundled lib/$soname (from $path, linked by the binary)"
            ;;
    esac
done < <(ldd "$binary" | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}')
rmdir "$BUNDLE/lib" 2>/dev/null || true

diffusers=$(grep -E '^diffusers==' tools/parity/requirements.txt | head -n 1)
[ -n "$diffusers" ] || { echo "no diffusers pin in tools/parity/requirements.txt" >&2; exit 1; }
read -ra wheels <<<"$diffusers ${GPU_BUNDLE_EXTRA_WHEELS:-}"
echo "downloading wheels: ${wheels[*]}"
# The machine's python3 is CPython 3.12 on x86-64 (the device README's flags).
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$BUNDLE/wheels" "${wheels[@]}"
for w in "$BUNDLE"/wheels/*.whl; do
    echo "$(basename "$w") requires:"
    unzip -p "$w" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' | sed 's/^/    /' || true
done

# What travels anyway: tracked and untracked-not-ignored files (the bundle itself excluded).
tree_bytes=$(git ls-files -z -co --exclude-standard | grep -zv "^$BUNDLE/" \
    | xargs -0 -r stat -c %s -- 2>/dev/null | awk '{s += $1} END {print s + 0}')
bundle_bytes() { find "$BUNDLE" -type f -printf '%s\n' | awk '{s += $1} END {print s + 0}'; }
limit=$((LIMIT_MIB * 1024 * 1024))
total=$((tree_bytes + $(bundle_bytes)))
if [ "$XZ" = always ] || { [ "$XZ" = auto ] && [ "$total" -gt "$limit" ]; }; then
    echo "compressing the binary (bundle + tree = $((total / 1048576)) MiB, limit $LIMIT_MIB MiB)"
    xz -T0 -6 "$BUNDLE/controlnet-serve"
    total=$((tree_bytes + $(bundle_bytes)))
fi
if ! git check-ignore -q "$BUNDLE/controlnet-serve"; then
    echo "warning: $BUNDLE is not git-ignored: it would travel twice (add /$BUNDLE/ to .gitignore)" >&2
fi

"$PYTHON" - "$BUNDLE" "$tree_bytes" "$limit" "$unpacked_sha" "$source" <<'PY'
import datetime, hashlib, json, os, subprocess, sys
bundle, tree, limit, unpacked_sha, source = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]

def out(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None

files = []
for root, _, names in os.walk(bundle):
    for name in sorted(names):
        path = os.path.join(root, name)
        rel = os.path.relpath(path, bundle)
        if rel == "manifest.json":
            continue
        entry = {"path": rel, "bytes": os.path.getsize(path),
                 "sha256": hashlib.sha256(open(path, "rb").read()).hexdigest()}
        if rel == "controlnet-serve.xz":
            entry["unpacked_sha256"] = unpacked_sha
        files.append(entry)
files.sort(key=lambda f: f["path"])
size = sum(f["bytes"] for f in files)
nvcc = out("nvcc", "--version")
manifest = {
    "built": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    "commit": out("git", "rev-parse", "HEAD"),
    "dirty": bool(out("git", "status", "--porcelain", "--untracked-files=no")),
    "binary": source,
    "rustc": out("rustc", "--version"),
    "nvcc": nvcc.splitlines()[-1] if nvcc else None,
    "cuda_compute_cap": os.environ.get("CUDA_COMPUTE_CAP"),
    "files": files,
    "bundle_bytes": size,
    "tree_bytes": tree,
    "total_bytes": size + tree,
    "limit_bytes": limit,
}
with open(os.path.join(bundle, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=2)
    f.write("\n")
for e in files:
    print(f"{e['bytes']:>12,d}  {e['sha256'][:16]}  {e['path']}")
mib = lambda b: b / 1048576
print(f"bundle {mib(size):.1f} MiB + tree {mib(tree):.1f} MiB = {mib(size + tree):.1f} MiB "
      f"(limit {mib(limit):.0f} MiB)")
sys.exit(1 if size + tree > limit else 0)
PY
echo "bundle ready in $BUNDLE/: carry [\"$BUNDLE\"] with: bash tools/gpu/run.sh (tools/gpu/README.md)"
