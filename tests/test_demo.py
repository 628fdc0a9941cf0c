"""`lcr demo` and `lcr pipeline run --local` end to end, as a user runs them, at a small setting:
the Kubeflow pipeline on kfp's local runner, with shards in a folder, local Ray, SQLite MLflow and
the registry's gate. Then the pipeline's re-run logic: unchanged shards skip everything after the
check; an appended drop of new images is trained on, from the champion's weights, and gated."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
SMALL = ["backbone=tiny", "backbone_weights=null", "freeze_stages=0", "epochs=2", "warmup_epochs=0", "batch_size=16",
         "queue_size=32", "image_size=48", "eval_resize=55", "projector_hidden=64", "embed_dim=32",
         "num_projections=8"]
DATA = ["--classes", "4", "--train-per-class", "16", "--test-per-class", "6"]


def lcr(cwd: Path, *args: str) -> str:
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(cwd), "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run([str(BIN / "lcr"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def table_rows(out: str) -> dict[str, list[float]]:
    """rank-1, rank-5, mAP by row of the summary's table (the last fenced block printed)."""
    table = out.rsplit("```", 2)[1]
    return {line.split()[0]: [float(v) for v in line.split()[1:4]] for line in table.splitlines()
            if line.split() and line.split()[0] in ("attention", "gap", "chance")}


def test_the_demo_pipeline_then_a_skip_then_a_warm_started_run_on_new_shards(tmp_path):
    out = lcr(tmp_path, "demo", *DATA, *SMALL)
    rows = table_rows(out)
    assert set(rows) == {"attention", "gap", "chance"} and all(0 <= v <= 100 for r in rows.values() for v in r)
    assert "lcr-demo version 1: **champion** (" in out
    assert f"MLflow UI: mlflow ui --backend-store-uri sqlite:///{tmp_path}/mlflow.db" in out
    # one line per step on the terminal (bar refreshes end in \r); kfp's whole output in the log
    assert len(out.split("\n")) < 60 and "Executing task" not in out and "parameterValues" not in out
    steps_log = Path(re.search(r"^steps' output: (\S+)$", out, re.MULTILINE)[1])
    assert "Executing task" in steps_log.read_text() and "  register             success in " in out
    report = Path(re.findall(r"^- report: (\S+)$", out, re.MULTILINE)[-1])
    assert report.name == "index.html" and report.parent.joinpath("attention.png").is_file()

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    champion = client.get_model_version_by_alias("lcr-demo", "champion")
    trained = client.get_run(client.get_logged_model(champion.source.removeprefix("models:/")).source_run_id)
    metrics = trained.data.metrics
    assert {f"probe/attention/top1_{p}pct" for p in (100, 50, 20)} <= metrics.keys()
    assert {"retrieval/attention/rank1", "retrieval/gap/mAP"} <= metrics.keys()
    assert float(champion.tags["lcr.rank1"]) == pytest.approx(metrics["retrieval/attention/rank1"])
    assert champion.tags["lcr.figures"] == "reused"  # the retrieval step's, not computed again

    params = ["-p", f"shards={tmp_path}/data/shards", "-p", "config=demo", "-p", f"overrides={json.dumps(SMALL)}",
              "-p", f"mlflow_uri=sqlite:///{tmp_path}/mlflow.db", "-p", "model_name=lcr-demo",
              "-p", "run_prefix=lcr-demo", "-p", "mode=local", "-p", f"cache_dir={tmp_path}/runs/features"]
    skipped = lcr(tmp_path, "pipeline", "run", "--local", *params)
    assert re.search(r"Nothing to do: nothing new: the champion was trained on train manifest [0-9a-f]{12}", skipped)
    assert len(client.search_model_versions("name = 'lcr-demo'")) == 1

    options = json.loads((tmp_path / "data/shards/train/manifest.json").read_text())["options"]
    lcr(tmp_path, "shards", "build", "--source", "synthetic", "--out", "data/shards", "--split", "train", "--append",
        "--option", "drop=1", *[f"--option={k}={v}" for k, v in options.items() if k != "drop"])
    again = lcr(tmp_path, "pipeline", "run", "--local", *params)
    decision = re.search(r"lcr-demo version 2: \*\*(champion|challenger)\*\*", again)
    assert decision, again
    version = client.get_model_version("lcr-demo", "2")
    assert version.tags["lcr.decision"] == decision.group(1)
    assert version.tags["lcr.train_manifest_sha256"] != champion.tags["lcr.train_manifest_sha256"]
    warm = client.get_run(client.get_logged_model(version.source.removeprefix("models:/")).source_run_id)
    assert warm.data.tags["lcr.init_from"].startswith("models:/lcr-demo@champion")
