"""MLflow for the pipeline: where runs are tracked, what is logged, and the trained encoder as a model.

Default store: SQLite in the working directory (`sqlite:///<cwd>/mlflow.db`); `MLFLOW_TRACKING_URI`
overrides it. The database, the experiment and the run are created by the driver before any
worker opens them (several processes opening a fresh SQLite file at once crash in its schema migration).

The encoder is logged as a custom `mlflow.pyfunc` model (`components/encoder_model.py`, logged as
code): the query encoder's weights and the run's configuration are its artefacts, `lcr_core`
travels with it, and `predict` maps N x 3 x H x W float32 images to N x D embeddings.
`load_encoder` gives the `LCRModel` back from such a model or from a training checkpoint (a file, its
folder, or a run's folder, whose newest readable checkpoint it takes).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import urllib.parse
import warnings
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
import yaml
from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

import lcr_core
from components import encoder_model, storage
from components.checkpoint import CHECKPOINT_FILE, CHECKSUM_FILE, checkpoint_dirs, load_checkpoint, newest_readable
from components.encoder_model import encoder_state, model_from_encoder_state, trained_model
from lcr_core.config import LCRConfig, config_from_dict
from lcr_core.errors import LCRError
from lcr_core.model import LCRModel

SECRET_WORDS = ("key", "secret", "token", "password")
MAX_PARAM_LENGTH = 6000  # MLflow rejects longer parameter values
PARAMS_PER_BATCH = 100  # MLflow takes at most 100 parameters per log_batch
MODEL_NAME = "encoder"
SQLITE_PREFIX = "sqlite:///"
MODEL_URI_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd()}/mlflow.db"


def prepare_experiment(uri: str, name: str) -> str:
    """Create the store (on first use) and the experiment; return the experiment id."""
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=local_artifact_location(uri, name))
    except mlflow.exceptions.MlflowException as err:  # another process created it since we looked
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def local_artifact_location(uri: str, experiment: str) -> str | None:
    """For a SQLite store, `mlartifacts/<experiment>` beside the database file. MLflow's default
    (`./mlruns` of whichever process creates the experiment) would scatter artefacts over the
    working directories of drivers and Ray job processes. Other stores keep their own default."""
    if not uri.startswith(SQLITE_PREFIX):
        return None
    return (Path(uri[len(SQLITE_PREFIX):]).resolve().parent / "mlartifacts" / experiment).as_uri()


def is_secret(name: str) -> bool:
    return any(word in name.lower() for word in SECRET_WORDS)


def without_credentials(value: str) -> str:
    """A URI with any `user:password@` part removed (other strings unchanged)."""
    parts = urllib.parse.urlsplit(value)
    if "@" not in parts.netloc:
        return value
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def config_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Flat `name -> text` parameters from a config dict (nested dicts become `a.b`); credentials never."""
    params: dict[str, str] = {}
    for name, value in config.items():
        if is_secret(name):
            continue
        if isinstance(value, dict):
            params.update(config_params(value, f"{prefix}{name}."))
        else:
            text = without_credentials(value) if isinstance(value, str) else str(value)
            params[prefix + name] = text[:MAX_PARAM_LENGTH]
    return params


def start_run(uri: str, cfg: LCRConfig, tags: dict[str, str]) -> str:
    """A new MLflow run for this invocation (the store and experiment created if need be); its id."""
    experiment_id = prepare_experiment(uri, cfg.mlflow_experiment)
    run = mlflow.MlflowClient(uri).create_run(experiment_id, run_name=cfg.run_name,
                                              tags={"lcr.run_name": cfg.run_name, **tags})
    return run.info.run_id


def end_run(uri: str, run_id: str, succeeded: bool) -> None:
    status = RunStatus.FINISHED if succeeded else RunStatus.FAILED
    mlflow.MlflowClient(uri).set_terminated(run_id, RunStatus.to_string(status))


def run_tags(uri: str, run_id: str) -> dict[str, str]:
    return dict(mlflow.MlflowClient(uri).get_run(run_id).data.tags)


class MetricLogger:
    """Rank 0's link to the run. Metrics go in the background so that training does not wait on them."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = uri, run_id
        self.client = mlflow.MlflowClient(uri)
        self.pending: list = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        now = int(1000 * time.time())
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.pending.append(self.client.log_batch(self.run_id, metrics=batch, synchronous=False))

    def log_params(self, params: dict[str, str]) -> None:
        """Idempotent: a restarted worker logs the same values again, which MLflow accepts; so do
        steps logging into one run at once (the pipeline's probes), where the second insert of the
        same value can break the store's UNIQUE constraint: values already there are not an error."""
        items = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(items), PARAMS_PER_BATCH):
            batch = items[start:start + PARAMS_PER_BATCH]
            try:
                self.client.log_batch(self.run_id, params=batch)
            except MlflowException:
                logged = self.client.get_run(self.run_id).data.params
                if any(logged.get(p.key) != p.value for p in batch):
                    raise

    def log_artifact(self, path: str | Path, folder: str) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    def set_tag(self, name: str, value: str) -> None:
        self.client.set_tag(self.run_id, name, value)

    def flush(self) -> None:
        for operation in self.pending:
            operation.wait()
        self.pending.clear()


def _requirements() -> list[str]:
    """Pinned to what trained the model; local version tags (`+cpu`) name no installable wheel."""
    import torchvision

    def pin(name: str, version: str) -> str:
        return f"{name}=={version.split('+')[0]}"

    return [pin("mlflow", mlflow.__version__), pin("torch", torch.__version__),
            pin("torchvision", torchvision.__version__), pin("numpy", np.__version__), "pyyaml", "pillow"]


def encoder_signature(model: LCRModel, cfg: LCRConfig) -> ModelSignature:
    with torch.no_grad():
        dim = model.embed(torch.zeros(1, 3, cfg.image_size, cfg.image_size)).shape[1]
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, cfg.image_size, cfg.image_size))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, dim))]),
    )


def log_encoder(uri: str, run_id: str, model_state: dict[str, torch.Tensor], cfg: LCRConfig) -> str:
    """Log the query encoder in `model_state` (an LCRModel state_dict) as the run's pyfunc model;
    returns the model URI."""
    state = {k: v.detach().cpu() for k, v in encoder_state(model_state).items()}
    with tempfile.TemporaryDirectory() as tmp:
        weights, config = Path(tmp, "encoder.pt"), Path(tmp, "config.yaml")
        torch.save(state, weights)
        config.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        mlflow.set_tracking_uri(uri)
        with mlflow.start_run(run_id=run_id, log_system_metrics=False), warnings.catch_warnings():
            # The signature fixes the input (N x 3 x H x W float32); an example image adds nothing.
            warnings.filterwarnings("ignore", message=".*input example was not provided")
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME, python_model=encoder_model.__file__,
                artifacts={"weights": str(weights), "config": str(config)},
                code_paths=[str(Path(lcr_core.__file__).parent)],
                pip_requirements=_requirements(),
                signature=encoder_signature(model_from_encoder_state(cfg, state), cfg),
            )
    return info.model_uri


def is_model_uri(text: str) -> bool:
    return text.startswith(MODEL_URI_SCHEMES) or Path(text, "MLmodel").is_file()


def load_encoder(model_uri_or_checkpoint: str | Path) -> LCRModel:
    """The trained LCRModel (eval mode, CPU) from an MLflow model URI (`models:/m-…`, `runs:/…`,
    `models:/NAME@alias`, a model folder) or a training checkpoint, local or on S3: a
    `checkpoint.pt`, its folder, or a run folder (`runs/NAME`)."""
    source = str(model_uri_or_checkpoint)
    if is_model_uri(source):
        try:
            wrapper = mlflow.pyfunc.load_model(source)
        except mlflow.exceptions.MlflowException as err:
            reason = str(err).splitlines()[0]
            raise LCRError(f"model {source}: cannot be loaded from MLflow ({reason})") from None
        return wrapper.unwrap_python_model().model.cpu()
    name, state = read_checkpoint(source)
    model = trained_model(config_from_dict(state["config"], f"checkpoint {name}"))
    model.load_state_dict(state["model"])
    return model.eval()


def read_checkpoint(source: str) -> tuple[str, dict[str, Any]]:
    """(where it is, state) of the checkpoint `source` names. A run folder's newest checkpoint that
    reads back whole is taken, with a warning for each newer one that does not; only its
    `checkpoint_*` folders are looked at (Ray's JSON snapshot beside them is never read)."""
    if source.endswith(".pt") or Path(source).is_file() or storage.exists(storage.join(source, CHECKPOINT_FILE)):
        return source, _read_checkpoint(source)
    names = checkpoint_dirs(storage.list_dirs(source))
    if not names:
        raise LCRError(f"model {source}: no checkpoint in this folder; expected a checkpoint (file or "
                       "folder), a run folder holding checkpoint_* folders, or an MLflow model URI")
    found = newest_readable(names, lambda name: _read_checkpoint(storage.join(source, name)),
                            lambda message: print(f"warning: {message}", file=sys.stderr, flush=True))
    if found is None:
        raise LCRError(f"model {source}: none of its {len(names)} checkpoints reads back whole (see the "
                       "warnings above); expected at least one intact checkpoint")
    return storage.join(source, found[0]), found[1]


def _read_checkpoint(source: str) -> dict[str, Any]:
    """A checkpoint file or folder; from S3, its file and checksum are downloaded first."""
    if not storage.is_s3(source):
        return load_checkpoint(source)
    folder = source.rsplit("/", 1)[0] if source.endswith(".pt") else source
    with tempfile.TemporaryDirectory() as tmp:
        for name in (CHECKPOINT_FILE, CHECKSUM_FILE):
            storage.download(storage.join(folder, name), Path(tmp, name))
        return load_checkpoint(tmp, storage.join(folder, CHECKPOINT_FILE))
