"""`lcr pretrain` fails before Ray starts, in one line, on what would otherwise fail inside Ray: missing
shards, a batch larger than the data set, weights that do not fit, a resumed run with another model,
an unwritable storage_path, an empty path, a NaN; and, once connected, more workers than the cluster
holds. No test here starts Ray: the driver's connection is replaced by one that fails the test."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import ray
import torch

from components import checkpoint, cli, preflight, pretrain
from components.checkpoint import Progress
from components.shards import build_shards
from lcr_core.backbones import build_backbone
from lcr_core.config import LCRConfig
from lcr_core.errors import LCRError
from lcr_core.model import build_model
from lcr_core.train import build_optimizer, build_scheduler

TINY = {"backbone": "tiny", "image_size": 32, "eval_resize": 32, "batch_size": 8, "num_workers": 2,
        "queue_size": 16, "embed_dim": 16, "projector_hidden": 32, "num_projections": 4, "epochs": 2,
        "run_name": "pre"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")  # 24 training images: 3 global batches of 8
    build_shards("synthetic", str(out), options={"num_classes": 3, "train_per_class": 8, "test_per_class": 1,
                                                 "image_size": 32}, splits=["train"], progress=False)
    return out


@pytest.fixture
def no_ray(monkeypatch):
    """Any attempt to reach Ray fails the test: preflight errors must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started before the preflight checks ended")

    monkeypatch.setattr(pretrain, "connect_ray", refuse)
    monkeypatch.setattr(ray, "init", refuse)


def config(shards: Path, tmp_path: Path, **overrides) -> LCRConfig:
    return LCRConfig(**(TINY | {"shards": str(shards), "storage_path": str(tmp_path / "runs")} | overrides)).validate()


def one_line_error(cfg: LCRConfig, *words: str) -> str:
    with pytest.raises(LCRError) as info:
        pretrain.pretrain(cfg)
    message = str(info.value)
    assert "\n" not in message and all(word in message for word in words), message
    return message


def test_missing_shards_and_a_batch_larger_than_the_data_set_fail_before_ray(shards, tmp_path, no_ray):
    one_line_error(config(tmp_path / "nowhere", tmp_path), "nowhere/train: no manifest.json")
    one_line_error(config(shards, tmp_path, batch_size=32, queue_size=32),
                   "24 samples, fewer than one global batch of 32", "smaller batch_size")


def test_weights_that_do_not_load_into_the_backbone_fail_before_ray(shards, tmp_path, no_ray):
    one_line_error(config(shards, tmp_path, backbone_weights=str(tmp_path / "missing.pt")), "no such file")
    narrow = tmp_path / "narrow.pt"  # the same layers, another width: torch's error has a line per tensor
    torch.save(build_backbone("tiny").state_dict() | {"features.0.0.weight": torch.zeros(16, 3, 3, 3)}, narrow)
    one_line_error(config(shards, tmp_path, backbone_weights=str(narrow)),
                   f"backbone weights {narrow}: do not fit backbone 'tiny'",
                   "features.0.0.weight: [16, 3, 3, 3] in the file, [32, 3, 3, 3] in the model")
    resnet = tmp_path / "resnet18.pt"
    torch.save(build_backbone("resnet18").state_dict(), resnet)
    one_line_error(config(shards, tmp_path, backbone_weights=str(resnet)), "missing keys e.g. ['features.0.0.weight']")


def test_weights_missing_from_a_bucket_fail_before_ray(shards, tmp_path, s3_bucket, no_ray):
    uri = f"s3://{s3_bucket}/weights/tiny.pt"
    one_line_error(config(shards, tmp_path, backbone_weights=uri), f"{uri}: no such object")


def test_weights_in_a_bucket_are_named_by_their_uri(shards, tmp_path, s3_bucket):
    import boto3

    narrow = tmp_path / "narrow.pt"
    torch.save({"features.0.0.weight": torch.zeros(16, 3, 3, 3)}, narrow)
    boto3.client("s3").upload_file(str(narrow), s3_bucket, "narrow.pt")
    uri = f"s3://{s3_bucket}/narrow.pt"
    with pytest.raises(LCRError, match=f"backbone weights {uri}: do not fit backbone 'tiny'"):
        preflight.check_weights(config(shards, tmp_path, backbone_weights=uri))


def save_checkpoint(folder: Path, cfg: LCRConfig) -> None:
    model = build_model(cfg)
    optimizer = build_optimizer(model, cfg)
    state = checkpoint.training_state(model, optimizer, build_scheduler(optimizer, cfg, 3), Progress(1, 0, 3),
                                      [checkpoint.rng_state()], cfg.to_dict())
    folder.mkdir(parents=True)
    checkpoint.save_checkpoint(folder, state)


def test_resuming_with_another_model_fails_before_ray(shards, tmp_path, no_ray):
    cfg = config(shards, tmp_path)
    run = tmp_path / "runs" / cfg.run_name
    save_checkpoint(run / "checkpoint_00000003", cfg)
    one_line_error(replace(cfg, variant="moco"), f"checkpoint {run / 'checkpoint_00000003'} was written with "
                                                 "variant='lcr' but the config has 'moco'")
    # A newer damaged checkpoint is skipped, as the workers skip it; none intact is an error.
    (run / "checkpoint_00000006").mkdir()
    one_line_error(replace(cfg, embed_dim=32), "embed_dim=16")
    (run / "checkpoint_00000003" / checkpoint.CHECKPOINT_FILE).write_bytes(b"cut short")
    one_line_error(cfg, f"no checkpoint in {run} reads back whole")


def test_an_unwritable_storage_path_fails_before_ray(shards, tmp_path, no_ray):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    one_line_error(config(shards, tmp_path, storage_path=str(blocker / "runs")),
                   f"storage_path {blocker / 'runs'}: cannot be written")
    one_line_error(config(shards, tmp_path, storage_path=str(blocker)), "cannot be written")


@pytest.mark.parametrize("name", ["shards", "storage_path", "backbone_weights"])
def test_an_empty_path_fails_before_ray(shards, tmp_path, no_ray, name):
    one_line_error(replace(config(shards, tmp_path), **{name: " "}), f"config field '{name}' is empty")


@pytest.mark.parametrize(("name", "value"), [("lr", math.nan), ("momentum", math.inf), ("kl_weight", -math.inf)])
def test_numbers_that_are_not_finite_fail_before_ray(shards, tmp_path, no_ray, name, value):
    # `replace` skips the validation that load_config does.
    one_line_error(replace(config(shards, tmp_path), **{name: value}), f"config field '{name}' = {value!r}")


@pytest.mark.parametrize("hook", [{"stop_after_epoch": math.nan}, {"stop_after_step": 0},
                                  {"fail_at_step": "2", "fail_marker": "m"}, {"fail_at_step": 2}])
def test_bad_hooks_fail_before_ray(shards, tmp_path, no_ray, hook):
    one_line_error(replace(config(shards, tmp_path), extra=hook), "extra.")


def test_the_cli_prints_a_preflight_error_as_one_line(shards, tmp_path, no_ray, capsys):
    overrides = [f"{name}={value}" for name, value in (TINY | {"batch_size": 32, "queue_size": 32}).items()]
    assert cli.main(["pretrain", *overrides, f"shards={shards}", f"storage_path={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lcr pretrain: error: ") and err.count("\n") == 1 and "global batch" in err


# ---------------------------------------------------------------------------------------------
# Resources, once connected (Ray's node list replaced)

def node(cpus: float, gpus: float = 0, alive: bool = True) -> dict:
    return {"Alive": alive, "Resources": {"CPU": cpus, **({"GPU": gpus} if gpus else {}), "memory": 1e9}}


@pytest.mark.parametrize(("nodes", "overrides", "fit"), [
    ([node(2)], {}, 2),
    ([node(2), node(2, alive=False)], {"num_workers": 4}, 2),
    ([node(2), node(2)], {"num_workers": 4}, 4),
    ([node(2), node(2)], {"num_workers": 4, "batch_size": 4, "cpus_per_worker": 1.5}, 2),  # one per node
    ([node(8, gpus=1), node(8)], {"use_gpu": True}, 1),
])
def test_workers_that_fit_count_whole_workers_per_node(shards, tmp_path, nodes, overrides, fit):
    cfg = config(shards, tmp_path, **overrides)
    assert preflight.workers_that_fit(nodes, preflight.worker_resources(cfg)) == fit


def test_more_workers_than_the_cluster_holds_fail_at_once(shards, tmp_path, monkeypatch):
    monkeypatch.setattr(ray, "nodes", lambda: [node(2)])
    monkeypatch.delenv(preflight.RESOURCE_WAIT_VARIABLE, raising=False)
    with pytest.raises(LCRError) as info:
        preflight.check_resources(config(shards, tmp_path, num_workers=4))
    assert str(info.value) == (
        "num_workers=4 with 1 CPU each do not fit the Ray cluster (1 node, 2 CPU + 0 GPU in all): 2 fit; expected "
        "fewer workers or cpus_per_worker, or more nodes (LCR_RESOURCE_WAIT_S=SECONDS waits for an autoscaler)")


def test_the_driver_checks_resources_before_it_creates_the_mlflow_run(shards, tmp_path, monkeypatch):
    monkeypatch.setattr(pretrain, "connect_ray", lambda: False)  # "already initialised"
    monkeypatch.setattr(ray, "nodes", lambda: [node(2)])
    monkeypatch.setattr(pretrain, "mlflow_run", lambda *args: pytest.fail("an MLflow run was created"))
    one_line_error(config(shards, tmp_path, num_workers=4), "num_workers=4 with 1 CPU each do not fit")


def test_with_a_resource_wait_nodes_may_join_until_it_ends(shards, tmp_path, monkeypatch):
    cfg = config(shards, tmp_path, num_workers=4)
    monkeypatch.setattr(preflight, "RESOURCE_POLL_S", 0.05)
    monkeypatch.setenv(preflight.RESOURCE_WAIT_VARIABLE, "30")
    joined = iter([[node(2)], [node(2)], [node(2), node(2)]])
    monkeypatch.setattr(ray, "nodes", lambda: next(joined))
    preflight.check_resources(cfg)  # the second node joined on the third look

    monkeypatch.setenv(preflight.RESOURCE_WAIT_VARIABLE, "0.2")
    monkeypatch.setattr(ray, "nodes", lambda: [node(2)])
    with pytest.raises(LCRError, match="2 fit"):
        preflight.check_resources(cfg)
    monkeypatch.setenv(preflight.RESOURCE_WAIT_VARIABLE, "soon")
    with pytest.raises(LCRError, match="LCR_RESOURCE_WAIT_S='soon': expected a number of seconds >= 0"):
        preflight.check_resources(cfg)
