"""The `lcr` command: one subcommand per pipeline step, each defined in its own module.

A step module exposes `add_arguments(parser)` and `run(args) -> int`. Modules are imported only
when their subcommand runs, so `lcr --help` stays fast (Ray and MLflow take seconds to import).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lcr_core.errors import LCRError

STEPS = {
    "demo": ("pipeline.demo", "the pipeline on this machine: synthetic shards, pretrain, evaluate, promote"),
    "shards": ("components.shards", "build or verify WebDataset shards"),
    "check-shards": ("components.check_shards", "is the train manifest newer than the champion's? (the "
                                                "pipeline's first step)"),
    "pretrain": ("components.pretrain", "self-supervised pretraining on Ray Train"),
    "tune": ("components.tune", "Ray Tune over K and nu (any config field): one pretraining run per trial"),
    "retrieve": ("components.retrieve", "leave-one-out retrieval on the test split"),
    "probe": ("components.probe", "linear probes at several label fractions"),
    "report": ("components.report", "attention and retrieval figures of test images, as an HTML page"),
    "register": ("components.register", "register the encoder in MLflow; champion only if it beats the champion"),
    "pipeline": ("pipeline.cli", "the Kubeflow pipeline: compile, run --local, submit, schedule"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="lcr", description="Learning Common Rationale: fine-grained SSL.")
    sub = parser.add_subparsers(dest="step", required=True, metavar="STEP")
    for name, (_, help_text) in STEPS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] not in STEPS:
        parser.parse_args(argv)  # prints usage or the "invalid choice" error and exits
    module = importlib.import_module(STEPS[argv[0]][0])
    step_parser = argparse.ArgumentParser(prog=f"lcr {argv[0]}", description=STEPS[argv[0]][1])
    module.add_arguments(step_parser)
    args = step_parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except LCRError as err:
        print(f"lcr {argv[0]}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lcr {argv[0]}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
