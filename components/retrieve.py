"""`lcr retrieve`: leave-one-out retrieval on the test split (DESIGN §2).

    lcr retrieve --model runs/lcr-demo/checkpoint_00000120 --shards data/shards [--pooling attention gap]

Every test image is embedded once per pooling (cached, see `components.features`); each one in turn
is the query against all the others by cosine similarity: rank-1, rank-5 and mAP over all same-class
images, with chance levels alongside. The variant's pooling and GAP come from the same weights.
Metrics go to MLflow as `retrieval/<pooling>/<metric>`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from components import storage, tracking
from components.data import Manifest, read_manifest
from components.features import (
    EvaluationSetup,
    Features,
    add_common_arguments,
    evaluation_run,
    model_fingerprint,
    setup_from_args,
    split_features,
)
from lcr_core.metrics import chance_levels, retrieval_metrics

KS = (1, 5)
CHECKSUM_TAG = "lcr.test_manifest_sha256"  # on a run: the test split its retrieval metrics were computed on


def manifest_checksum(manifest: Manifest) -> str:
    return hashlib.sha256(manifest.to_json().encode()).hexdigest()


@dataclass
class RetrievalResult:
    metrics: dict[str, dict[str, float | int]]  # pooling -> rank1, rank5, mAP, queries, excluded, chance_*
    mlflow_run_id: str


def evaluate_retrieval(features: Features, ks: tuple[int, ...] = KS, block_size: int | None = None) -> dict:
    """Retrieval metrics of one set of test features, with what random rankings would score."""
    metrics = retrieval_metrics(features.embeddings, features.labels, ks=ks, block_size=block_size)
    return {**metrics, **chance_levels(features.labels, ks)}


def retrieve(setup: EvaluationSetup, model_ref: str, run_id: str | None = None,
             experiment: str | None = None) -> RetrievalResult:
    test_uri = storage.join(setup.shards, "test")
    features = split_features(setup.model, test_uri, setup.poolings, batch_size=setup.batch_size,
                              workers=setup.workers, cache_dir=setup.cache_dir,
                              model_hash=model_fingerprint(setup.model))
    results = {pooling: evaluate_retrieval(f) for pooling, f in features.items()}
    with evaluation_run(setup.model, "retrieve", model_ref, run_id, experiment) as logger:
        logger.log_params({"retrieve.model": model_ref, "retrieve.shards": tracking.without_credentials(setup.shards),
                           "retrieve.poolings": " ".join(setup.poolings)})
        logger.log({f"retrieval/{pooling}/{name}": value for pooling, metrics in results.items()
                    for name, value in metrics.items()}, step=0)
        logger.set_tag(CHECKSUM_TAG, manifest_checksum(read_manifest(test_uri)))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp, "retrieval.json")
            path.write_text(json.dumps(results, indent=1))
            logger.log_artifact(path, "retrieval")
        return RetrievalResult(results, logger.run_id)


def format_table(results: dict[str, dict[str, float | int]], ks: tuple[int, ...] = KS) -> str:
    names = [f"rank{k}" for k in ks] + ["mAP"]
    lines = [f"{'pooling':<10}" + "".join(f"{n:>18}" for n in names) + f"{'queries':>9}{'excluded':>9}"]
    for pooling, m in results.items():
        cells = "".join(f"{100 * m[n]:>7.2f} (ch {100 * m['chance_' + n]:5.2f})" for n in names)
        lines.append(f"{pooling:<10}{cells}{m['queries']:>9}{m['excluded']:>9}")
    return "\n".join(lines) + "\n(percent; ch = chance level of a random ranking)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    result = retrieve(setup_from_args(args), args.model, args.run_id, args.experiment)
    print(format_table(result.metrics))
    print(f"MLflow run {result.mlflow_run_id}")
    return 0
