#!/usr/bin/env python3
"""Starts `controlnet-serve serve` on a free port (the built-in tiny model and its generated
ControlNets), waits for GET /ready, sends one native generate request with a ControlNet
(`canny` adapter, a committed hint image) asking for `Accept: image/png`, checks that a PNG of
the requested size comes back, then stops the server with SIGTERM. Standard library only.

The server's own output is echoed with a `[server]` prefix. Exit 0 when the image came back.
"""

import argparse
import base64
import json
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ANSI = re.compile(r"\x1b\[[0-9;]*m")
HINT = ROOT / "crates/diffusion/tests/fixtures/pipeline_hint_a.png"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bin", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="f16")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--timeout", type=float, default=60, help="seconds for the whole check")
    p.add_argument("--png", type=Path, help="write the image here")
    p.add_argument("--ld-library-path", help="LD_LIBRARY_PATH of the server (the CUDA libraries)")
    args = p.parse_args()
    deadline = time.monotonic() + args.timeout

    cmd = [args.bin, "serve", "--device", args.device, "--dtype", args.dtype, "--bind", "127.0.0.1:0"]
    print("starting: " + " ".join(cmd), flush=True)
    env = dict(os.environ, NO_COLOR="1")
    if args.ld_library_path is not None:
        env["LD_LIBRARY_PATH"] = args.ld_library_path
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    base = {}
    found = threading.Event()

    def pump():
        for line in proc.stdout:
            line = ANSI.sub("", line)
            print("[server] " + line.rstrip(), flush=True)
            if "listening on http://" in line and not found.is_set():
                base["url"] = "http://" + line.split("listening on http://", 1)[1].split()[0]
                found.set()
        found.set()

    threading.Thread(target=pump, daemon=True).start()

    def on_term(signum, frame):
        raise SystemExit(f"stopped by signal {signum}")

    # A timeout's SIGTERM still stops the server (in `finally`), so that it holds no device memory.
    signal.signal(signal.SIGTERM, on_term)
    try:
        return check(args, proc, base, found, deadline)
    finally:
        stop(proc)


def left(deadline: float) -> float:
    return max(0.1, deadline - time.monotonic())


def check(args, proc, base, found, deadline) -> int:
    if not found.wait(left(deadline)) or "url" not in base:
        print(f"FAIL: no 'listening on' line (server exit code {proc.poll()})")
        return 1
    url = base["url"]
    print(f"server at {url}; waiting for /ready", flush=True)
    start = time.monotonic()
    while True:
        if proc.poll() is not None:
            print(f"FAIL: the server exited with {proc.returncode} before it was ready")
            return 1
        try:
            with urllib.request.urlopen(url + "/ready", timeout=5) as r:
                if r.status == 200:
                    break
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            print("FAIL: not ready in time")
            return 1
        time.sleep(0.25)
    print(f"ready after {time.monotonic() - start:.1f} s", flush=True)

    body = {
        "prompt": "a house by a lake",
        "negative_prompt": "blurry",
        "width": args.size,
        "height": args.size,
        "steps": args.steps,
        "seed": 1,
        "scheduler": "unipc",
        "controls": [{"adapter": "canny", "image": base64.b64encode(HINT.read_bytes()).decode()}],
    }
    req = urllib.request.Request(
        url + "/v1/generate",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", "accept": "image/png"},
        method="POST",
    )
    start = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=left(deadline)) as r:
            status, ctype, data = r.status, r.headers.get("content-type", ""), r.read()
            seed = r.headers.get("x-seed")
    except urllib.error.HTTPError as e:
        print(f"FAIL: POST /v1/generate answered {e.code}: {e.read()[:2000]!r}")
        return 1
    except (urllib.error.URLError, OSError) as e:
        print(f"FAIL: POST /v1/generate: {e}")
        return 1
    seconds = time.monotonic() - start
    if status != 200 or not ctype.startswith("image/png"):
        print(f"FAIL: status {status}, content-type {ctype!r}")
        return 1
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        print(f"FAIL: not a PNG ({len(data)} bytes, starts {data[:16]!r})")
        return 1
    width, height = struct.unpack(">II", data[16:24])
    if (width, height) != (args.size, args.size):
        print(f"FAIL: PNG is {width}x{height}, asked {args.size}x{args.size}")
        return 1
    if args.png:
        args.png.write_bytes(data)
    print(
        f"ok: POST /v1/generate ({args.steps} steps, one ControlNet) gave a {width}x{height} PNG "
        f"of {len(data)} bytes in {seconds:.2f} s (x-seed {seed})",
        flush=True,
    )
    return 0


def stop(proc) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
        print(f"server stopped (exit code {proc.returncode})", flush=True)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        print("server did not stop on SIGTERM within 15 s: killed", flush=True)


if __name__ == "__main__":
    sys.exit(main())
