"""`lcr demo` end to end, as a user runs it, at a smaller setting: shards, Ray Train, MLflow, evaluation."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from mlflow import MlflowClient

LCR = Path(sys.executable).parent / "lcr"


def test_demo_runs_end_to_end_and_prints_the_metrics(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run(
        [str(LCR), "demo", "--classes", "4", "--train-per-class", "16", "--test-per-class", "4",
         "epochs=2", "warmup_epochs=0", "batch_size=16", "queue_size=32", "image_size=64", "eval_resize=73",
         "projector_hidden=64", "embed_dim=32"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(r"pooling\s+rank-1\s+rank-5\s+mAP", out), out
    rows = {line.split()[0]: line.split()[1:4] for line in out.splitlines()
            if line.split() and line.split()[0] in ("attention", "gap", "chance")}
    assert set(rows) == {"attention", "gap", "chance"}
    for values in rows.values():
        assert all(0.0 <= float(v) <= 100.0 for v in values)
    assert (tmp_path / "data/shards/train/manifest.json").is_file()
    report = Path(re.search(r"report: (\S+)", out).group(1))
    assert report.is_file() and report.parent.joinpath("attention.png").is_file()
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")  # the embedded default store
    experiment = client.get_experiment_by_name("lcr-demo")
    names = {run.info.run_name for run in client.search_runs([experiment.experiment_id])}
    assert {"lcr-demo", "lcr-demo-evaluate"} <= names
