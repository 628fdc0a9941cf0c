"""Shared fixtures: real services started as subprocesses on 127.0.0.1 and stopped by process id."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.services import free_port, stop, wait_http

VENV_BIN = Path(sys.executable).parent

# A local ray.init() may write ~/.ray/auth_token, after which a head started later demands it.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3-protocol server on loopback; sets the AWS_* variables boto3 and pyarrow read."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "MLFLOW_S3_ENDPOINT_URL": endpoint,
    }
    saved = {k: os.environ.get(k) for k in env}
    try:
        wait_http(endpoint + "/moto-api/", 60, proc)
        os.environ.update(env)
        yield endpoint
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        stop(proc)
        log.close()


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh, empty bucket on the S3 server; returns its name."""
    import boto3

    name = "lcr-" + request.node.name.lower().replace("_", "-")[:40].strip("-") + f"-{free_port()}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on loopback with a SQLite store; returns its tracking URI."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [str(VENV_BIN / "mlflow"), "server",
         "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--artifacts-destination", str(root / "artifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=root,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(uri + "/health", 120, proc)
        yield uri
    finally:
        stop(proc)
        log.close()
