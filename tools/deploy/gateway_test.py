#!/usr/bin/env python3
"""The gateway test: three controlnet-serve replicas behind nginx with the shipped config.

Usage: gateway_test.py path/to/controlnet-serve   (tools/deploy/gateway-test.sh installs nginx)

Runs docker/nginx/nginx.conf and docker/nginx/upstream.conf as shipped, with only the replicas'
addresses, the listen port and the /tmp paths replaced, in front of three replicas on the
embedded model, all on loopback. Checks what docker/README.md promises of the gateway:

  kill      SIGKILL one replica while >= 60 generate requests are in flight: no non-2xx answer
  restart   the killed replica, started again on its port, gets traffic again
  drain     SIGTERM one replica under load: no non-2xx answer; it exits 0 within its grace
  sse       through the gateway, with Accept-Encoding: gzip, the events of /v1/generate/stream
            arrive while the job runs, not all at its end
  body      a 10 MB request body is passed on, not refused with 413

Bounded: at most ~250 requests and GATEWAY_TEST_TIMEOUT seconds (default 600) in all. Prints
one line per check and "N passed, N failed"; exits 1 if any failed. Standard library only.
"""
import base64
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GRACE_SECS = 30  # the replicas' [server] shutdown_grace_secs (the default)
LOAD_REQUESTS = 72  # per load phase; >= 60 must be in flight at the signal
IN_FLIGHT_NEEDED = 60
# Small and quick on the embedded model, yet long enough (a few UNet steps each, with 24 jobs
# queued per replica) that a replica has work when it is killed.
LOAD_BODY = {"prompt": "gateway test", "width": 64, "height": 64, "steps": 6}


def log(msg):
    print(msg, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port, method, path, body=None, headers=None, timeout=180):
    """(status, headers dict, body bytes); status 0 with the error text when no answer came."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        h = {"content-type": "application/json"} if data is not None else {}
        h.update(headers or {})
        conn.request(method, path, body=data, headers=h)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    except (OSError, http.client.HTTPException) as e:
        return 0, {}, str(e).encode()
    finally:
        conn.close()


class Replica:
    def __init__(self, binary, tmp, index):
        self.binary, self.index = binary, index
        self.log_path = os.path.join(tmp, f"replica-{index + 1}.log")
        self.port = None
        self.proc = None

    def start(self):
        """Starts on port 0 the first time, on the same port after that; returns once ready."""
        bind = f"127.0.0.1:{self.port or 0}"
        env = dict(os.environ, RUST_LOG="warn", CNS_SERVER__SHUTDOWN_GRACE_SECS=str(GRACE_SECS))
        logf = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [self.binary, "serve", "--bind", bind],
            stdout=subprocess.PIPE, stderr=logf, env=env,
        )
        line = self.proc.stdout.readline().decode()
        m = re.match(r"listening on http://127\.0\.0\.1:(\d+)", line)
        if not m:
            raise RuntimeError(f"replica {self.index + 1} did not start: {line!r} (log {self.log_path})")
        self.port = int(m.group(1))
        # Keep draining stdout so the child never blocks on a full pipe.
        threading.Thread(target=lambda p=self.proc: p.stdout.read(), daemon=True).start()
        deadline = time.time() + 300
        while time.time() < deadline:
            if request(self.port, "GET", "/ready", timeout=5)[0] == 200:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"replica {self.index + 1} never became ready (log {self.log_path})")

    def metrics(self):
        status, _, body = request(self.port, "GET", "/metrics", timeout=10)
        values = {}
        if status == 200:
            for line in body.decode().splitlines():
                if line and not line.startswith("#"):
                    name, _, value = line.rpartition(" ")
                    values[name] = float(value)
        return values

    def jobs(self):
        """Jobs queued or running on this replica (its /metrics)."""
        m = self.metrics()
        return m.get("engine_queue_depth", 0) + m.get("engine_running_jobs", 0)

    def generate_requests(self):
        return sum(v for k, v in self.metrics().items()
                   if k.startswith("http_requests_total") and 'route="/v1/generate"' in k)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Gateway:
    def __init__(self, tmp, replicas):
        self.port = free_port()
        conf_dir = os.path.join(tmp, "nginx")
        os.makedirs(conf_dir)
        nginx_conf = read(os.path.join(ROOT, "docker/nginx/nginx.conf"))
        upstream_conf = read(os.path.join(ROOT, "docker/nginx/upstream.conf"))
        nginx_conf = replace_exactly(nginx_conf, "listen 8080;", f"listen 127.0.0.1:{self.port};", 1)
        nginx_conf = nginx_conf.replace("/tmp/", conf_dir + "/")
        for r in replicas:
            upstream_conf = replace_exactly(upstream_conf, f"replica-{r.index + 1}:7860",
                                            f"127.0.0.1:{r.port}", 1)
        write(os.path.join(conf_dir, "nginx.conf"), nginx_conf)
        write(os.path.join(conf_dir, "upstream.conf"), upstream_conf)
        os.chmod(tmp, 0o755)
        os.chmod(conf_dir, 0o777)  # workers (nobody, when run as root) write body temp files
        globals_ = "daemon off;" + (" user root;" if os.geteuid() == 0 else "")
        cmd = ["nginx", "-p", conf_dir, "-c", os.path.join(conf_dir, "nginx.conf"), "-g", globals_]
        subprocess.run(cmd + ["-t", "-q"], check=True)
        self.access_log = os.path.join(tmp, "nginx-access.log")
        self.proc = subprocess.Popen(cmd, stdout=open(self.access_log, "wb"),
                                     stderr=open(os.path.join(tmp, "nginx-error.log"), "wb"))
        deadline = time.time() + 10
        while request(self.port, "GET", "/gateway/health", timeout=2)[0] != 200:
            if time.time() > deadline or self.proc.poll() is not None:
                raise RuntimeError("nginx did not start (nginx-error.log)")
            time.sleep(0.1)

    def retried(self):
        """Access-log lines whose request went to more than one replica."""
        return sum(1 for line in open(self.access_log) if re.search(r"upstream=\S+, ", line))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def read(path):
    with open(path) as f:
        return f.read()


def write(path, text):
    with open(path, "w") as f:
        f.write(text)


def replace_exactly(text, old, new, count):
    """The template must contain `old` exactly `count` times: the test runs the shipped file."""
    found = text.count(old)
    if found != count:
        raise RuntimeError(f"expected {old!r} {count} time(s) in the shipped config, found {found}")
    return text.replace(old, new)


def load_with_signal(gateway, victim, action):
    """LOAD_REQUESTS generate requests through the gateway; once >= IN_FLIGHT_NEEDED are in
    flight and the victim holds jobs, `action(victim)` is called. Returns (statuses, notes)."""
    in_flight = [0]
    lock = threading.Lock()

    def one(i):
        with lock:
            in_flight[0] += 1
        try:
            status, _, body = request(gateway.port, "POST", "/v1/generate", dict(LOAD_BODY, seed=i))
            return status, body[:200]
        finally:
            with lock:
                in_flight[0] -= 1

    notes = {}
    with ThreadPoolExecutor(LOAD_REQUESTS) as pool:
        futures = [pool.submit(one, i) for i in range(LOAD_REQUESTS)]
        deadline = time.time() + 60
        while time.time() < deadline:
            with lock:
                n = in_flight[0]
            jobs = victim.jobs()
            if n >= IN_FLIGHT_NEEDED and jobs >= 1:
                notes["in_flight"], notes["victim_jobs"] = n, int(jobs)
                action(victim)
                break
            time.sleep(0.02)
        else:
            notes["error"] = "the load never reached the signal condition"
        results = [f.result() for f in futures]
    return results, notes


def non_2xx(results):
    bad = [(s, b) for s, b in results if not 200 <= s < 300]
    return len(bad), bad[:3]


def noise_png(width, height, seed):
    """An incompressible RGB PNG (stored, not deflated), so its size is known in advance."""
    rng = random.Random(seed)
    raw = b"".join(b"\x00" + rng.randbytes(width * 3) for _ in range(height))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(raw, 0)) + chunk(b"IEND", b""))


def main():
    binary = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else
                             os.path.join(ROOT, "target/debug/controlnet-serve"))
    limit = int(os.environ.get("GATEWAY_TEST_TIMEOUT", "600"))
    # A watchdog: whatever hangs, the test ends (and the children with it) within the limit.
    timer = threading.Timer(limit, lambda: (print(f"gateway test: over {limit} s, aborting",
                                                  flush=True), os.kill(os.getpid(), signal.SIGTERM)))
    timer.daemon = True
    timer.start()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(2))

    tmp = tempfile.mkdtemp(prefix="gateway-test-")
    replicas = [Replica(binary, tmp, i) for i in range(3)]
    gateway = None
    passed, failed = [], []

    def check(name, ok, detail):
        (passed if ok else failed).append(name)
        log(f"{'PASS' if ok else 'FAIL'} {name}: {detail}")

    started = time.time()
    try:
        for r in replicas:
            r.start()
        gateway = Gateway(tmp, replicas)
        log(f"replicas on ports {[r.port for r in replicas]}, gateway on {gateway.port} "
            f"({time.time() - started:.1f} s to start)")

        # kill: SIGKILL replica 1 under load.
        victim = replicas[0]
        results, notes = load_with_signal(gateway, victim, lambda r: r.proc.send_signal(signal.SIGKILL))
        bad, examples = non_2xx(results)
        check("kill", bad == 0 and "error" not in notes,
              f"{len(results)} requests, {bad} non-2xx {examples}; {notes}; "
              f"retried on another replica: {gateway.retried()}")
        victim.proc.wait()

        # restart: the killed replica, on its port, gets generate requests again.
        victim.start()
        time.sleep(6)  # upstream.conf's fail_timeout (5 s): nginx tries it again after that
        with ThreadPoolExecutor(9) as pool:
            after = list(pool.map(lambda i: request(gateway.port, "POST", "/v1/generate",
                                                    dict(LOAD_BODY, seed=1000 + i))[0], range(9)))
        served = victim.generate_requests()
        check("restart", served >= 1 and all(s == 200 for s in after),
              f"restarted replica served {int(served)} of 9 generate requests; statuses {sorted(set(after))}")

        # drain: SIGTERM replica 2 under load; it finishes its jobs and exits 0 within its grace.
        victim = replicas[1]
        signalled = {}

        def terminate(r):
            signalled["at"] = time.time()
            r.proc.send_signal(signal.SIGTERM)

        results, notes = load_with_signal(gateway, victim, terminate)
        try:
            code = victim.proc.wait(timeout=max(1.0, GRACE_SECS + 5 - (time.time() - signalled.get("at", time.time()))))
        except subprocess.TimeoutExpired:
            code = None
        took = time.time() - signalled["at"] if "at" in signalled else float("nan")
        bad, examples = non_2xx(results)
        check("drain", bad == 0 and code == 0 and took <= GRACE_SECS + 1 and "error" not in notes,
              f"{len(results)} requests, {bad} non-2xx {examples}; {notes}; replica exit code {code} "
              f"{took:.1f} s after SIGTERM (grace {GRACE_SECS} s)")
        if victim.proc.poll() is None:
            victim.stop()

        # sse: events arrive while the job runs, with a client that accepts gzip.
        conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=120)
        body = json.dumps({"prompt": "stream test", "width": 128, "height": 128, "steps": 30, "seed": 7})
        t0 = time.time()
        conn.request("POST", "/v1/generate/stream", body=body,
                     headers={"content-type": "application/json", "accept-encoding": "gzip"})
        resp = conn.getresponse()
        encoding = resp.getheader("content-encoding")
        arrivals, done = [], None
        while True:
            line = resp.readline()
            if not line:
                break
            if line.startswith(b"event:"):
                arrivals.append((line[6:].strip().decode(), time.time() - t0))
            elif line.startswith(b"data:") and arrivals and arrivals[-1][0] == "done":
                done = json.loads(line[5:])
                break
        conn.close()
        if done is None:
            check("sse", False, f"status {resp.status}, encoding {encoding}, no done event: {arrivals[:5]}")
        else:
            inference_s = done["timings"]["inference_ms"] / 1000
            first, last = arrivals[0][1], arrivals[-1][1]
            # Buffered, every event would arrive together at the end (spread ~0); streamed, the
            # first (queued) arrives at once and the done event after the whole inference.
            ok = (resp.status == 200 and encoding is None and inference_s >= 0.5
                  and last - first >= 0.5 * inference_s)
            check("sse", ok, f"{len(arrivals)} events, first at {first:.2f} s, done at {last:.2f} s, "
                  f"inference {inference_s:.2f} s, content-encoding {encoding}")

        # body: a 10 MB request (a ControlNet hint as a stored PNG) goes through.
        png = noise_png(1700, 1500, 3)
        big = json.dumps({"prompt": "big body", "width": 64, "height": 64, "steps": 2, "seed": 1,
                          "controls": [{"adapter": "canny",
                                        "image": base64.b64encode(png).decode()}]}).encode()
        status, _, answer = request(gateway.port, "POST", "/v1/generate", big)
        check("body", len(big) >= 10_000_000 and status == 200,
              f"{len(big) / 1e6:.1f} MB body, status {status} {answer[:120] if status != 200 else b''}")
    except Exception as e:  # noqa: BLE001 - any setup failure is a failed run, with its reason
        check("setup", False, repr(e))
    finally:
        if gateway:
            gateway.stop()
        for r in replicas:
            r.stop()
        timer.cancel()

    log(f"gateway test: {len(passed)} passed, {len(failed)} failed ({time.time() - started:.0f} s; "
        f"logs in {tmp})")
    if not failed:
        shutil.rmtree(tmp, ignore_errors=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
