"""`lcr demo`: the pipeline end to end on this machine, on the embedded defaults.

    synthetic fine-grained set -> WebDataset shards (local folder)
      -> the Kubeflow pipeline with kfp's local runner (pipeline/pipeline.py):
         check-new-shards -> LCR pretraining on local Ray Train (2 gloo workers), MLflow on SQLite
         -> retrieval, linear probes at 100/50/20 % labels, attention report
         -> register + gated promotion (models:/lcr-demo@champion) -> summary

Every piece is the step a cluster runs; only the defaults differ. A demo always trains (a second one
starts from the first one's champion and must beat it to take the alias); a scheduled pipeline
trains only when the shards are new.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from components import storage, tracking
from components.data import read_manifest
from components.shards import build_shards
from lcr_core.config import LCRConfig, load_config
from lcr_core.errors import LCRError
from lcr_core.synthetic import SyntheticSpec
from pipeline.cli import DEFAULT_ROOT, run_local


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


def demo_params(cfg: LCRConfig, config: str, overrides: list[str], model_name: str) -> dict:
    return {"shards": str(Path(cfg.shards).resolve()), "config": config, "overrides": overrides,
            "mlflow_uri": tracking.tracking_uri(), "model_name": model_name, "run_prefix": cfg.run_name,
            "mode": "local", "always_train": True, "warm_start": True,
            "cache_dir": str(Path(cfg.storage_path, "features").resolve())}


def run_demo(cfg: LCRConfig, spec: SyntheticSpec, params: dict, root: str) -> str:
    started = time.monotonic()
    print(f"shards: synthetic {spec.family} set, {spec.num_classes} classes, at {cfg.shards}", flush=True)
    ensure_shards(cfg, spec)
    print(f"pipeline: {cfg.variant} on local Ray Train ({cfg.num_workers} workers, {cfg.epochs} epochs), then "
          f"evaluation and promotion to {params['model_name']}@champion", flush=True)
    summary = run_local(params, root)
    store = params["mlflow_uri"].removeprefix("sqlite:///")
    return "\n".join([
        "",
        summary,
        "",
        f"MLflow UI: mlflow ui --backend-store-uri sqlite:///{store}",
        f"done in {(time.monotonic() - started) / 60:.1f} min",
    ])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="demo", help="a YAML file or a shipped config name (default: demo)")
    parser.add_argument("--classes", type=int, default=12, help="synthetic classes")
    parser.add_argument("--train-per-class", type=int, default=40)
    parser.add_argument("--test-per-class", type=int, default=20)
    parser.add_argument("--family", default="bird", help="synthetic object family: bird (the recipe was "
                                                          "tuned on it) or beetle (held out to validate it)")
    parser.add_argument("--model-name", default="lcr-demo", help="the registered model (default: lcr-demo)")
    parser.add_argument("--root", default=DEFAULT_ROOT, help="where the pipeline's artefacts go")
    parser.add_argument("overrides", nargs="*", metavar="FIELD=VALUE", help="config overrides, e.g. epochs=2")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    spec = demo_spec(cfg, args.classes, args.train_per_class, args.test_per_class, args.family)
    params = demo_params(cfg, args.config, args.overrides, args.model_name)
    print(run_demo(cfg, spec, params, args.root))
    return 0
