"""`lcr tune`: a real Ray Tune sweep of real `lcr pretrain` trials on the synthetic set, logged to a
real `mlflow server`; the hold-out split, the space file and the MLflow parent/child runs."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image

from components import storage
from components.data import read_manifest
from components.pretrain import RAY_SNAPSHOT
from components.shards import build_shards
from components.tune import (
    OBJECTIVE,
    PARENT_TAG,
    FinishingASHA,
    TuneError,
    ensure_holdout,
    heat_map,
    read_space,
    sweep,
)
from lcr_core.config import load_config
from tests.conftest import VENV_BIN
from tests.services import terminal_sigint, wait_for

TINY = ["backbone=tiny", "image_size=32", "eval_resize=32", "batch_size=8", "num_workers=1", "queue_size=16",
        "embed_dim=16", "projector_hidden=32", "num_projections=4", "epochs=2", "loader_workers=0",
        "collective_timeout_s=60", "cpus_per_worker=1", "checkpoint_every_steps=0", "eval_every_epochs=1",
        "max_failures=0", "mlflow_experiment=lcr-tune-test"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    build_shards("synthetic", str(out), options={"num_classes": 4, "train_per_class": 10, "test_per_class": 2,
                                                 "image_size": 32}, progress=False)
    return out


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.shutdown()  # an instance an earlier test's `lcr pretrain` left in this process
    ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False)  # the dashboard cleans up ASHA's stops
    yield
    ray.shutdown()


def tiny(shards, tmp_path, *overrides):
    return load_config(None, [*TINY, f"shards={shards}", f"storage_path={tmp_path / 'runs'}", *overrides])


def test_the_holdout_is_stratified_seeded_and_disjoint(shards, tmp_path):
    out = ensure_holdout(str(shards), str(tmp_path / "holdout"), 0.2, seed=3)
    train, val = (read_manifest(storage.join(out, split)) for split in ("train", "test"))
    assert (train.total, val.total) == (32, 8)  # 2 of 10 per class
    assert train.class_names == val.class_names == read_manifest(storage.join(str(shards), "test")).class_names
    again = ensure_holdout(str(shards), str(tmp_path / "holdout"), 0.2, seed=3)  # built once
    assert read_manifest(storage.join(again, "test")).shards == val.shards


def test_bad_space_files_are_one_line_errors(tmp_path):
    space = tmp_path / "space.yaml"
    for text, message in (("colour: {grid: [1]}", "unknown config field 'colour'"),
                          ("kl_weight: [0.1, 1]", "expected one of"),
                          ("kl_weight: {normal: [0, 1]}", "expected one of"),
                          ("- a list", "expected a mapping")):
        space.write_text(text)
        with pytest.raises(TuneError, match=message) as err:
            read_space(space)
        assert "\n" not in str(err.value)
    space.write_text("kl_weight: {loguniform: [0.001, 1]}\nnum_projections: {grid: [4, 8]}\n")
    assert read_space(space)["kl_weight"] == {"loguniform": [0.001, 1]}


def test_heat_map_has_k_rows_and_nu_columns(tmp_path):
    rows = [{"num_projections": k, "kl_weight": nu, OBJECTIVE: 0.1 * k + nu} for k in (2, 4, 8) for nu in (0.1, 1)]
    heat_map(rows, tmp_path / "heat.png")
    image = Image.open(tmp_path / "heat.png")
    assert image.size[0] > 200 and image.size[1] > 150


def test_asha_never_stops_a_trial_at_its_last_epoch():
    """Ray's ASHA has a rung at max_t = 2 (grace 1, factor 2) and cuts the worse trial there, even with
    stop_last_trials=False; the last epoch only logs the model, so stopping there saves nothing."""

    class Trial:
        def __init__(self, trial_id: str):
            self.trial_id = trial_id

    scheduler = FinishingASHA(time_attr="epoch", metric=OBJECTIVE, mode="max", max_t=2, grace_period=1,
                              reduction_factor=2, stop_last_trials=False)
    good, bad, worse = Trial("good"), Trial("bad"), Trial("worse")
    for trial in (good, bad, worse):
        scheduler.on_trial_add(None, trial)
    decide = scheduler.on_trial_result
    assert [decide(None, good, {"epoch": 1, OBJECTIVE: 0.9}), decide(None, bad, {"epoch": 1, OBJECTIVE: 0.9}),
            decide(None, worse, {"epoch": 1, OBJECTIVE: 0.1})] == ["CONTINUE", "CONTINUE", "STOP"]  # ASHA still cuts
    assert [decide(None, good, {"epoch": 2, OBJECTIVE: 0.9}),
            decide(None, bad, {"epoch": 2, OBJECTIVE: 0.5})] == ["CONTINUE", "CONTINUE"]


@pytest.mark.slow
def test_a_2x2_sweep_logs_parent_and_children_and_picks_the_argmax(shards, tmp_path, mlflow_server, local_ray,
                                                                   monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    space = {"num_projections": {"grid": [2, 4]}, "kl_weight": {"grid": [0.1, 1.0]}}
    result = sweep(tiny(shards, tmp_path), space, "grid")
    scores = [r[OBJECTIVE] for r in result.table]
    assert len(result.table) == 4 and all(s is not None for s in scores)
    assert result.best[OBJECTIVE] == max(scores)
    assert result.best_config == {"num_projections": result.table[0]["num_projections"],
                                  "kl_weight": result.table[0]["kl_weight"]}
    client = mlflow.MlflowClient(mlflow_server)
    parent = client.get_run(result.parent_run_id)
    children = client.search_runs([parent.info.experiment_id], f"tags.`{PARENT_TAG}` = '{result.parent_run_id}'")
    assert len(children) == 4
    finished = {c.data.tags["lcr.trial"] for c in children if c.info.status == "FINISHED"}
    assert finished == {r["trial"] for r in result.table if r["epoch"] == 2}  # the others ASHA stopped: KILLED
    assert {c.info.status for c in children} <= {"FINISHED", "KILLED"}
    assert parent.data.tags["lcr.best_run_id"] in {c.info.run_id for c in children}
    assert parent.data.tags["lcr.best.num_projections"] == str(result.best_config["num_projections"])
    assert parent.data.metrics[f"best/{OBJECTIVE}"] == pytest.approx(max(scores))
    heat = client.download_artifacts(result.parent_run_id, "tune/heatmap.png", str(tmp_path))
    assert np.asarray(Image.open(heat)).ndim == 3
    table = client.download_artifacts(result.parent_run_id, "tune/trials.csv", str(tmp_path))
    assert len(open(table).read().splitlines()) == 5
    # the same name again continues the (finished) sweep instead of running the trials anew
    again = sweep(tiny(shards, tmp_path), space, "grid")
    assert again.parent_run_id == result.parent_run_id
    assert len(client.search_runs([parent.info.experiment_id], f"tags.`{PARENT_TAG}` = '{result.parent_run_id}'")) == 4


@pytest.mark.slow
def test_asha_stops_a_hopeless_trial_and_a_failing_one_does_not_stop_the_sweep(shards, tmp_path, mlflow_server,
                                                                               local_ray, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    # 16-px crops give the tiny CNN a 1 x 1 map: attention pooling then embeds every image as zero, the
    # worst possible rank-1; num_projections=0 is an invalid config, so that trial fails.
    space = {"image_size": {"grid": [32, 16]}, "num_projections": {"grid": [4, 0]}}
    result = sweep(tiny(shards, tmp_path, "epochs=3"), space, "asha", max_concurrent=1)
    by = {(r["image_size"], r["num_projections"]): r for r in result.table}
    assert by[(32, 0)]["status"] == by[(16, 0)]["status"] == "failed"
    assert by[(32, 4)]["epoch"] == 3 and by[(16, 4)][OBJECTIVE] == 0.0
    assert by[(16, 4)]["epoch"] < 3  # stopped by ASHA before its last epoch


def checkpointed_trial(runs: Path, name: str) -> str | None:
    """The id of a trial of sweep `name` once its Ray Train run has a checkpoint and Tune's saved state
    lists the trial (the state a re-run restores)."""
    states = "".join(state.read_text() for state in (runs / name / "tune").glob("experiment_state-*.json"))
    for snapshot in runs.glob(f"{name}-*/{RAY_SNAPSHOT}"):
        trial = snapshot.parent.name.removeprefix(f"{name}-")
        if "checkpoint_" in snapshot.read_text() and trial in states:
            return trial
    return None


@pytest.mark.slow
@pytest.mark.parametrize("interruption", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill-9"])
def test_a_sweep_interrupted_mid_trial_continues_that_trial_from_its_checkpoint(shards, tmp_path, mlflow_server,
                                                                               local_ray, monkeypatch, interruption):
    """`lcr tune` interrupted once its first trial has checkpointed an epoch; the same --name again
    restores the sweep, and the trial resumes its Ray Train run and its MLflow run."""
    import ray

    epochs = 4  # the signal comes within a second of the first epoch's checkpoint: 3 epochs to spare
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    space = tmp_path / "space.yaml"
    space.write_text("kl_weight: {grid: [0.1, 1.0]}\n")
    name = f"cut-{interruption.name}"
    overrides = [*TINY, f"shards={shards}", f"storage_path={tmp_path / 'runs'}", f"epochs={epochs}"]
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)  # this module's Ray instance
    with open(tmp_path / "tune.log", "w") as log:
        proc = subprocess.Popen([str(VENV_BIN / "lcr"), "tune", *overrides, "--space", str(space), "--name", name,
                                 "--max-concurrent", "1"], stdout=log, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=terminal_sigint)
    try:
        trial = wait_for(lambda: checkpointed_trial(tmp_path / "runs", name), 300, proc)
        proc.send_signal(interruption)  # the driver alone, as Ray's processes ignore a terminal's SIGINT
        returncode = proc.wait(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    client = mlflow.MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("lcr-tune-test").experiment_id
    [parent] = client.search_runs([experiment], f"tags.`lcr.sweep` = '{name}' and tags.`lcr.role` = 'sweep'")
    [cut] = client.search_runs([experiment], f"tags.`lcr.trial` = '{trial}'")
    assert cut.info.status != "FINISHED"  # interrupted before its last epoch
    if interruption == signal.SIGINT:
        assert returncode == 130 and parent.info.status == "KILLED"
        assert f"--name {name} continues it" in (tmp_path / "tune.log").read_text()
    wait_for(lambda: ray.available_resources().get("CPU", 0) >= 2, 120)  # the trial's actors have ended

    result = sweep(tiny(shards, tmp_path, f"epochs={epochs}"), read_space(space), name, max_concurrent=1)
    assert result.parent_run_id == parent.info.run_id
    trials = [row["trial"] for row in result.table]
    assert len(set(trials)) == len(trials) == 2 and trial in trials
    assert {row["status"] for row in result.table} == {"done"}
    children = client.search_runs([experiment], f"tags.`{PARENT_TAG}` = '{result.parent_run_id}'")
    assert sorted(c.data.tags["lcr.trial"] for c in children) == sorted(trials)  # one MLflow run per trial
    [resumed] = [c for c in children if c.data.tags["lcr.trial"] == trial]
    assert resumed.info.run_id == cut.info.run_id and resumed.info.status == "FINISHED"
    steps_per_epoch = 4  # 32 of the 40 training images, batch 8
    [start] = [m.value for m in client.get_metric_history(resumed.info.run_id, "resumed_from_step")]
    assert steps_per_epoch <= start < epochs * steps_per_epoch  # from its checkpoint, not from step 0
    logged = {m.step for m in client.get_metric_history(resumed.info.run_id, "loss")}
    assert logged == set(range(1, epochs * steps_per_epoch + 1))
