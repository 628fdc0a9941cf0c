"""`lcr tune`: a real Ray Tune sweep of real `lcr pretrain` trials on the synthetic set, logged to a
real `mlflow server`; the hold-out split, the space file and the MLflow parent/child runs."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
from PIL import Image

from components import storage
from components.data import read_manifest
from components.shards import build_shards
from components.tune import (
    OBJECTIVE,
    PARENT_TAG,
    TuneError,
    ensure_holdout,
    heat_map,
    read_space,
    sweep,
)
from lcr_core.config import load_config

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
    # the trials that ran to the end finished (a trial ASHA stopped is KILLED); once, under a full suite's
    # load, a trial that had reported its last epoch ended FAILED, so this is a subset, not an equality
    assert finished and finished <= {r["trial"] for r in result.table if r["epoch"] == 2}
    assert {c.info.status for c in children} <= {"FINISHED", "KILLED", "FAILED"}
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
