"""`init_from`: a new run that starts from a trained model's weights (a warm start), e.g. the pipeline's
retraining on new shards from the registry's champion.

The source is any model reference `lcr retrieve --model` reads, but `init:`: a registered model
(`models:/NAME@ALIAS`, `models:/NAME/VERSION`), another MLflow model URI (`runs:/…`, `models:/m-…`), a
checkpoint file or folder, or a run folder (`runs/NAME`: its newest intact checkpoint), local or s3://.
Its architecture (`ARCHITECTURE_FIELDS`) must be this run's.

What the run takes: from a checkpoint, the whole model (query and key encoders, each with its backbone,
GradCAM fitting branch and projector; BYOL's predictor); from an MLflow model, which holds the query
encoder only, the query encoder, copied into the key encoder as MoCo starts. Never the queue: it holds
the source's keys of the source's images at the source's queue_size, a new run refills it within
queue_size / batch_size steps, and so every form of source starts from the same kind of queue.
Optimizer, schedule and step counters start afresh. A run that resumes from its own checkpoint
ignores `init_from`.

The driver reads the source once, before Ray starts (`components.preflight.warm_start`), and puts the
weights in Ray's object store; rank 0 takes them from there, and DDP copies rank 0's weights to the
other ranks when it wraps the model. So workers on other nodes need not reach the source (a local
checkpoint, a SQLite MLflow store beside the driver).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import mlflow
import torch

from components import tracking
from components.features import INIT_PREFIX
from lcr_core.config import LCRConfig, config_from_dict
from lcr_core.errors import LCRError
from lcr_core.model import LCRModel

# The fields that shape the model's weights; the others (image_size, queue_size, batch_size, bn_splits,
# freeze_stages, ...) may change between the source and the run.
ARCHITECTURE_FIELDS = ("variant", "backbone", "embed_dim", "projector", "projector_hidden", "num_projections",
                       "gfb_bn_relu", "gfb_mlp_hidden")
NOT_TAKEN = ("queue", "queue_ptr")
ENCODERS = ("encoder_q.", "encoder_k.")
LEFT_TO_THE_RUN = ("queue", "predictor.")  # state_dict keys a source may lack: the run's own are kept
INIT_FROM_TAG = "lcr.init_from"
REGISTERED_MODEL = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))/?")
LOGGED_MODEL = re.compile(r"models:/(?P<id>m-[^/@]+)/?")


class WarmStartError(LCRError):
    """An `init_from` source that cannot be read or does not fit the run."""


@dataclass
class WarmStart:
    ref: str  # as the config gives it
    config: LCRConfig  # the source's
    weights: dict[str, torch.Tensor]  # LCRModel state_dict entries to load
    lineage: dict[str, str] = field(default_factory=dict)  # MLflow tags naming exactly what was read

    def tags(self) -> dict[str, str]:
        return {INIT_FROM_TAG: self.ref, **self.lineage}

    def describe(self) -> str:
        found = ", ".join(f"{name.removeprefix(INIT_FROM_TAG + '.')} {value}" for name, value in self.lineage.items())
        return f"warm start from {self.ref}" + (f" ({found})" if found else "")


def read_source(ref: str) -> WarmStart:
    """The source's config and weights; a one-line WarmStartError naming `ref` if it cannot be read."""
    if ref.startswith(INIT_PREFIX):
        raise WarmStartError(f"init_from {ref}: an untrained network; expected a trained model (models:/NAME@ALIAS, "
                             "runs:/…, a checkpoint or a run folder)")
    try:
        return from_mlflow(ref) if tracking.is_model_uri(ref) else from_checkpoint(ref)
    except mlflow.exceptions.MlflowException as err:
        raise WarmStartError(naming(ref, str(err).strip().splitlines()[0])) from None
    except LCRError as err:
        raise WarmStartError(naming(ref, str(err))) from None


def naming(ref: str, message: str) -> str:
    """`message` as an init_from error that names `ref` once."""
    return f"init_from: {message}" if ref in message else f"init_from {ref}: {message}"


def from_checkpoint(ref: str) -> WarmStart:
    where, state = tracking.read_checkpoint(ref)
    weights = {name: tensor for name, tensor in state["model"].items() if name not in NOT_TAKEN}
    return WarmStart(ref, config_from_dict(state["config"], f"checkpoint {where}"), weights,
                     {f"{INIT_FROM_TAG}.checkpoint": where})


def from_mlflow(ref: str) -> WarmStart:
    uri, lineage = pinned(ref)
    model = tracking.load_encoder(uri)
    weights = {name: tensor for name, tensor in model.state_dict().items() if name.startswith(ENCODERS)}
    return WarmStart(ref, model.cfg, weights, lineage)


def pinned(ref: str) -> tuple[str, dict[str, str]]:
    """(the URI to load, lineage tags). An alias is resolved to its version first, and that version is
    loaded: the alias may move while the run starts, the recorded version is what it trained from."""
    client = mlflow.MlflowClient(tracking.tracking_uri())
    if registered := REGISTERED_MODEL.fullmatch(ref):
        name, alias, version = registered["name"], registered["alias"], registered["version"]
        found = (client.get_model_version_by_alias(name, alias) if alias
                 else client.get_model_version(name, version))
        return f"models:/{name}/{found.version}", {f"{INIT_FROM_TAG}.model_name": name,
                                                   f"{INIT_FROM_TAG}.model_version": str(found.version),
                                                   f"{INIT_FROM_TAG}.run_id": found.run_id or ""}
    if ref.startswith("runs:/"):
        return ref, {f"{INIT_FROM_TAG}.run_id": ref.removeprefix("runs:/").split("/")[0]}
    if logged := LOGGED_MODEL.fullmatch(ref):  # as `lcr pretrain` records its model (lcr.model_uri)
        return ref, {f"{INIT_FROM_TAG}.run_id": client.get_logged_model(logged["id"]).source_run_id or ""}
    return ref, {}  # a model folder on disk


def check_compatible(source: WarmStart, cfg: LCRConfig) -> None:
    """One line naming every architecture field in which the source differs from the run."""
    differ = [f"{name} {getattr(source.config, name)} != this run's {getattr(cfg, name)}"
              for name in ARCHITECTURE_FIELDS if getattr(source.config, name) != getattr(cfg, name)]
    if differ:
        raise WarmStartError(f"init_from {source.ref}: {', '.join(differ)}; expected a model of this run's "
                             "architecture (or another init_from)")


def load_weights(model: LCRModel, weights: dict[str, torch.Tensor]) -> None:
    """The source's weights into a freshly built model; what the source does not hold (the queue, an
    MLflow model's BYOL predictor) stays as the run drew it."""
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [name for name in missing if not name.startswith(LEFT_TO_THE_RUN)]
    if missing or unexpected:
        raise WarmStartError(f"init_from weights do not fit the {model.cfg.backbone}/{model.cfg.variant} model "
                             f"({len(missing)} missing e.g. {missing[:1]}, {len(unexpected)} unexpected e.g. "
                             f"{unexpected[:1]})")
