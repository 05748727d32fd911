#!/usr/bin/env bash
# Checks that the CUDA build compiles (no GPU needed): installs Debian's CUDA 11.8 toolkit from
# non-free if nvcc is missing, then `cargo check`s the server with the cuda feature. candle's
# kernels are compiled by nvcc in a build script, so this exercises them too.
set -euo pipefail
cd "$(dirname "$0")/.."
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
# nvcc 11.8 cannot target compute capability 90.
CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-80} cargo check --release -p server --features cuda --target-dir target/cuda
