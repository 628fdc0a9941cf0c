"""Helpers for real services started as subprocesses on 127.0.0.1: a free port, waiting for an HTTP
answer, stopping by process group. Used by the fixtures in conftest.py and by benchmarks/loader.py."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


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
