"""One configuration object for a whole run, validated once at the edge.

A run is configured by a YAML file (see `lcr_core/configs/`) plus `field=value` overrides from the
command line. Every step (`lcr demo`, `lcr pretrain`, `lcr retrieve`, ...) reads the same object.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from lcr_core.errors import LCRError

CONFIG_DIR = Path(__file__).parent / "configs"

VARIANTS = (
    "moco",
    "lcr",
    "lcr-multitask",
    "lcr-dualpool",
    "lcr-mlp",
    "sam-ssl",
    "sam-ssl-bilinear",
    "moco-bilinear",
    "byol",
    "byol-lcr",
)
BACKBONES = ("resnet50", "resnet18", "efficientnet_lite0", "tiny")
PROJECTORS = ("bn3", "mocov2")
GRADCAM_SOURCES = ("positive_logit", "log_prob", "loss")
# Leading stages `freeze_stages` may freeze (see lcr_core/backbones.py).
BACKBONE_STAGES = {"resnet50": 5, "resnet18": 5, "efficientnet_lite0": 9, "tiny": 4}
GRADCAM_NORMALIZATIONS = ("minmax", "max", "none")
KL_REDUCTIONS = ("mean", "sum")
FITTING_PRESETS = ("paper", "released-code")
# The authors tuned nu = 0.01 with `kl_div(..., reduction='sum')` at 32 images per GPU (batch 128 on
# 4 GPUs): per image that is 0.01 * 32 times the weight of a batch-mean KL. Our default keeps that
# strength under a per-image mean, so that it does not change with the per-worker batch.
AUTHORS_NU = 0.01
AUTHORS_IMAGES_PER_GPU = 32
# What the authors' released code trains on (DESIGN §1), applied beneath the user's own values.
PRESET_FIELDS: dict[str, dict[str, Any]] = {
    "paper": {},
    "released-code": {"gradcam_source": "loss", "gradcam_normalize": "none", "gfb_bn_relu": True,
                      "kl_reduction": "sum", "kl_weight": AUTHORS_NU},
}


class ConfigError(LCRError):
    """A bad configuration value; the message is one line naming the field."""


@dataclass
class LCRConfig:
    # --- method (DESIGN §1) ---
    variant: str = "lcr"
    backbone: str = "resnet50"
    backbone_weights: str | None = None  # local path, s3:// URI, or `imagenet` (packaged); None = random init
    # A warm start: a new run starts from this model's weights (`lcr retrieve --model` refs: models:/NAME@ALIAS,
    # models:/NAME/VERSION, runs:/…, a checkpoint file or folder, a run folder runs/NAME; local or s3://).
    # The architecture fields must match. It supersedes backbone_weights, which is then not loaded (the
    # pipeline adds it on top of configs that start from ImageNet). A resumed run ignores it: its own
    # checkpoint wins. See components/warm_start.py.
    init_from: str | None = None
    allow_random_init: bool = True  # the paper configs set false: they mean an ImageNet start
    freeze_stages: int = 0  # leading backbone stages kept frozen (weights and BN statistics)
    embed_dim: int = 256
    projector: str = "bn3"  # bn3: 3-layer BN head (paper §4.1); mocov2: Linear-ReLU-Linear, no BN
    projector_hidden: int = 2048
    queue_size: int = 65536
    momentum: float = 0.999  # key / target encoder EMA
    temperature: float = 0.2  # t in eq. 1
    num_projections: int = 32  # K in eq. 4
    gfb_bn_relu: bool = False  # BN+ReLU between the 1x1 conv and the max-out (authors' code)
    gfb_mlp_hidden: int = 32  # hidden width of the `lcr-mlp` branch (§4.6)
    kl_temperature: float = 0.4  # tau in eq. 5
    kl_weight: float = AUTHORS_NU * AUTHORS_IMAGES_PER_GPU  # nu in eq. 7, for kl_reduction: mean
    kl_reduction: str = "mean"  # mean: per-image mean of eq. 6; sum: the authors' sum over the batch
    cl_weight: float = 1.0  # lambda in eq. 7
    gradcam_source: str = "positive_logit"  # positive_logit = q.k, as algorithm A1 differentiates
    gradcam_normalize: str = "minmax"  # per image, before the softmax of eq. 5 (DESIGN §1, "Scale")
    fitting_preset: str = "paper"  # released-code: the authors' code's fitting signal (DESIGN §1)
    gfb_lr_scale: float = 1.0  # the GradCAM fitting branch's learning rate, relative to the rest
    # True: the fitting loss trains the branch only, no KL gradient reaches the trunk (not the paper's
    # multi-task setting; a diagnostic of whether the branch can fit a target the trunk does not chase)
    gfb_stop_gradient: bool = False
    bn_splits: int = 1  # single process: split-batch BN groups for the key encoder (1 = plain BN)

    # --- images ---
    image_size: int = 224
    eval_resize: int = 256

    # --- optimisation ---
    epochs: int = 100
    batch_size: int = 128  # global batch, split evenly over the workers
    lr: float = 0.03  # for a global batch of `lr_base_batch`, scaled linearly
    lr_base_batch: int = 128
    weight_decay: float = 1e-4
    sgd_momentum: float = 0.9
    warmup_epochs: int = 0
    seed: int = 0

    # --- data ---
    shards: str = "data/shards"  # folder or s3://bucket/prefix holding train/ and test/ splits
    loader_workers: int = 2

    # --- distributed run ---
    run_name: str = "lcr"
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    storage_path: str = "runs"  # folder or s3://bucket/prefix for checkpoints
    checkpoint_every_steps: int = 0  # 0 = only at epoch ends
    eval_every_epochs: int = 0  # > 0: retrieval on the shards' test split every N epochs (`lcr tune`)
    max_failures: int = 2  # worker-group restarts from the last checkpoint before the run fails
    keep_checkpoints: int = 3  # checkpoints Ray keeps (the newest; the run's latest always among them)
    collective_timeout_s: int = 1800  # a dead rank blocks the others' collectives this long
    mlflow_experiment: str = "lcr"

    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes carried into MLflow

    # ------------------------------------------------------------------
    @property
    def uses_gfb(self) -> bool:
        return self.variant not in ("moco", "byol")

    @property
    def fits_gradcam(self) -> bool:
        return self.variant not in ("moco", "moco-bilinear", "byol")

    @property
    def is_byol(self) -> bool:
        return self.variant.startswith("byol")

    @property
    def train_pooling(self) -> str:
        if self.variant == "lcr-dualpool":
            return "attention"
        if self.variant.endswith("bilinear"):
            return "bilinear"
        return "gap"

    @property
    def test_pooling(self) -> str:
        if self.variant in ("lcr", "lcr-dualpool", "lcr-mlp", "byol-lcr"):
            return "attention"
        return self.train_pooling

    @property
    def gfb_projections(self) -> int:
        return 1 if self.variant == "sam-ssl" else self.num_projections

    @property
    def per_worker_batch(self) -> int:
        return self.batch_size // self.num_workers

    @property
    def scaled_lr(self) -> float:
        return self.lr * self.batch_size / self.lr_base_batch

    def validate(self) -> LCRConfig:
        def bad(name: str, expected: str) -> None:
            raise ConfigError(f"config field '{name}' = {getattr(self, name)!r}: expected {expected}")

        for name, choices in (
            ("variant", VARIANTS),
            ("backbone", BACKBONES),
            ("projector", PROJECTORS),
            ("gradcam_source", GRADCAM_SOURCES),
            ("gradcam_normalize", GRADCAM_NORMALIZATIONS),
            ("kl_reduction", KL_REDUCTIONS),
            ("fitting_preset", FITTING_PRESETS),
        ):
            if getattr(self, name) not in choices:
                bad(name, "one of " + ", ".join(choices))
        for name in ("embed_dim", "projector_hidden", "num_projections", "gfb_mlp_hidden", "image_size",
                     "eval_resize", "epochs", "batch_size", "lr_base_batch", "num_workers", "bn_splits",
                     "collective_timeout_s", "keep_checkpoints"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, "an integer >= 1")
        for name in ("temperature", "kl_temperature", "lr", "cpus_per_worker", "gfb_lr_scale"):
            if not getattr(self, name) > 0 or not math.isfinite(getattr(self, name)):
                bad(name, "a finite number > 0")
        for name in ("kl_weight", "cl_weight", "weight_decay", "sgd_momentum", "warmup_epochs",
                     "checkpoint_every_steps", "max_failures", "loader_workers", "freeze_stages",
                     "eval_every_epochs"):
            if not getattr(self, name) >= 0 or not math.isfinite(getattr(self, name)):
                bad(name, "a finite number >= 0")
        if self.freeze_stages >= (stages := BACKBONE_STAGES[self.backbone]):
            bad("freeze_stages", f"at most {stages - 1}: {self.backbone} has {stages} stages and GradCAM "
                                 "needs a trainable last one")
        if self.backbone_weights == "imagenet" and self.backbone != "efficientnet_lite0":
            bad("backbone_weights", "a path or s3:// URI: packaged ImageNet weights exist only for "
                                    "efficientnet_lite0")
        if self.init_from is not None and (not isinstance(self.init_from, str) or not self.init_from.strip()):
            bad("init_from", "a model reference (models:/NAME@ALIAS, runs:/…, a checkpoint or a run folder) or null")
        if self.backbone_weights is None and self.init_from is None and not self.allow_random_init:
            bad("backbone_weights", "initial weights (a path, an s3:// URI, or 'imagenet' for "
                                    "efficientnet_lite0); this config starts from ImageNet like the paper "
                                    "(set allow_random_init: true to start from random weights, or "
                                    "init_from to start from a trained model)")
        if not 0.0 <= self.momentum < 1.0:
            bad("momentum", "a number in [0, 1)")
        if self.eval_resize < self.image_size:
            bad("eval_resize", f"at least image_size ({self.image_size})")
        if self.batch_size % self.num_workers:
            bad("batch_size", f"a multiple of num_workers ({self.num_workers})")
        if self.per_worker_batch % self.bn_splits:
            bad("bn_splits", f"a divisor of the per-worker batch ({self.per_worker_batch})")
        if self.queue_size < 1 or self.queue_size % self.batch_size:
            bad("queue_size", f"a positive multiple of the global batch ({self.batch_size})")
        if self.warmup_epochs >= self.epochs:
            bad("warmup_epochs", f"fewer than epochs ({self.epochs})")
        if not self.run_name or "/" in self.run_name:
            bad("run_name", "a non-empty name without '/'")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def parse_value(text: str) -> Any:
    """A command-line value as users write it: numbers as numbers (`1e-4` too, which YAML 1.1 reads
    as a string), then YAML for the rest (`true`, `null`, `[a, b]`, strings)."""
    text = text.strip()
    if _NUMBER.fullmatch(text):
        number = float(text)
        return int(text) if re.fullmatch(r"[-+]?\d+", text) else number
    return yaml.safe_load(text) if text else None


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected field=value")
    key, value = text.split("=", 1)
    try:
        return key.strip(), parse_value(value)
    except yaml.YAMLError:
        raise ConfigError(f"override {text!r}: the value is not valid YAML") from None


def config_from_dict(values: dict[str, Any], source: str = "config",
                     origins: dict[str, str] | None = None) -> LCRConfig:
    """A validated LCRConfig; `origins` names where a field's value came from (an override) when
    that is not `source`, so that an error points at what the user typed."""
    origins = origins or {}
    known = {f.name for f in fields(LCRConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        where = origins.get(unknown[0], source)
        raise ConfigError(f"{where}: unknown field '{unknown[0]}' (known fields: see lcr_core/config.py)")
    preset = values.get("fitting_preset", "paper")
    cfg = LCRConfig(**(PRESET_FIELDS.get(preset, {}) | values))
    for f in fields(LCRConfig):  # YAML gives ints for floats ("lr: 1"); reject strings for numbers
        value = getattr(cfg, f.name)
        where = origins.get(f.name, source)
        if f.type in ("float", "int") and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"{where}: field '{f.name}' = {value!r}: expected a number")
        if f.type == "bool" and not isinstance(value, bool):
            raise ConfigError(f"{where}: field '{f.name}' = {value!r}: expected true or false")
        if f.type == "str" and not isinstance(value, str):  # `shards=` reads as null
            raise ConfigError(f"{where}: field '{f.name}' = {value!r}: expected a non-empty string")
    return cfg.validate()


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A path to a YAML file, or the name of a shipped config (`cub`, `demo`, ...)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config {str(name_or_path)!r}: no such file and no shipped config of that name ({names})")


def load_config(name_or_path: str | Path | None = None, overrides: list[str] | None = None) -> LCRConfig:
    values: dict[str, Any] = {}
    source = "defaults"
    if name_or_path is not None:
        path = resolve_config_path(name_or_path)
        source = str(path)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of field: value")
        values.update(loaded)
    origins = {}
    for text in overrides or []:
        key, value = _parse_override(text)
        values[key], origins[key] = value, f"override {text!r}"
    return config_from_dict(values, source, origins)


def config_yaml(cfg: LCRConfig) -> str:
    """The resolved configuration as YAML that `load_config` reads back to the same object."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def warn_queue_exceeds_dataset(cfg: LCRConfig, dataset_size: int) -> None:
    if cfg.queue_size > dataset_size:
        warnings.warn(
            f"queue_size {cfg.queue_size} exceeds the {dataset_size} training images: "
            "the queue will hold stale copies of the same images",
            stacklevel=2,
        )
