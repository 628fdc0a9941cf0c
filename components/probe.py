"""`lcr probe`: linear probes on the frozen encoder at several label fractions (DESIGN §2).

    lcr probe --model runs/lcr-demo/checkpoint_00000120 --shards data/shards --fractions 1.0 0.5 0.2

The encoder runs once, in eval mode, over the train and test splits (features cached, see
`components.features`). Each fraction is then an independent unit, `probe_fraction`: a
class-stratified subset of the training labels (at least one image per class, fixed seed), a linear
classifier fitted on its cached features, top-1 / top-5 on the whole test split. A pipeline can run
the units in parallel. Metrics go to MLflow as `probe/<pooling>/top1_<percent>pct`, and the sample
keys each subset chose as `probe/subset_<percent>pct.txt`.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from components import storage
from components.data import read_manifest
from components.features import (
    EvaluationError,
    EvaluationSetup,
    Features,
    add_common_arguments,
    evaluation_run,
    model_fingerprint,
    setup_from_args,
    split_features,
)
from lcr_core.probe import check_fraction, stratified_subset, topk_accuracy, train_linear_probe

KS = (1, 5)
SPLITS = ("train", "test")
DEFAULT_FRACTIONS = (1.0, 0.5, 0.2)


@dataclass
class ProbeFeatures:
    """Cached features of both splits for one pooling: the input of every probe unit."""

    train: Features
    test: Features

    @property
    def num_classes(self) -> int:
        return len(self.train.class_names)


@dataclass
class FractionResult:
    pooling: str
    fraction: float
    train_images: int
    keys: list[str]  # the training samples whose labels were used
    accuracy: dict[str, float]  # top1, top5 on the test split, plus chance_top1, chance_top5


def percent(fraction: float) -> str:
    return f"{100 * fraction:g}"


def probe_fraction(features: ProbeFeatures, fraction: float, seed: int = 0) -> FractionResult:
    """One unit: fit a linear probe on a stratified `fraction` of the training labels, test it."""
    fraction = check_fraction(fraction)
    subset = stratified_subset(features.train.labels, fraction, seed)
    probe = train_linear_probe(features.train.embeddings[subset], features.train.labels[subset],
                               features.num_classes)
    with torch.no_grad():
        logits = probe(torch.from_numpy(features.test.embeddings))
    accuracy = topk_accuracy(logits, features.test.labels, KS)
    accuracy.update({f"chance_top{k}": min(1.0, k / features.num_classes) for k in KS})
    return FractionResult(features.train.pooling, fraction, len(subset),
                          [features.train.keys[i] for i in subset], accuracy)


def check_same_classes(shards: str) -> None:
    """A probe trained on one class list and tested on another reports accuracies that mean nothing
    (label i names different classes): refused before any embedding."""
    train, test = (read_manifest(storage.join(shards, split)).class_names for split in SPLITS)
    if train != test:
        raise EvaluationError(f"{shards}: the train and test splits have different class lists ({len(train)} "
                              f"and {len(test)} classes); expected one list for both (build both splits "
                              "from one source)")


def probe_features(setup: EvaluationSetup) -> dict[str, ProbeFeatures]:
    """{pooling: ProbeFeatures}: the encoder's only work, done once for all fractions."""
    check_same_classes(setup.shards)
    model_hash = model_fingerprint(setup.model)
    by_split = {split: split_features(setup.model, storage.join(setup.shards, split), setup.poolings,
                                      batch_size=setup.batch_size, workers=setup.workers,
                                      cache_dir=setup.cache_dir, model_hash=model_hash)
                for split in SPLITS}
    return {p: ProbeFeatures(by_split["train"][p], by_split["test"][p]) for p in setup.poolings}


def run_probes(setup: EvaluationSetup, model_ref: str, fractions: list[float], seed: int = 0,
               run_id: str | None = None, experiment: str | None = None) -> tuple[list[FractionResult], str]:
    fractions = [check_fraction(f) for f in fractions]  # before any embedding
    features = probe_features(setup)
    results = [probe_fraction(f, fraction, seed) for f in features.values() for fraction in fractions]
    with evaluation_run(setup.model, "probe", model_ref, run_id, experiment) as logger:
        # No fractions here: they are in the metrics' names, and probes of other fractions may log
        # into the same run at the same time (the pipeline's), where a param cannot change.
        logger.log_params({"probe.model": model_ref, "probe.shards": setup.shards, "probe.seed": str(seed),
                           "probe.poolings": " ".join(setup.poolings)})
        metrics = {}
        for r in results:
            metrics.update({f"probe/{r.pooling}/{name}_{percent(r.fraction)}pct": value
                            for name, value in r.accuracy.items()})
            metrics[f"probe/train_images_{percent(r.fraction)}pct"] = r.train_images
        logger.log(metrics, step=0)
        with tempfile.TemporaryDirectory() as tmp:
            for r in {r.fraction: r for r in results}.values():  # the subset does not depend on the pooling
                path = Path(tmp, f"subset_{percent(r.fraction)}pct.txt")
                path.write_text("\n".join(r.keys) + "\n")
                logger.log_artifact(path, "probe")
        return results, logger.run_id


def format_table(results: list[FractionResult]) -> str:
    lines = [f"{'pooling':<10}{'labels':>8}{'images':>8}{'top-1':>8}{'top-5':>8}   chance top-1/top-5"]
    for r in results:
        a = r.accuracy
        lines.append(f"{r.pooling:<10}{percent(r.fraction) + '%':>8}{r.train_images:>8}"
                     f"{100 * a['top1']:>8.2f}{100 * a['top5']:>8.2f}"
                     f"   {100 * a['chance_top1']:.2f} / {100 * a['chance_top5']:.2f}")
    return "\n".join(lines) + "\n(percent)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--fractions", nargs="+", type=float, default=list(DEFAULT_FRACTIONS),
                        help="shares of the training labels, each in (0, 1]")
    parser.add_argument("--seed", type=int, default=0, help="seed of the stratified subsets")


def run(args: argparse.Namespace) -> int:
    results, run_id = run_probes(setup_from_args(args), args.model, args.fractions, args.seed,
                                 args.run_id, args.experiment)
    print(format_table(results))
    print(f"MLflow run {run_id}")
    return 0
