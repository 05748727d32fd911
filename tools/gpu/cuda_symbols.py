#!/usr/bin/env python3
"""Checks that every CUDA function our binary may look up is exported by the libraries this
process loads, the way cudarc (dynamic-loading, cuda-13000) finds them: by name through the
loader (LD_LIBRARY_PATH must be set before Python starts), trying lib<stem>.so, then
.so.13, .12, .11, .10, .9, .1.

Input: a file with one `<library> <symbol>` per line (e.g. `cublas cublasGemmEx`), the library
named by its stem (`cuda`, `cublasLt`) or by cudarc's module name (`driver`, `cublaslt`,
`runtime`), as tools/cuda-functions.sh lists them; blank lines and `#` comments are skipped. Prints the file each stem resolved to and every missing symbol; exits
1 if a library does not load or a symbol is missing.
"""

import ctypes
import os
import sys
from collections import OrderedDict


# cudarc's module names (tools/cuda-functions.sh list) -> library stems; other names are stems.
CUDARC_MODULES = {"driver": "cuda", "cublaslt": "cublasLt", "runtime": "cudart"}


def candidates(stem: str) -> list:
    # cudarc's get_lib_name_candidates with CUDA_MAJOR_VERSION 13, the forms that exist on Linux.
    stem = CUDARC_MODULES.get(stem, stem)
    names = [f"lib{stem}.so", f"lib{stem}64.so", f"lib{stem}64_13.so", f"lib{stem}64_130.so"]
    names += [f"lib{stem}.so.{v}" for v in (13, 12, 11, 10, 9, 1)]
    return names


def mapped_path(lib_name: str) -> str:
    """The file the loader mapped for `lib_name` (symlinks resolved)."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6:
                    path = parts[5].strip()
                    if os.path.basename(path).startswith(lib_name.split(".so")[0] + ".so"):
                        return path
    except OSError:
        pass
    return "?"


def main() -> int:
    if len(sys.argv) != 2:
        print(f"usage: {sys.argv[0]} SYMBOLS_FILE", file=sys.stderr)
        return 2
    wanted = OrderedDict()
    with open(sys.argv[1]) as f:
        for n, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2:
                print(f"{sys.argv[1]}:{n}: expected `<stem> <symbol>`, got {line!r}")
                return 2
            wanted.setdefault(parts[0], []).append(parts[1])

    failed = False
    for stem, symbols in wanted.items():
        lib, tried = None, []
        for name in candidates(stem):
            try:
                lib = ctypes.CDLL(name)
                break
            except OSError as e:
                tried.append(f"{name}: {e}")
        if lib is None:
            failed = True
            print(f"{stem}: NOT LOADED ({len(symbols)} symbols unchecked); tried:")
            for t in tried:
                print(f"    {t}")
            continue
        missing = []
        for sym in symbols:
            try:
                getattr(lib, sym)
            except AttributeError:
                missing.append(sym)
        status = "ok" if not missing else f"{len(missing)} MISSING"
        print(f"{stem}: {name} -> {mapped_path(name)}: {len(symbols) - len(missing)}/{len(symbols)} found, {status}")
        for sym in missing:
            print(f"    missing: {sym}")
        failed |= bool(missing)
    print("cuda symbols: " + ("FAILED" if failed else "all found"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
