"""`lcr demo`: the main job end to end on this machine, on the embedded defaults.

    synthetic fine-grained set -> WebDataset shards (local folder)
      -> LCR pretraining on Ray Train (local Ray, 2 gloo workers) logged to MLflow (SQLite)
      -> retrieval + linear probes at 100/50/20 % labels + attention report
      -> one summary table: LCR pooling next to GAP pooling of the same weights.

Every piece is the same step a cluster runs; only the defaults differ.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from components import storage
from components.data import read_manifest
from components.features import EvaluationSetup, default_poolings, load_model
from components.pretrain import pretrain
from components.report import evaluate
from components.shards import build_shards
from lcr_core.config import LCRConfig, load_config
from lcr_core.errors import LCRError
from lcr_core.synthetic import SyntheticSpec

FRACTIONS = [1.0, 0.5, 0.2]


def demo_spec(cfg: LCRConfig, num_classes: int, train_per_class: int, test_per_class: int,
              family: str = "bird") -> SyntheticSpec:
    # Rendered a little larger than the training crop, as real data sets are resized and cropped.
    return SyntheticSpec(num_classes=num_classes, train_per_class=train_per_class, test_per_class=test_per_class,
                         image_size=cfg.eval_resize, seed=cfg.seed, family=family)


def ensure_shards(cfg: LCRConfig, spec: SyntheticSpec) -> None:
    """Write the synthetic set as shards unless shards of this very spec are already there. Shards of
    another synthetic spec are replaced; those of a real data set are never (the build refuses)."""
    manifests = []
    for split in ("train", "test"):
        try:
            manifests.append(read_manifest(storage.join(cfg.shards, split)))
        except LCRError:  # missing or interrupted: built afresh
            pass
    synthetic = [m for m in manifests if m.dataset == "synthetic"]
    if len(synthetic) == 2 and all(_spec_of(m) == spec for m in synthetic):
        print(f"shards: reusing {cfg.shards} ({manifests[0].total} train / {manifests[1].total} test images)")
        return
    build_shards("synthetic", cfg.shards, options=spec.to_dict(),
                 overwrite=bool(synthetic) and len(synthetic) == len(manifests))


def _spec_of(manifest) -> SyntheticSpec | None:
    try:
        return SyntheticSpec.from_options(manifest.options)
    except LCRError:  # written by another version of the generator
        return None


def run_demo(cfg: LCRConfig, spec: SyntheticSpec, report_dir: str | Path) -> str:
    started = time.monotonic()
    print(f"[1/3] shards: synthetic {spec.family} set, {spec.num_classes} classes, at {cfg.shards}")
    ensure_shards(cfg, spec)
    print(f"[2/3] pretrain: {cfg.variant} on Ray Train, {cfg.num_workers} workers, {cfg.epochs} epochs")
    result = pretrain(cfg)
    print(f"[3/3] evaluate: retrieval, linear probes at {', '.join(f'{f:.0%}' for f in FRACTIONS)}, report")
    model = load_model(result.model_uri or result.checkpoint_uri)
    setup = EvaluationSetup(model, cfg.shards, default_poolings(model), batch_size=128,
                            workers=cfg.loader_workers, cache_dir=str(Path(cfg.storage_path) / "features"))
    table, report = evaluate(setup, result.model_uri or result.checkpoint_uri, FRACTIONS, report_dir,
                             seed=cfg.seed, experiment=cfg.mlflow_experiment)
    minutes = (time.monotonic() - started) / 60
    return "\n".join([
        "",
        f"{cfg.variant} on the synthetic set ({spec.num_classes} classes; retrieval over the test split, "
        f"linear probes on train subsets), in %:",
        table,
        "",
        f"MLflow: pretraining run {result.mlflow_run_id}, evaluation run {report.mlflow_run_id} "
        f"(`mlflow ui --backend-store-uri sqlite:///mlflow.db` to browse)",
        f"model: {result.model_uri}",
        f"report: {report.html.resolve()}",
        f"done in {minutes:.1f} min",
    ])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="demo", help="a YAML file or a shipped config name (default: demo)")
    parser.add_argument("--classes", type=int, default=12, help="synthetic classes")
    parser.add_argument("--train-per-class", type=int, default=40)
    parser.add_argument("--test-per-class", type=int, default=20)
    parser.add_argument("--family", default="bird", help="synthetic object family: bird (the recipe was "
                                                          "tuned on it) or beetle (held out to validate it)")
    parser.add_argument("--report", default="reports/demo", help="folder for the attention report")
    parser.add_argument("overrides", nargs="*", metavar="FIELD=VALUE", help="config overrides, e.g. epochs=2")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    spec = demo_spec(cfg, args.classes, args.train_per_class, args.test_per_class, args.family)
    print(run_demo(cfg, spec, args.report))
    return 0
