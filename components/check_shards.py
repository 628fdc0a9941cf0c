"""`lcr check-shards`: is there anything new to train on? The first step of every scheduled run.

The champion's registry tags name the checksum of the train manifest it was trained on
(`lcr.train_manifest_sha256`, written by `lcr register`). When the bucket's current train manifest
has the same checksum, nothing is new and the rest of the pipeline is skipped. Otherwise the run is
named after the new manifest (`<prefix>-<first 12 hex digits>`), so a run that fails or is cut
short is resumed from its checkpoints by the next try, and starts from the champion's weights when
there is one (a warm start).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass

from components import storage, tracking
from components.data import read_manifest
from components.register import TRAIN_CHECKSUM_TAG, manifest_checksum
from lcr_core.errors import LCRError

CHAMPION = "champion"


@dataclass
class ShardCheck:
    new: bool
    reason: str
    train_manifest_sha256: str
    run_name: str  # what a pretraining run on these shards is called
    champion: str  # models:/NAME@champion, or "" when there is none


def champion_checksum(model_name: str) -> str | None:
    """The train-manifest checksum on the champion's tags; None when there is no champion."""
    import mlflow

    client = mlflow.MlflowClient(tracking.tracking_uri())
    try:
        version = client.get_model_version_by_alias(model_name, CHAMPION)
    except mlflow.exceptions.MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise LCRError(f"MLflow model {model_name!r}: {str(err).splitlines()[0]}") from None
    return version.tags.get(TRAIN_CHECKSUM_TAG, "")


def check_new_shards(shards: str, model_name: str, run_prefix: str, always: bool = False) -> ShardCheck:
    checksum = manifest_checksum(read_manifest(storage.join(shards, "train")))
    run_name = f"{run_prefix}-{checksum[:12]}"
    trained_on = champion_checksum(model_name)
    champion = f"models:/{model_name}@{CHAMPION}" if trained_on is not None else ""
    if trained_on is None:
        return ShardCheck(True, f"no {model_name}@{CHAMPION} yet", checksum, run_name, champion)
    if trained_on != checksum:
        return ShardCheck(True, f"train manifest {checksum[:12]} is new (the champion was trained on "
                                f"{trained_on[:12] or 'an unknown manifest'})", checksum, run_name, champion)
    if always:
        # A repeat on the same shards: a run of its own, else it would resume the finished one.
        return ShardCheck(True, "unchanged shards, retraining as asked", checksum,
                          f"{run_name}-{time.strftime('%Y%m%d%H%M%S')}", champion)
    return ShardCheck(False, f"nothing new: the champion was trained on train manifest {checksum[:12]}",
                      checksum, run_name, champion)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", required=True, help="folder or s3://bucket/prefix holding train/")
    parser.add_argument("--model-name", required=True, help="the registered model whose champion is compared")
    parser.add_argument("--run-prefix", default="lcr", help="run_name = PREFIX-<manifest checksum>")
    parser.add_argument("--always", action="store_true", help="report new shards even when they are unchanged")
    parser.add_argument("--exit-code", action="store_true",
                        help="exit 3 when nothing is new (for `lcr check-shards … --exit-code && lcr pretrain …`)")


def run(args: argparse.Namespace) -> int:
    found = check_new_shards(args.shards, args.model_name, args.run_prefix, args.always)
    print(json.dumps(asdict(found)))
    print(found.reason, file=sys.stderr)
    return 3 if args.exit_code and not found.new else 0
