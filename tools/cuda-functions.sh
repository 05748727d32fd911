#!/usr/bin/env bash
# The CUDA functions a controlnet-serve binary can look up at run time, and whether given
# libraries export them.
#
#   tools/cuda-functions.sh list BINARY          one "library function" line per function
#   tools/cuda-functions.sh check LIST DIR...     every function of LIST exported by the libraries
#                                                 found in the DIRs, the first DIR holding a library
#                                                 winning (exit 1 naming the missing)
#
# cudarc (with `dynamic-loading`, vendor/README.md) wraps each CUDA function in a Rust function
# holding a `static _S: OnceLock<fn>` filled by dlsym(name) on the first call. The linker keeps
# a wrapper, and its static, only where the program can call it, so the unstripped binary's
# `cudarc::<library>::sys::<function>::_S` symbols name exactly the functions it may look up.
# A function exported under its name has the ABI of its bindings: NVIDIA renames a function
# (`_v2`, `_v3`) when its ABI changes.
set -euo pipefail

library_file() { # cudarc module -> the shared object's name prefix
    case "$1" in
        driver) echo libcuda.so ;;
        cublas) echo libcublas.so ;;
        cublaslt) echo libcublasLt.so ;;
        curand) echo libcurand.so ;;
        nvrtc) echo libnvrtc.so ;;
        runtime) echo libcudart.so ;;
        *) echo "unknown cudarc library $1" >&2; return 1 ;;
    esac
}

case "${1:-}" in
list)
    bin=$2
    nm -C "$bin" | sed -nE 's/.* cudarc::([a-z]+)::sys::([A-Za-z0-9_]+)::_S$/\1 \2/p' | sort -u
    ;;
check)
    list=$2
    shift 2
    missing=0
    for lib in $(cut -d' ' -f1 "$list" | sort -u); do
        prefix=$(library_file "$lib")
        # The first folder holding the library, its newest file there (.so.13 before .so).
        file=
        for dir in "$@"; do
            file=$(find "$dir" -maxdepth 1 \( -type f -o -type l \) -name "$prefix*" 2>/dev/null |
                grep -vE 'alt|builtins|_static' | sort -V | tail -n 1 || true)
            [ -n "$file" ] && break
        done
        if [ -z "$file" ]; then
            echo "no $prefix* in $*" >&2
            missing=1
            continue
        fi
        exported=$(nm -D --defined-only "$file" | awk '{print $NF}' | sed 's/@.*//' | sort -u)
        n=0
        for f in $(awk -v l="$lib" '$1 == l {print $2}' "$list"); do
            n=$((n + 1))
            if ! grep -qx "$f" <<<"$exported"; then
                echo "MISSING: $f not exported by $(readlink -f "$file")" >&2
                missing=1
            fi
        done
        echo "$(readlink -f "$file"): $n functions checked"
    done
    exit $missing
    ;;
*)
    sed -n '2,8p' "$0"
    exit 2
    ;;
esac
