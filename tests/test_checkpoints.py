"""Checkpoints that never lose data: atomic writes, a checksum checked before unpickling, run folders
read back through their newest intact checkpoint, and the untrained network as `init:CONFIG`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import boto3
import pytest
import torch

from components import checkpoint, cli, features, tracking
from components.checkpoint import CHECKPOINT_FILE, CHECKSUM_FILE, Progress
from components.shards import build_shards
from lcr_core.config import LCRConfig, load_config
from lcr_core.errors import LCRError
from lcr_core.model import build_model
from lcr_core.train import build_optimizer, build_scheduler

SNAPSHOT = "checkpoint_manager_snapshot.json"  # what Ray writes into a run folder


def tiny_config(**overrides) -> LCRConfig:
    values = {"backbone": "tiny", "image_size": 32, "eval_resize": 32, "batch_size": 4, "queue_size": 8,
              "embed_dim": 16, "projector_hidden": 32, "num_projections": 4, "run_name": "ckpt"}
    return LCRConfig(**{**values, **overrides}).validate()


def state_of(seed: int, cfg: LCRConfig | None = None) -> dict:
    cfg = cfg or tiny_config()
    torch.manual_seed(seed)
    model = build_model(cfg)
    optimizer = build_optimizer(model, cfg)
    return checkpoint.training_state(model, optimizer, build_scheduler(optimizer, cfg, 3), Progress(0, 0, seed),
                                     [checkpoint.rng_state()], cfg.to_dict())


def write(folder: Path, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return checkpoint.save_checkpoint(folder, state_of(seed))


def same_weights(model: torch.nn.Module, state: dict) -> bool:
    return all(torch.equal(tensor, state["model"][name]) for name, tensor in model.state_dict().items())


@pytest.fixture
def no_unpickling(monkeypatch):
    """Fails the test if anything reaches torch.load."""
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", refuse)


def one_line_error(path, match: str) -> str:
    with pytest.raises(LCRError, match=match) as err:
        checkpoint.load_checkpoint(path)
    assert "\n" not in str(err.value)
    return str(err.value)


# ---------------------------------------------------------------------------------------------
# Writing and verifying one checkpoint

def test_save_records_the_sha256_beside_the_file(tmp_path):
    file = write(tmp_path, seed=0)
    digest = hashlib.sha256(file.read_bytes()).hexdigest()
    assert (tmp_path / CHECKSUM_FILE).read_text() == f"{digest}  {CHECKPOINT_FILE}\n"  # as sha256sum writes
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_FILE, CHECKSUM_FILE]  # no temporaries
    assert checkpoint.load_checkpoint(tmp_path)["progress"] == {"epoch": 0, "step_in_epoch": 0, "global_step": 0}


def test_a_crash_while_saving_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    write(tmp_path, seed=1)

    def crash(state, target):
        (target if hasattr(target, "write") else open(target, "wb")).write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_checkpoint(tmp_path, state_of(2))
    monkeypatch.undo()
    assert checkpoint.load_checkpoint(tmp_path)["progress"]["global_step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_FILE, CHECKSUM_FILE]


def test_a_truncated_or_altered_checkpoint_is_refused_before_unpickling(tmp_path, no_unpickling):
    file = write(tmp_path, seed=0)
    whole = file.read_bytes()
    file.write_bytes(whole[: len(whole) // 2])
    message = one_line_error(tmp_path, "truncated or corrupt")
    assert str(file) in message
    altered = bytearray(whole)
    altered[len(whole) // 2] ^= 0xFF  # same size, one byte of the tensor data changed
    file.write_bytes(bytes(altered))
    assert str(file) in one_line_error(file, "truncated or corrupt")


def test_a_file_without_its_checksum_is_refused_before_unpickling(tmp_path, no_unpickling):
    file = write(tmp_path, seed=0)
    (tmp_path / SNAPSHOT).write_text(json.dumps({"checkpoint_results": []}))
    one_line_error(tmp_path / SNAPSHOT, f"holds no sha256 of {SNAPSHOT}")  # a stray file is never read
    (tmp_path / CHECKSUM_FILE).write_text("not a checksum\n")
    one_line_error(file, f"holds no sha256 of {CHECKPOINT_FILE}")
    (tmp_path / CHECKSUM_FILE).unlink()
    assert str(file) in one_line_error(tmp_path, f"no {CHECKSUM_FILE} beside it")


# ---------------------------------------------------------------------------------------------
# A run folder: which checkpoint is the newest, and names that never collide

def test_checkpoint_folders_newest_first_and_fresh_names():
    names = ["checkpoint_00000004", SNAPSHOT, "checkpoint_00000008", "checkpoint_00000008-2", ".validate_storage",
             "checkpoint_00000010-junk", "checkpoint_00000012.partial"]
    assert checkpoint.checkpoint_dirs(names) == ["checkpoint_00000008-2", "checkpoint_00000008",
                                                 "checkpoint_00000004"]
    assert checkpoint.checkpoint_dir_name(12, names) == "checkpoint_00000012"
    assert checkpoint.checkpoint_dir_name(8, names) == "checkpoint_00000008-3"
    assert checkpoint.checkpoint_dir_name(4, names) == "checkpoint_00000004-2"


def damaged_run(root: Path) -> Path:
    """A run folder as Ray leaves it: two checkpoints (the newer truncated) and Ray's JSON snapshot."""
    run = root / "runs" / "damaged"
    write(run / "checkpoint_00000004", seed=4)
    newest = write(run / "checkpoint_00000008", seed=8)
    newest.write_bytes(newest.read_bytes()[:1000])
    (run / SNAPSHOT).write_text(json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": "x"}}))
    return run


def test_a_run_folder_gives_its_newest_intact_checkpoint(tmp_path, capsys):
    run = damaged_run(tmp_path)
    model = features.load_model(str(run))
    assert same_weights(model, state_of(4))
    warning = capsys.readouterr().err
    assert warning.startswith("warning: checkpoint ") and str(run / "checkpoint_00000008") in warning
    write(run / "checkpoint_00000008-2", seed=9)  # the step written again by a resumed run
    assert same_weights(tracking.load_encoder(run), state_of(9))


def test_a_folder_without_checkpoints_is_a_one_line_error(tmp_path):
    run = tmp_path / "runs" / "empty"
    run.mkdir(parents=True)
    (run / SNAPSHOT).write_text("{}")
    with pytest.raises(LCRError, match=r"no checkpoint in this folder; expected a checkpoint") as err:
        features.load_model(str(run))
    assert str(run) in str(err.value) and "\n" not in str(err.value)
    (run / "checkpoint_00000002").mkdir()  # an interrupted upload: the folder, nothing in it
    with pytest.raises(LCRError, match="none of its 1 checkpoints reads back whole"):
        features.load_model(str(run))


def test_a_run_folder_in_a_bucket_gives_its_newest_intact_checkpoint(s3_bucket, tmp_path, capsys):
    local = damaged_run(tmp_path)
    client = boto3.client("s3")
    for file in local.rglob("*"):
        if file.is_file():
            client.upload_file(str(file), s3_bucket, f"runs/damaged/{file.relative_to(local)}")
    uri = f"s3://{s3_bucket}/runs/damaged"
    assert same_weights(tracking.load_encoder(uri), state_of(4))
    assert f"{uri}/checkpoint_00000008/{CHECKPOINT_FILE}: truncated or corrupt" in capsys.readouterr().err
    assert same_weights(tracking.load_encoder(f"{uri}/checkpoint_00000004"), state_of(4))


# ---------------------------------------------------------------------------------------------
# The untrained network: `init:CONFIG`

TINY_INIT = "init:demo?backbone=tiny&backbone_weights=null&freeze_stages=0&image_size=32&eval_resize=32"


def test_init_gives_the_configs_untrained_network():
    model = features.load_model(TINY_INIT)
    cfg = load_config("demo", ["backbone=tiny", "backbone_weights=null", "freeze_stages=0", "image_size=32",
                               "eval_resize=32"])
    assert model.cfg.backbone == "tiny" and model.cfg.variant == cfg.variant and not model.training
    assert model.cfg.run_name == "lcr-demo-init"  # its evaluation runs are told apart in MLflow
    torch.manual_seed(cfg.seed)
    fresh = build_model(cfg)
    assert all(torch.equal(t, fresh.state_dict()[k]) for k, t in model.state_dict().items())
    for ref, expected in (("init:", "expected init:CONFIG"), ("init:nope", "no shipped config"),
                          ("init:demo?backbone=vgg", "'backbone' = 'vgg'"), ("init:demo?epochs", "field=value")):
        with pytest.raises(LCRError, match=expected) as err:
            features.load_model(ref)
        assert str(err.value).startswith(f"model {ref}: ") and "\n" not in str(err.value)


def test_retrieve_evaluates_the_untrained_network(tmp_path, monkeypatch, capsys):
    shards = tmp_path / "shards"
    build_shards("synthetic", str(shards), options={"num_classes": 3, "train_per_class": 1, "test_per_class": 3,
                                                    "image_size": 32}, splits=["test"], progress=False)
    monkeypatch.chdir(tmp_path)  # the default MLflow store: ./mlflow.db
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert cli.main(["retrieve", "--model", TINY_INIT, "--shards", str(shards), "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "rank1" in out and "MLflow run" in out
