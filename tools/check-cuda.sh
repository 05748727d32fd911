#!/usr/bin/env bash
# Checks the CUDA build without a GPU:
#  1. it compiles and links (Debian's CUDA 11.8 toolkit from non-free is installed if nvcc is
#     missing; candle's kernels are compiled by nvcc in a build script, so this covers them);
#  2. the binary links no CUDA library but the CUDA runtime it carries (readelf -d): cuBLAS,
#     cuRAND, NVRTC and the driver are loaded at run time (vendor/README.md), so it starts where
#     CUDA 11, 12 or 13 is installed;
#  3. every CUDA function it can look up is exported by the CUDA 11.8 libraries and the
#     driver's libcuda installed here (tools/cuda-functions.sh says how that list is read off the
#     binary); the GPU check (tools/gpu/run.sh) does the same against the GPU machine's CUDA 13.
#
# Usage: bash tools/check-cuda.sh [--release]   (--release: the optimised binary, as the GPU
# bundle uses; the default profile `cuda-check` builds faster and calls the same functions)
# Other CUDA versions to check against: CUDA_LIB_SETS (below), e.g. the lib folders of the
# nvidia-cublas-cu12 / -curand-cu12 / -cuda-nvrtc-cu12 wheels as one set.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=cuda-check
[ "${1:-}" = --release ] && profile=release

if ! command -v nvcc >/dev/null; then
    if [ ! -f /etc/apt/sources.list.d/debian-non-free.sources ]; then
        cat > /etc/apt/sources.list.d/debian-non-free.sources <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: contrib non-free non-free-firmware
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nvidia-cuda-toolkit >/dev/null
fi
nvcc --version | tail -n 1

# 1. Compile and link. nvcc 11.8 cannot target compute capability 90; the driver compiles the
# 8.0 PTX for newer GPUs.
CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-80} cargo build --profile "$profile" -p server --features cuda \
    --target-dir target/cuda
bin=target/cuda/$profile/controlnet-serve

# 2. No CUDA library among the binary's dependencies but the CUDA runtime: candle-kernels links
# its quantized (GGUF) kernels with libcudart.so.11.0, which the binary finds through
# LD_LIBRARY_PATH or its RUNPATH $ORIGIN/lib (crates/server/build.rs); the GPU bundle carries
# it (680 KB). The driver, cuBLAS and cuRAND are opened at run time, whatever their version.
echo "dynamic dependencies of $bin:"
readelf -d "$bin" | grep -E 'NEEDED|RUNPATH'
if readelf -d "$bin" | grep NEEDED | grep -E 'lib(cuda|cublas|cublasLt|curand|nvrtc|cudnn)\.so'; then
    echo "FAIL: the CUDA binary links cuBLAS/cuRAND/NVRTC/the driver; they must be loaded at run time" >&2
    exit 1
fi
if ! readelf -d "$bin" | grep RUNPATH | grep -qF '$ORIGIN/lib'; then
    echo "FAIL: the CUDA binary has no RUNPATH \$ORIGIN/lib for the libcudart it carries" >&2
    exit 1
fi

# 3. The functions it can call exist in CUDA 11.8 and the installed driver library.
list=$(mktemp)
trap 'rm -f "$list"' EXIT
bash tools/cuda-functions.sh list "$bin" > "$list"
echo "CUDA functions the binary can look up: $(wc -l < "$list") ($(cut -d' ' -f1 "$list" | sort | uniq -c | xargs))"
if [ ! -s "$list" ]; then
    echo "FAIL: no cudarc function wrapper found in $bin (did the symbol naming change?)" >&2
    exit 1
fi
# The committed list (read by the GPU check) must hold every function this build can call.
if ! missing=$(comm -23 "$list" <(sort -u tools/gpu/cuda-symbols.txt)) || [ -n "$missing" ]; then
    echo "FAIL: tools/gpu/cuda-symbols.txt lacks functions this build calls:" >&2
    echo "$missing" >&2
    echo "(regenerate: bash tools/cuda-functions.sh list $bin, merged into that file)" >&2
    exit 1
fi
bash tools/cuda-functions.sh check tools/gpu/cuda-symbols.txt /usr/lib/x86_64-linux-gnu
# Other CUDA versions, when their libraries are at hand: CUDA_LIB_SETS="set1 set2", each set
# folders joined by ':' (the system folder is added last, for the driver).
for set in ${CUDA_LIB_SETS:-}; do
    IFS=: read -r -a dirs <<<"$set"
    bash tools/cuda-functions.sh check tools/gpu/cuda-symbols.txt "${dirs[@]}" /usr/lib/x86_64-linux-gnu
done
echo "CUDA build: links only libcudart; its CUDA functions exist in the libraries checked"
