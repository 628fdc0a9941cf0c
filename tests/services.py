"""Helpers for real services started as subprocesses on 127.0.0.1: a free port, waiting for an HTTP
answer, a Ray head, stopping by process group or session, and a loopback HTTP recorder. Used by the
fixtures and tests, and by benchmarks/loader.py and benchmarks/faults.py."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"no answer from {url} within {timeout} s")


def terminal_sigint() -> None:
    """A child's `preexec_fn`: SIGINT raises KeyboardInterrupt, as in a terminal's foreground job (a
    test run in the background inherits it ignored, and Python keeps it so)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for(condition, timeout: float, proc: subprocess.Popen | None = None):
    """`condition()`'s first truthy value, polled every half second; fails when `proc` (the process
    that should bring it about) exits first."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert proc is None or proc.poll() is None, f"{proc.args[0]} exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"still waiting after {timeout} s"
        time.sleep(0.5)
    return value


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def session_pids(session: int) -> list[int]:
    listing = subprocess.run(["ps", "-o", "pid=", "-s", str(session)], capture_output=True, text=True,
                             check=False).stdout  # ps exits 1 when the session is empty
    return [int(pid) for pid in listing.split()]


def stop_session(proc: subprocess.Popen, grace: float = 5, timeout: float = 30) -> list[int]:
    """SIGTERM the head's process group (`ray start --block` then takes ~30 s to wind down, so
    after `grace` seconds SIGKILL), then SIGKILL whatever of its session is left; returns the pids
    still there after `timeout` seconds."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    for pid in session_pids(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while (left := session_pids(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def start_ray_head(root: Path, env: dict[str, str], attempts: int = 3) -> tuple[subprocess.Popen, str, str]:
    """`ray start --head` on loopback with 2 CPUs, in a session of its own, its temp dir root/ray and
    its output in root/head.log; returns it, its GCS address and its dashboard's URL. The two ports
    are free when chosen, but Ray's own processes, which take ports at random, can take one first
    (seen in CI: the dashboard's): then the head starts again on new ones."""
    for attempt in range(1, attempts + 1):
        gcs_port, dashboard_port = free_port(), free_port()
        with open(root / "head.log", "a") as log:
            proc = subprocess.Popen(
                [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--num-cpus=2",
                 "--num-gpus=0", "--node-ip-address=127.0.0.1", f"--port={gcs_port}", "--include-dashboard=true",
                 "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--disable-usage-stats",
                 f"--temp-dir={root / 'ray'}"],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=root)
        dashboard = f"http://127.0.0.1:{dashboard_port}"
        try:
            wait_http(f"{dashboard}/api/version", 180, proc)
            return proc, f"127.0.0.1:{gcs_port}", dashboard
        except (RuntimeError, TimeoutError):
            stop_session(proc)
            if attempt == attempts:
                raise


class Recorder:
    """A loopback HTTP server that records every request and answers from `routes`: a list of
    (method, path regex, handler); a handler gets (match, body) and returns (status, JSON body).
    It stands in for APIs that cannot run here (Kubernetes, Kubeflow Pipelines): tests assert on
    what a client sent and check how it handles the answers a real server gives."""

    def __init__(self, routes):
        self.requests: list[tuple[str, str, object]] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                recorder.requests.append((self.command, self.path, body))
                for method, pattern, handler in routes:
                    found = re.fullmatch(pattern, self.path.split("?")[0])
                    if method == self.command and found:
                        status, reply = handler(found, body)
                        break
                else:
                    status, reply = 404, {"message": f"no route for {self.command} {self.path}"}
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = answer

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def bodies(self, method: str, pattern: str) -> list:
        return [body for m, path, body in self.requests if m == method and re.fullmatch(pattern, path.split("?")[0])]
