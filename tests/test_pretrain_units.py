"""Pieces of the pretrain step that need no Ray: checkpoints, RNG states, MLflow params and models, the
driver's run continuation, failure summaries, the printed config and the driver's share of the output."""

from __future__ import annotations

import copy
import hashlib
import json
import random
from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
import pytest
import ray.train
import torch
import yaml
from ray.core.generated.common_pb2 import ActorDiedErrorContext
from ray.experimental import tqdm_ray
from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

from components import checkpoint, preflight, pretrain, tracking
from components.checkpoint import Progress
from components.shards import build_shards
from lcr_core.config import LCRConfig
from lcr_core.errors import LCRError
from lcr_core.model import build_model
from lcr_core.train import build_optimizer, build_scheduler, train_step


def tiny_config(**overrides) -> LCRConfig:
    values = {"backbone": "tiny", "image_size": 32, "eval_resize": 32, "batch_size": 4, "queue_size": 8,
              "embed_dim": 16, "projector_hidden": 32, "num_projections": 4, "epochs": 2, "run_name": "unit"}
    values.update(overrides)
    return LCRConfig(**values).validate()


def images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def trained_one_step(cfg: LCRConfig):
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch=3)
    train_step(model, (images(seed=1), images(seed=2)), optimizer, scheduler)
    return model, optimizer, scheduler


def momentum_of(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [optimizer.state[p]["momentum_buffer"] for p in optimizer.param_groups[0]["params"]]


def draws() -> tuple:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_checkpoint_round_trip_is_weights_only_and_complete(tmp_path):
    cfg = tiny_config(extra={"note": "x"})
    model, optimizer, scheduler = trained_one_step(cfg)
    rng = [checkpoint.rng_state()]
    state = checkpoint.training_state(model, optimizer, scheduler, Progress(1, 2, 5), rng, cfg.to_dict())
    checkpoint.save_checkpoint(tmp_path, state)
    # The file itself must load under the strictest setting, with no allow-listed globals.
    raw = torch.load(tmp_path / checkpoint.CHECKPOINT_FILE, weights_only=True)
    assert set(raw) == {"format_version", "model", "optimizer", "scheduler", "progress", "rng", "config"}
    assert {"queue", "queue_ptr"} <= set(raw["model"])
    assert any(k.startswith("encoder_k.") for k in raw["model"])
    assert raw["config"] == cfg.to_dict()

    torch.manual_seed(123)
    fresh = build_model(cfg)
    fresh_optimizer = build_optimizer(fresh, cfg)
    fresh_scheduler = build_scheduler(fresh_optimizer, cfg, steps_per_epoch=3)
    progress = checkpoint.restore_training_state(checkpoint.load_checkpoint(tmp_path), fresh, fresh_optimizer,
                                                 fresh_scheduler, rank=0, world_size=1)
    assert progress == Progress(1, 2, 5)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, fresh.state_dict()[name]), name
    assert fresh_scheduler.state_dict() == scheduler.state_dict()
    assert all(torch.equal(momentum_of(optimizer)[i], momentum_of(fresh_optimizer)[i])
               for i in range(len(momentum_of(optimizer))))
    # The next step is the same step: same loss, same weights afterwards.
    batch = (images(seed=3), images(seed=4))
    torch.manual_seed(7)
    expected = train_step(model, batch, optimizer, scheduler)
    torch.manual_seed(7)
    assert train_step(fresh, batch, fresh_optimizer, fresh_scheduler) == expected
    assert all(torch.equal(tensor, fresh.state_dict()[name]) for name, tensor in model.state_dict().items())


def test_rng_states_restore_every_generator(tmp_path):
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    np.random.randn()  # leaves a cached Gaussian in numpy's state
    saved = checkpoint.rng_state()
    expected = draws()
    torch.save({"rng": [saved]}, tmp_path / "rng.pt")
    draws()
    checkpoint.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"][0])
    assert draws() == expected


def test_rng_is_kept_when_world_size_changed(tmp_path):
    cfg = tiny_config()
    model, optimizer, scheduler = trained_one_step(cfg)
    state = checkpoint.training_state(model, optimizer, scheduler, Progress(), [checkpoint.rng_state()] * 2,
                                      cfg.to_dict())
    torch.manual_seed(5)
    expected = torch.rand(2)
    torch.manual_seed(5)
    checkpoint.restore_training_state(state, model, optimizer, scheduler, rank=0, world_size=4)
    assert torch.equal(torch.rand(2), expected)


def with_checksum(file: Path) -> None:
    """Record `file`'s sha256 beside it, as `save_checkpoint` does: what the torch-level checks see."""
    digest = hashlib.sha256(file.read_bytes()).hexdigest()
    (file.parent / checkpoint.CHECKSUM_FILE).write_text(f"{digest}  {file.name}\n")


def test_bad_checkpoint_files_are_one_line_errors(tmp_path):
    file = tmp_path / checkpoint.CHECKPOINT_FILE
    with pytest.raises(LCRError, match=f"checkpoint {file}: no such file"):
        checkpoint.load_checkpoint(tmp_path)
    file.write_bytes(b"not a torch file")
    with_checksum(file)
    with pytest.raises(LCRError, match="cannot be read as a weights-only torch file") as err:
        checkpoint.load_checkpoint(tmp_path)
    assert "\n" not in str(err.value)
    torch.save({"model": {}}, file)
    with_checksum(file)
    with pytest.raises(LCRError, match="not an lcr checkpoint"):
        checkpoint.load_checkpoint(tmp_path)
    torch.save({"format_version": 1, "code": Progress()}, file)
    with_checksum(file)
    with pytest.raises(LCRError, match="cannot be read as a weights-only torch file"):
        checkpoint.load_checkpoint(tmp_path)  # a pickled object is refused, never constructed


def test_config_params_never_hold_credentials():
    cfg = tiny_config(storage_path="s3://admin:hunter2@bucket/runs",
                      extra={"api_token": "t0k", "db_password": "pw", "aws_secret": "s", "access_key": "k",
                             "fail_at_step": 3, "nested": {"secret_key": "x", "kept": 1}})
    params = tracking.config_params(cfg.to_dict())
    assert params["storage_path"] == "s3://bucket/runs"
    assert params["extra.fail_at_step"] == "3" and params["extra.nested.kept"] == "1"
    assert params["variant"] == "lcr" and params["lr"] == "0.03"
    text = repr(params)
    for secret in ("hunter2", "t0k", "pw", "'s'", "'k'", "'x'", "password", "token", "secret"):
        assert secret not in text
    assert len(params) == len(cfg.to_dict()) - 1 + 2  # extra flattened to its 2 harmless leaves


def test_default_tracking_store_is_sqlite_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = tracking.tracking_uri()
    assert uri == f"sqlite:///{tmp_path}/mlflow.db"
    first = tracking.prepare_experiment(uri, "lcr")
    assert (tmp_path / "mlflow.db").is_file()
    assert tracking.prepare_experiment(uri, "lcr") == first  # created once, then found
    artifacts = mlflow.MlflowClient(uri).get_experiment(first).artifact_location
    assert artifacts == (tmp_path / "mlartifacts" / "lcr").as_uri()  # beside the database, whoever logs
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert tracking.tracking_uri() == "http://127.0.0.1:1"


def test_logged_encoder_round_trips_through_an_mlflow_server(mlflow_server, tmp_path):
    cfg = tiny_config(variant="lcr")
    model, _, _ = trained_one_step(cfg)
    model.eval()
    run_id = tracking.start_run(mlflow_server, cfg, {"lcr.variant": cfg.variant})
    model_uri = tracking.log_encoder(mlflow_server, run_id, model.state_dict(), cfg)
    batch = images(6, seed=9)
    with torch.no_grad():
        expected = model.embed(batch)

    mlflow.set_tracking_uri(mlflow_server)
    loaded = tracking.load_encoder(model_uri)
    with torch.no_grad():
        assert torch.allclose(loaded.embed(batch), expected, atol=1e-6)
    pyfunc = mlflow.pyfunc.load_model(model_uri)
    predicted = pyfunc.predict(batch.numpy())
    assert predicted.shape == (6, 256) and np.allclose(predicted, expected.numpy(), atol=1e-6)
    assert np.allclose(np.linalg.norm(predicted, axis=1), 1, atol=1e-5)
    requirements = mlflow.pyfunc.get_model_dependencies(model_uri)
    assert "torch==" in Path(requirements).read_text()

    optimizer = build_optimizer(model, cfg)
    state = checkpoint.training_state(model, optimizer, build_scheduler(optimizer, cfg, 3), Progress(),
                                      [checkpoint.rng_state()], cfg.to_dict())
    checkpoint.save_checkpoint(tmp_path, state)
    with torch.no_grad():
        assert torch.equal(tracking.load_encoder(tmp_path).embed(batch), expected)


def test_secrets_never_go_into_the_runtime_env(monkeypatch):
    """Ray writes runtime_env variables in plain text to its logs: only settings go there."""
    settings = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_DEFAULT_REGION": "eu-west-1",
                "MLFLOW_S3_ENDPOINT_URL": "http://127.0.0.1:9000"}
    secrets = {"AWS_ACCESS_KEY_ID": "AKIAFAKE", "AWS_SECRET_ACCESS_KEY": "lcr-fake-secret-unit",
               "AWS_SESSION_TOKEN": "lcr-fake-token"}
    for name, value in (settings | secrets).items():
        monkeypatch.setenv(name, value)
    assert pretrain.forwarded_env() == settings
    assert not [name for name in pretrain.FORWARDED_ENV if tracking.is_secret(name)]


@pytest.fixture(scope="module")
def train_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    build_shards("synthetic", str(out), options={"num_classes": 4, "train_per_class": 6, "test_per_class": 1,
                                                 "image_size": 32}, splits=["train"], progress=False)
    return out


@pytest.mark.parametrize("loader_workers", [0, 1])
def test_an_epoch_resumed_midway_repeats_the_uninterrupted_steps(train_shards, loader_workers):
    """In one process, without Ray: the steps after a mid-epoch checkpoint are the same steps,
    whatever the DataLoader's workers drew before and whenever its iterator draws its seed."""
    cfg = tiny_config(shards=str(train_shards), loader_workers=loader_workers, num_workers=1)

    def run(model, optimizer, scheduler, first: int, stop: int | None = None) -> list[float]:
        losses = []
        for step, views in enumerate(pretrain.batches(pretrain.epoch_loader(cfg, 0, 0, 1, first)), start=first):
            losses.append(train_step(model, views, optimizer, scheduler)["loss"])
            if step + 1 == stop:
                return losses
        return losses

    model, optimizer, scheduler = trained_one_step(cfg)
    run(model, optimizer, scheduler, 0, stop=2)
    saved = copy.deepcopy((model.state_dict(), optimizer.state_dict(), scheduler.state_dict(),
                           checkpoint.rng_state()))
    expected = run(model, optimizer, scheduler, 2)
    resumed, resumed_optimizer, resumed_scheduler = trained_one_step(cfg)
    resumed.load_state_dict(saved[0])
    resumed_optimizer.load_state_dict(saved[1])
    resumed_scheduler.load_state_dict(saved[2])
    torch.rand(5)  # the RNG stands elsewhere before the checkpoint's state is restored
    checkpoint.set_rng_state(saved[3])
    assert run(resumed, resumed_optimizer, resumed_scheduler, 2) == expected and len(expected) == 4
    assert all(torch.equal(t, resumed.state_dict()[k]) for k, t in model.state_dict().items())


def ray_snapshot(names: list[str]) -> str:
    """The checkpoint_manager_snapshot.json Ray Train writes for a run with these checkpoints."""
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import (
        _CheckpointManagerState,
        _TrainingResultState,
    )

    results = [_TrainingResultState(checkpoint_dir_name=name, metrics={}) for name in names]
    return _CheckpointManagerState(
        checkpoint_results=results, checkpoint_report_indices=list(range(len(names))),
        latest_checkpoint_result=results[-1], pending_training_results=[], pending_validation_specs=[],
        current_report_index=len(names), validated_checkpoint_dir_names=[],
        timed_out_validation_checkpoint_dir_names=[], failed_validation_checkpoint_dir_names=[]).json()


def test_a_checkpoint_deleted_by_hand_gets_an_empty_stand_in(tmp_path, capsys):
    cfg = tiny_config(run_name="by-hand", storage_path=str(tmp_path))
    run = tmp_path / "by-hand"
    pretrain.stand_in_for_missing_checkpoints(cfg, str(tmp_path), None)  # a new run: nothing to do
    assert not run.exists()
    (run / "checkpoint_00000004").mkdir(parents=True)
    (run / pretrain.RAY_SNAPSHOT).write_text(ray_snapshot(["checkpoint_00000004", "checkpoint_00000008"]))
    pretrain.stand_in_for_missing_checkpoints(cfg, str(tmp_path), None)
    assert list((run / "checkpoint_00000008").iterdir()) == []
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint_00000004", "checkpoint_00000008",
                                                     pretrain.RAY_SNAPSHOT]
    assert f"checkpoint {run / 'checkpoint_00000008'} is listed by Ray but gone" in capsys.readouterr().err


def test_missing_bucket_is_a_one_line_error(s3_server):
    with pytest.raises(LCRError, match="bucket 'no-such-bucket' does not exist") as err:
        pretrain.checkpoint_storage("s3://no-such-bucket/runs")
    assert "\n" not in str(err.value)


def test_fault_hook_needs_its_marker():
    with pytest.raises(LCRError, match="extra.fail_marker"):
        preflight.check_hooks(tiny_config(extra={"fail_at_step": 2}))


def test_resuming_with_a_different_model_is_refused():
    saved = tiny_config().to_dict()
    checkpoint.check_resumable(saved, tiny_config(epochs=5, checkpoint_every_steps=3).to_dict(), "runs/x")
    with pytest.raises(LCRError, match=r"checkpoint runs/x was written with backbone='tiny' but the config "
                                       r"has 'resnet18'; expected the same value"):
        checkpoint.check_resumable(saved, tiny_config(backbone="resnet18").to_dict(), "runs/x")


def test_a_worker_error_is_summarised_in_one_line():
    failures = {1: RuntimeError("boom\nsecond line"), 0: LCRError("shards/train: no manifest.json")}
    summary = pretrain.failure_summary(ray.train.WorkerGroupError("two ranks failed", failures))
    assert summary == "rank 0: shards/train: no manifest.json"
    traceback = RuntimeError("Traceback\n  ...\nboom")
    assert pretrain.failure_summary(ray.train.WorkerGroupError("x", {1: traceback})) == "rank 1: boom"


GLOO_ERROR = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer "
                          "[127.0.0.1]:14224. This is typically caused by a remote worker crashing.")


def killed_worker(pid: int = 15656) -> Exception:
    """What Ray Train 2.60 reports for a worker whose process was killed (seen with SIGKILL)."""
    died = ray.exceptions.ActorDiedError(ActorDiedErrorContext(pid=pid, node_ip_address="192.0.2.2",
                                                               class_name="RayTrainWorker", actor_id=bytes(16)))
    return WorkerHealthCheckFailedError("A worker health check failed.\nWorker info: Worker(...)", failure=died)


def test_a_killed_worker_is_named_rather_than_the_gloo_error_of_the_rank_that_survived():
    summary = pretrain.failure_summary(ray.train.WorkerGroupError("x", {0: GLOO_ERROR, 1: killed_worker()}))
    assert summary == ("worker rank 1 died (process 15656 on 192.0.2.2 ended without a Python error: killed, "
                       "e.g. by SIGKILL or the OOM killer, or crashed)")
    # A rank that raised comes before the collective error that its failure caused on the others.
    injected = RuntimeError("Traceback ...\nRuntimeError: injected failure after global step 3")
    summary = pretrain.failure_summary(ray.train.WorkerGroupError("x", {0: GLOO_ERROR, 1: injected}))
    assert summary == "rank 1: RuntimeError: injected failure after global step 3"
    assert pretrain.failure_summary(ray.train.WorkerGroupError("x", {0: GLOO_ERROR})).startswith("rank 0: [../")


def test_a_failure_that_ray_train_recovers_from_is_a_notice_naming_the_rank(capfd):
    callback = pretrain.WorkerFailures(max_failures=1)
    callback.after_exception(None, {0: GLOO_ERROR, 1: killed_worker()})
    out = capfd.readouterr().out
    assert out == ("[lcr] warning: worker rank 1 died (process 15656 on 192.0.2.2 ended without a Python error: "
                   "killed, e.g. by SIGKILL or the OOM killer, or crashed); recovering: the workers restart from "
                   "the last checkpoint (failure 1 of max_failures=1)\n")
    callback.after_exception(None, {1: killed_worker()})  # beyond max_failures: the driver's error says it
    assert capfd.readouterr().out == ""


def test_the_config_printed_at_the_start_holds_what_differs_from_the_defaults_and_no_secret():
    cfg = tiny_config(storage_path="s3://admin:hunter2@bucket/runs", extra={"api_token": "t0k", "note": "x"})
    text = pretrain.config_summary(cfg)
    assert text.startswith("# run unit: the config fields that differ from the defaults\n")
    shown = yaml.safe_load(text)
    assert list(shown)[:3] == ["run_name", "variant", "backbone"] and shown["variant"] == "lcr"  # a default
    assert shown["storage_path"] == "s3://bucket/runs" and shown["extra"] == {"note": "x"}
    assert shown["embed_dim"] == 16 and "lr" not in shown and "hunter2" not in text and "t0k" not in text


def test_the_driver_shows_rank_0_bar_and_notices_and_logs_every_line(tmp_path, capsys, monkeypatch):
    shown = []
    monkeypatch.setattr(tqdm_ray.instance(), "process_state_update", shown.append)
    output = pretrain.WorkerOutput(tmp_path / "logs" / "run.log")
    bar = {"__magic_token__": tqdm_ray.RAY_TQDM_MAGIC, "x": 3, "pos": 0, "desc": "epoch 1/2", "total": 8,
           "uuid": "b1", "closed": False}
    output({"pid": 11, "ip": "10.0.0.1", "actor_name": "RayTrainWorker", "lines": [
        json.dumps(bar), "Reporting training result 1", "[lcr] warning: run: the loss rose"]})
    output({"pid": 12, "ip": "10.0.0.1", "actor_name": "TrainController", "lines": ["[FailurePolicy] RETRY"]})
    output.close()  # the worker stopped without closing its bar: the driver closes it
    assert shown == [bar, bar | {"closed": True}]
    assert capsys.readouterr() == ("", "warning: run: the loss rose\n")
    assert (tmp_path / "logs" / "run.log").read_text().splitlines() == [
        "(RayTrainWorker pid=11, ip=10.0.0.1) Reporting training result 1",
        "(RayTrainWorker pid=11, ip=10.0.0.1) [lcr] warning: run: the loss rose",
        "(TrainController pid=12, ip=10.0.0.1) [FailurePolicy] RETRY"]


def test_a_run_left_running_by_a_killed_driver_is_continued_not_a_finished_one(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = tiny_config(storage_path=str(tmp_path / "runs"))
    first = pretrain.mlflow_run(uri, cfg, {})  # its driver was killed: the run stays RUNNING
    assert pretrain.mlflow_run(uri, replace(cfg, epochs=4), {"lcr.trial": "t1"}) == first
    client = mlflow.MlflowClient(uri)
    run = client.get_run(first)
    assert run.data.params["epochs"] == "2" and run.data.tags[pretrain.CHANGED_PARAMS_TAG] == "epochs"
    assert run.data.tags["lcr.trial"] == "t1"
    elsewhere = pretrain.mlflow_run(uri, replace(cfg, storage_path=str(tmp_path / "other")), {})
    assert elsewhere != first
    pretrain.end_run(uri, first, "FINISHED")
    assert pretrain.mlflow_run(uri, cfg, {}) not in (first, elsewhere)
