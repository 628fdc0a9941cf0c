"""`lcr pretrain` end to end on a real Ray cluster on loopback: DDP over gloo with 2 workers, MLflow,
fault tolerance, stop/resume (at an epoch's end through an S3 bucket, and mid-epoch), a damaged
checkpoint skipped on resume, pruning, no secret in Ray's logs, and a job submitted through the job API.
Faults of the driver and the workers: Ctrl-C (as `lcr pretrain` on its own local Ray), a driver
killed with kill -9 and then resumed, a worker killed with kill -9.

One Ray head (`ray start --head --block` on 127.0.0.1, 2 CPUs, dashboard on a free port) serves the
whole module: the tests' own `pretrain()` calls join it as a driver, and the job test submits to it.
It is stopped by signalling exactly the processes it started (its session), not with `ray stop`,
which would kill every Ray process on this shared machine.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import boto3
import mlflow
import pytest
import ray
import torch
import yaml
from ray.job_submission import JobStatus, JobSubmissionClient

from components import checkpoint, tracking
from components.checkpoint import CHECKPOINT_FILE
from components.launch import LaunchError, Target, launch
from components.pretrain import MODEL_URI_TAG, RAY_SNAPSHOT, PretrainError, pretrain
from components.shards import build_shards
from lcr_core.config import load_config
from lcr_core.model import build_model
from tests.conftest import VENV_BIN
from tests.services import session_pids, start_ray_head, stop_session, terminal_sigint, wait_for

pytestmark = pytest.mark.slow

STEPS_PER_EPOCH = 4  # 32 training images, global batch 8
TINY = ["backbone=tiny", "image_size=32", "eval_resize=32", "batch_size=8", "num_workers=2", "queue_size=16",
        "embed_dim=16", "projector_hidden=32", "num_projections=4", "epochs=2", "loader_workers=1",
        "collective_timeout_s=60", "cpus_per_worker=1", "checkpoint_every_steps=0"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    build_shards("synthetic", str(out), options={"num_classes": 4, "train_per_class": 8, "test_per_class": 1,
                                                 "image_size": 32}, splits=["train"], progress=False)
    return out


@dataclass
class Cluster:
    dashboard: str  # the job API's address
    temp_dir: Path  # Ray's sessions, logs included
    address: str  # the GCS, for drivers that join it (RAY_ADDRESS)


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A Ray head on loopback, which this process joins."""
    root = tmp_path_factory.mktemp("ray")
    proc, address, dashboard = start_ray_head(root, dict(os.environ, RAY_AUTH_MODE="disabled",
                                                         RAY_USAGE_STATS_ENABLED="0"))
    try:
        ray.init(address=address)
        yield Cluster(dashboard, root / "ray", address)
    finally:
        ray.shutdown()
        left = stop_session(proc)
    assert left == [], "the Ray head left processes behind"


def tiny_config(shards: Path, *overrides: str, **extra):
    return replace(load_config(None, [*TINY, f"shards={shards}", *overrides]), extra=extra)


def history(client: mlflow.MlflowClient, run_id: str, metric: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, metric))


def checkpoint_names(run: Path) -> list[str]:
    return sorted(p.name for p in run.glob("checkpoint_0*"))


def files_holding(root: Path, text: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and text.encode() in p.read_bytes()]


def same_weights(folder: Path, whole: list[dict]) -> bool:
    """Each rank's dumped final weights equal the uninterrupted run's, bit for bit."""
    for rank in range(2):
        resumed = torch.load(folder / f"rank{rank}.pt", weights_only=True)
        if any(not torch.equal(resumed[name], tensor) for name, tensor in whole[rank].items()):
            return False
    return True


def parameter_names(cfg) -> set[str]:
    return {name for name, _ in build_model(cfg).named_parameters()}


def embeddings(state: dict, cfg) -> torch.Tensor:
    model = build_model(cfg)
    model.load_state_dict(state)
    with torch.no_grad():
        return model.eval().embed(probe_images())


def probe_images() -> torch.Tensor:
    return torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, shards, mlflow_server, tmp_path_factory):
    """One uninterrupted 2-epoch run tracked on the MLflow server; each rank dumps its final weights."""
    root = tmp_path_factory.mktemp("uninterrupted")
    cfg = tiny_config(shards, "run_name=whole", f"storage_path={root / 'runs'}",
                      dump_final_weights=str(root / "weights"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        result = pretrain(cfg)
    ranks = [torch.load(root / "weights" / f"rank{r}.pt", weights_only=True) for r in range(2)]
    return cfg, result, ranks


def test_two_workers_hold_the_same_weights_and_log_to_mlflow(uninterrupted, mlflow_server):
    cfg, result, (rank0, rank1) = uninterrupted
    assert result.metrics["global_step"] == 2 * STEPS_PER_EPOCH and result.metrics["epoch"] == 2
    # DDP keeps the parameters equal; the queue is filled with the keys gathered from both ranks.
    # (BatchNorm running statistics are per rank between steps: DDP re-broadcasts rank 0's each step.)
    for name in parameter_names(cfg) | {"queue", "queue_ptr"}:
        assert torch.equal(rank0[name], rank1[name]), name
    assert not torch.equal(rank0["queue"], build_model(cfg).queue)
    saved = checkpoint.load_checkpoint(result.checkpoint_uri)
    assert Path(result.checkpoint_uri).name == f"checkpoint_{2 * STEPS_PER_EPOCH:08d}"
    assert all(torch.equal(saved["model"][k], v) for k, v in rank0.items())

    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["variant"] == "lcr" and run.data.params["num_workers"] == "2"
    steps = list(range(1, 2 * STEPS_PER_EPOCH + 1))
    for metric in ("loss", "loss_cl", "loss_kl", "lr", "images_per_s", "data_skipped"):
        assert [step for step, _ in history(client, result.mlflow_run_id, metric)] == steps, metric
    lrs = [value for _, value in history(client, result.mlflow_run_id, "lr")]
    assert lrs[0] == pytest.approx(cfg.scaled_lr) and lrs == sorted(lrs, reverse=True)  # cosine, no warmup
    assert all(value > 0 for _, value in history(client, result.mlflow_run_id, "images_per_s"))
    epochs = [value for _, value in history(client, result.mlflow_run_id, "epoch")]
    assert epochs == [(step + 1) / STEPS_PER_EPOCH for step in range(2 * STEPS_PER_EPOCH)]
    artifacts = client.list_artifacts(result.mlflow_run_id, "checkpoint")
    assert [a.path for a in artifacts] == ["checkpoint/checkpoint.pt", "checkpoint/checkpoint.sha256"]

    mlflow.set_tracking_uri(mlflow_server)
    logged = tracking.load_encoder(result.model_uri)
    with torch.no_grad():
        logged_embeddings = logged.embed(probe_images())
    assert torch.allclose(logged_embeddings, embeddings(rank0, cfg), atol=1e-6)


def test_a_failed_worker_resumes_from_the_last_checkpoint(ray_cluster, shards, mlflow_server, tmp_path):
    every, fail_at = 2, 3
    marker = tmp_path / "failed-once"
    cfg = tiny_config(shards, "run_name=faulty", f"storage_path={tmp_path / 'runs'}", "epochs=1",
                      f"checkpoint_every_steps={every}", "max_failures=1",
                      fail_at_step=fail_at, fail_marker=str(marker))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        result = pretrain(cfg)
    assert marker.read_text() == f"failed at step {fail_at}\n"
    # Finished the epoch once: had the restart begun the epoch again, global_step would exceed 4.
    assert result.metrics["global_step"] == STEPS_PER_EPOCH and result.metrics["epoch"] == 1
    client = mlflow.MlflowClient(mlflow_server)
    resumed = history(client, result.mlflow_run_id, "resumed_from_step")
    assert [value for _, value in resumed] == [2.0]
    assert fail_at - resumed[0][1] <= every  # at most one checkpoint interval of work lost
    assert {step for step, _ in history(client, result.mlflow_run_id, "loss")} >= {3, 4}
    assert sorted(p.name for p in (tmp_path / "runs" / "faulty").glob("checkpoint_0*")) == [
        "checkpoint_00000002", "checkpoint_00000004"]


def test_a_diverging_run_ends_at_once_failed_and_logs_no_model(ray_cluster, shards, mlflow_server, tmp_path):
    cfg = tiny_config(shards, "run_name=diverging", f"storage_path={tmp_path / 'runs'}", "lr=1e30",
                      "checkpoint_every_steps=1")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        with pytest.raises(PretrainError, match=r"diverged: the loss is .* at step \d+") as err:
            pretrain(cfg)
    assert "\n" not in str(err.value)
    client = mlflow.MlflowClient(mlflow_server)
    [run] = client.search_runs([client.get_experiment_by_name(cfg.mlflow_experiment).experiment_id],
                               "tags.`lcr.run_name` = 'diverging'")
    assert run.info.status == "FAILED" and MODEL_URI_TAG not in run.data.tags
    assert not history(client, run.info.run_id, "resumed_from_step")  # ended at once: no retry


def test_stop_and_resume_through_a_bucket_matches_the_uninterrupted_run_and_leaks_no_secret(
        ray_cluster, shards, s3_bucket, uninterrupted, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # the default tracking store: ./mlflow.db
    secret = f"lcr-fake-secret-{uuid.uuid4().hex}"  # the S3 server takes any secret
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    storage_path = f"s3://{s3_bucket}/runs"
    first = pretrain(tiny_config(shards, "run_name=halves", f"storage_path={storage_path}",
                                 stop_after_epoch=1))
    assert first.checkpoint_uri == f"{storage_path}/halves/checkpoint_{STEPS_PER_EPOCH:08d}"
    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3_bucket)["Contents"]}
    assert f"runs/halves/checkpoint_{STEPS_PER_EPOCH:08d}/checkpoint.pt" in keys

    cfg = tiny_config(shards, "run_name=halves", f"storage_path={storage_path}",
                      dump_final_weights=str(tmp_path / "weights"))
    second = pretrain(cfg)
    assert second.checkpoint_uri == f"{storage_path}/halves/checkpoint_{2 * STEPS_PER_EPOCH:08d}"
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert [v for _, v in history(client, second.mlflow_run_id, "resumed_from_step")] == [STEPS_PER_EPOCH]
    assert [s for s, _ in history(client, second.mlflow_run_id, "loss")] == list(
        range(STEPS_PER_EPOCH + 1, 2 * STEPS_PER_EPOCH + 1))

    # Same data order, RNG states, optimizer and schedule: bit-identical to the uninterrupted run.
    _, _, whole = uninterrupted
    assert same_weights(tmp_path / "weights", whole)
    restored = tracking.load_encoder(second.checkpoint_uri)
    assert all(torch.equal(restored.state_dict()[k], v) for k, v in whole[0].items())
    # The workers reached the bucket, yet Ray's logs and session files never saw the secret.
    assert files_holding(ray_cluster.temp_dir, secret) == []


STOP_STEP = STEPS_PER_EPOCH + 2  # inside the second epoch


@pytest.fixture(scope="module")
def midway(ray_cluster, shards, tmp_path_factory):
    """A run with a checkpoint at every step, stopped inside its second epoch and then resumed to its
    end; returns its folder, both results and the checkpoints left when it stopped."""
    root = tmp_path_factory.mktemp("midway")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.chdir(root)
        first = pretrain(midway_config(root, shards, stop_after_step=STOP_STEP))
        kept = checkpoint_names(root / "runs" / "midway")
        second = pretrain(midway_config(root, shards, dump_final_weights=str(root / "weights")))
    return root, first, kept, second


def midway_config(root: Path, shards: Path, **extra):
    return tiny_config(shards, "run_name=midway", f"storage_path={root / 'runs'}", "checkpoint_every_steps=1",
                       **extra)


def test_resume_mid_epoch_matches_the_uninterrupted_run_and_keeps_the_last_checkpoints(midway, uninterrupted):
    root, first, kept, second = midway
    assert first.checkpoint_uri == str(root / "runs" / "midway" / f"checkpoint_{STOP_STEP:08d}")
    assert first.metrics["global_step"] == STOP_STEP and first.metrics["step_in_epoch"] == 2
    # keep_checkpoints (3 by default): Ray deleted the older ones as new ones came, never the latest.
    assert kept == [f"checkpoint_{step:08d}" for step in range(STOP_STEP - 2, STOP_STEP + 1)]
    assert checkpoint_names(root / "runs" / "midway") == [
        f"checkpoint_{step:08d}" for step in range(2 * STEPS_PER_EPOCH - 2, 2 * STEPS_PER_EPOCH + 1)]
    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    assert [v for _, v in history(client, second.mlflow_run_id, "resumed_from_step")] == [STOP_STEP]
    assert [s for s, _ in history(client, second.mlflow_run_id, "loss")] == list(
        range(STOP_STEP + 1, 2 * STEPS_PER_EPOCH + 1))
    _, _, whole = uninterrupted
    assert same_weights(root / "weights", whole)


def test_a_damaged_latest_checkpoint_is_skipped_on_resume(midway, shards, uninterrupted):
    root, *_ = midway
    run = root / "runs" / "midway"
    damaged = run / f"checkpoint_{2 * STEPS_PER_EPOCH:08d}" / CHECKPOINT_FILE
    damaged.write_bytes(damaged.read_bytes()[:4096])  # an upload cut short
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.chdir(root)
        result = pretrain(midway_config(root, shards, dump_final_weights=str(root / "weights-again")))
    previous = 2 * STEPS_PER_EPOCH - 1
    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    assert [v for _, v in history(client, result.mlflow_run_id, "resumed_from_step")] == [previous]
    warning = client.get_run(result.mlflow_run_id).data.tags["lcr.warning.skipped_checkpoint"]
    assert warning.startswith(f"checkpoint {damaged}: truncated or corrupt")
    assert client.get_run(result.mlflow_run_id).info.status == "FINISHED"
    # The step is written again beside the damaged folder, which Ray still lists (and prunes later).
    assert result.checkpoint_uri == str(run / f"checkpoint_{2 * STEPS_PER_EPOCH:08d}-2")
    assert checkpoint_names(run) == [f"checkpoint_{previous:08d}", f"checkpoint_{previous + 1:08d}",
                                     f"checkpoint_{previous + 1:08d}-2"]
    _, _, whole = uninterrupted
    assert same_weights(root / "weights-again", whole)
    # `--model runs/NAME`: the run folder gives its newest intact checkpoint.
    restored = tracking.load_encoder(run)
    assert all(torch.equal(restored.state_dict()[k], v) for k, v in whole[0].items())

    # Deleting the newest by hand (Ray's latest) makes Ray refuse to resume: an empty stand-in is made.
    shutil.rmtree(run / f"checkpoint_{previous + 1:08d}-2")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.chdir(root)
        again = pretrain(midway_config(root, shards, dump_final_weights=str(root / "weights-third")))
    assert again.checkpoint_uri == str(run / f"checkpoint_{previous + 1:08d}-3")
    assert [v for _, v in history(client, again.mlflow_run_id, "resumed_from_step")] == [previous]
    assert same_weights(root / "weights-third", whole)


def test_a_job_submitted_to_the_cluster_succeeds(ray_cluster, shards, tmp_path, monkeypatch):
    """The pipeline's `ray-job` mode: `lcr pretrain` submitted to the job server, polled, and its
    result read back from MLflow."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    cfg = load_config(None, [*TINY, f"shards={shards}", "epochs=1", "run_name=job",
                             f"storage_path={tmp_path / 'runs'}"])
    target = Target("ray-job", ray_cluster.dashboard, command=f"{VENV_BIN / 'python'} -m components.cli",
                    poll_s=1, timeout_s=300)
    result = launch(cfg, target)
    assert result.checkpoint_uri == str(tmp_path / "runs" / "job" / f"checkpoint_{STEPS_PER_EPOCH:08d}")
    store = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = store.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.tags["lcr.model_uri"] == result.model_uri
    assert result.model_uri.startswith("models:/")
    assert len(history(store, run.info.run_id, "loss")) == STEPS_PER_EPOCH
    # Artefacts sit beside the database, not in the working directory of whichever process logged.
    run_artifacts = tmp_path / "mlartifacts" / "lcr" / run.info.run_id / "artifacts"
    assert (run_artifacts / "checkpoint" / "checkpoint.pt").is_file()
    (job,) = [j for j in JobSubmissionClient(ray_cluster.dashboard).list_jobs()
              if (j.metadata or {}).get("lcr.run_name") == "job"]
    assert job.status == JobStatus.SUCCEEDED and "pretrain" in job.entrypoint and "AWS_SECRET" not in job.entrypoint


def test_a_failing_job_fails_the_launch_with_its_last_log_lines(ray_cluster, shards, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    cfg = tiny_config(shards, "epochs=1", "run_name=job-fails", "max_failures=0", f"storage_path={tmp_path / 'runs'}",
                      fail_at_step=1, fail_marker=str(tmp_path / "failed"))
    target = Target("ray-job", ray_cluster.dashboard, command=f"{VENV_BIN / 'python'} -m components.cli",
                    poll_s=1, timeout_s=300)
    with pytest.raises(LaunchError) as failed:
        launch(cfg, target)
    message = str(failed.value)
    assert re.match(r"Ray job job-fails-\d{8}-\d{6} FAILED; its last log lines:\n", message), message
    assert "injected failure after global step 1" in message and len(message.splitlines()) <= 21


# ---------------------------------------------------------------------------------------------
# Faults of the driver and the workers

def cli_driver(root: Path, *overrides: str, ray_address: str | None = None) -> subprocess.Popen:
    """`lcr pretrain` in a session of its own, tracked in root/mlflow.db, printing to root/out.txt and
    root/err.txt; on a local Ray instance of its own unless `ray_address` names a cluster to join."""
    tracking.prepare_experiment(f"sqlite:///{root}/mlflow.db", "lcr")  # one process migrates a fresh store
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{root}/mlflow.db", RAY_AUTH_MODE="disabled",
               RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    with open(root / "out.txt", "w") as out, open(root / "err.txt", "w") as err:
        return subprocess.Popen([str(VENV_BIN / "lcr"), "pretrain", *TINY, *overrides], stdout=out, stderr=err,
                                env=env, cwd=root, start_new_session=True, preexec_fn=terminal_sigint)


def training_run(client: mlflow.MlflowClient, run_name: str) -> str | None:
    """The id of `run_name`'s MLflow run once it has logged a training step."""
    experiment = client.get_experiment_by_name("lcr").experiment_id
    runs = client.search_runs([experiment], f"tags.`lcr.run_name` = '{run_name}'")
    return runs[0].info.run_id if runs and client.get_metric_history(runs[0].info.run_id, "loss") else None


def train_workers(dashboard: str) -> list[int]:
    """The pids of the cluster's live Ray Train workers, as its state API lists them: a process
    listing by title also catches the workers' DataLoader processes, and only the cluster knows
    which processes belong to it."""
    from ray.util.state import list_actors

    actors = list_actors(address=dashboard, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
                         raise_on_missing_output=False)
    return [actor.pid for actor in actors if actor.pid]


def test_ctrl_c_stops_the_workers_marks_the_run_killed_and_leaves_no_ray_process(shards, tmp_path):
    """A terminal's Ctrl-C (SIGINT to the driver's process group) once training runs; the driver shows
    its config, rank 0's progress bar and nothing else of Ray's processes, whose output is logged."""
    proc = cli_driver(tmp_path, f"shards={shards}", "run_name=ctrl-c", f"storage_path={tmp_path / 'runs'}",
                      "epochs=500")
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        run_id = wait_for(lambda: training_run(client, "ctrl-c"), 300, proc)
        started = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=120) == 130 and time.monotonic() - started < 60
        wait_for(lambda: not session_pids(proc.pid), 30)  # no Ray process of its local instance is left
    finally:
        stop_session(proc)
    assert client.get_run(run_id).info.status == "KILLED"
    out, err = (tmp_path / "out.txt").read_text(), (tmp_path / "err.txt").read_text()
    assert "interrupted: stopping the workers…\n" in err and err.endswith("lcr pretrain: interrupted\n")
    printed = yaml.safe_load(out.split("worker logs: ")[0])
    assert printed["run_name"] == "ctrl-c" and printed["epochs"] == 500 and "lr" not in printed
    assert "pretrain ctrl-c" in err or "epoch 1/500" in err  # rank 0's bar
    assert "(RayTrainWorker" not in out + err and "(TrainController" not in out + err
    [log] = (tmp_path / "runs" / "ctrl-c" / "logs").glob("*.log")
    assert f"worker logs: {log}\n" in out
    assert "(RayTrainWorker pid=" in log.read_text()


def test_a_run_left_running_by_a_driver_killed_with_sigkill_is_continued_by_its_resume(
        ray_cluster, shards, tmp_path, monkeypatch):
    overrides = ["run_name=sigkill", f"storage_path={tmp_path / 'runs'}", "epochs=12"]
    proc = cli_driver(tmp_path, f"shards={shards}", *overrides, ray_address=ray_cluster.address)
    snapshot = tmp_path / "runs" / "sigkill" / RAY_SNAPSHOT  # Ray resumes from the checkpoints it lists
    try:
        wait_for(lambda: snapshot.exists() and f"checkpoint_{STEPS_PER_EPOCH:08d}" in snapshot.read_text(), 300, proc)
        proc.kill()  # the driver alone; Ray ends its job's actors, the workers among them
        proc.wait()
    finally:
        stop_session(proc)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    [killed] = client.search_runs([client.get_experiment_by_name("lcr").experiment_id])
    assert killed.info.status == "RUNNING"
    wait_for(lambda: not train_workers(ray_cluster.dashboard), 60)

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    result = pretrain(tiny_config(shards, *overrides))
    [run] = client.search_runs([client.get_experiment_by_name("lcr").experiment_id])
    assert run.info.run_id == killed.info.run_id == result.mlflow_run_id and run.info.status == "FINISHED"
    resumed = [value for _, value in history(client, run.info.run_id, "resumed_from_step")]
    assert len(resumed) == 1 and resumed[0] >= STEPS_PER_EPOCH
    assert result.metrics["global_step"] == 12 * STEPS_PER_EPOCH
    assert {step for step, _ in history(client, run.info.run_id, "loss")} == set(range(1, 12 * STEPS_PER_EPOCH + 1))


def test_a_worker_killed_with_sigkill_is_named_in_the_error(ray_cluster, shards, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    # long enough to be killed on a loaded machine, short enough to end soon if no kill came
    cfg = tiny_config(shards, "run_name=killed-worker", f"storage_path={tmp_path / 'runs'}", "epochs=150",
                      "max_failures=0")
    wait_for(lambda: not train_workers(ray_cluster.dashboard), 60)
    # The killer is a process of its own: as a thread of this one it was seen starved while the driver
    # waited on Ray. It waits for a checkpoint: Ray Train restarts a worker group that dies while
    # it starts up without counting a failure.
    killer = subprocess.Popen(
        [sys.executable, "-c", "import os, signal, sys\n"
         "from pathlib import Path\n"
         "from tests.test_pretrain import train_workers, wait_for\n"
         "wait_for(lambda: any(Path(sys.argv[2]).glob('checkpoint_0*')), 300)\n"
         "pids = wait_for(lambda: len(found := train_workers(sys.argv[1])) == 2 and found, 60)\n"
         "os.kill(pids[-1], signal.SIGKILL)\n"
         "print(pids[-1], flush=True)\n", ray_cluster.dashboard, str(tmp_path / "runs" / "killed-worker")],
        cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pretrain(cfg)
        failure = None
    except PretrainError as err:
        failure = str(err)
    finally:
        try:  # it exits after the kill; it waits no more than a minute for workers
            out, problem = killer.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            killer.kill()
            out, problem = killer.communicate()
    assert killer.returncode == 0, f"no worker was killed: {problem[-2000:]}"
    assert failure is not None, "the run ended normally though a worker was killed"
    killed = [int(out)]
    assert re.fullmatch(rf"run 'killed-worker' failed: worker rank [01] died \(process {killed[0]} on \S+ ended "
                        r"without a Python error: killed, e\.g\. by SIGKILL or the OOM killer, or crashed\)",
                        failure), failure
