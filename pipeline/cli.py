"""`lcr pipeline`: compile the Kubeflow pipeline, run it here, or start it on a Kubeflow server.

    lcr pipeline compile                                  # rewrites pipeline/lcr_pipeline.yaml
    lcr pipeline run --local -p shards=data/shards -p config=demo -p mode=local
    lcr pipeline submit --host https://kfp.example.org -p shards=s3://lcr-data/inat2019
    lcr pipeline schedule --host https://kfp.example.org --cron '0 0 3 * * *' -p shards=…

`-p NAME=VALUE` sets a pipeline parameter (see `lcr pipeline params`); lists and booleans are JSON
(`-p overrides='["epochs=2"]'`, `-p warm_start=false`). A local run uses kfp's subprocess runner in
this interpreter: every step is a process of its own, as it is a pod of its own on Kubeflow. The
terminal shows each step as it ends; everything the steps print goes to runs/pipeline/local-*.log.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Any

from lcr_core.errors import LCRError
from pipeline.pipeline import COMPILED, NAME, compile_pipeline, lcr_pipeline
from pipeline.progress import ANSI, StepLog

DEFAULT_ROOT = "runs/pipeline"
EXPERIMENT = "lcr"


class PipelineError(LCRError):
    """A bad pipeline parameter, or a Kubeflow server that refused the request."""


def defaults() -> dict[str, Any]:
    signature = inspect.signature(lcr_pipeline.pipeline_func)
    return {name: p.default for name, p in signature.parameters.items()}


def parse_params(pairs: list[str]) -> dict[str, Any]:
    """`NAME=VALUE` pairs, typed like the parameter's default (JSON for lists and booleans)."""
    known, params = defaults(), {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or name not in known:
            raise PipelineError(f"-p {pair!r}: expected NAME=VALUE with NAME one of {', '.join(known)}")
        kind = type(known[name])
        if kind is str:
            params[name] = text
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = None
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise PipelineError(f"-p {name}={text}: expected a {kind.__name__} in JSON, e.g. "
                                f"{json.dumps(known[name])}")
        params[name] = value
    return params


def run_local(params: dict[str, Any], root: str = DEFAULT_ROOT) -> str:
    """Run the whole pipeline with kfp's local runner; returns the summary (Markdown). The steps'
    output goes to a log file in `root`; the terminal shows the steps as they end (`StepLog`)."""
    from kfp import local

    folder = Path(root).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    log_path = folder / f"local-{time.strftime('%Y%m%d-%H%M%S')}.log"
    print(f"steps' output: {log_path}", flush=True)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(folder), raise_on_error=True)
    with open(log_path, "a") as log, StepLog(log, sys.stdout) as shown, redirect_stdout(shown), \
            unbuffered_steps(), warnings.catch_warnings():
        # the steps' image is for Kubeflow; here they run in this interpreter, as intended
        warnings.filterwarnings("ignore", message=".*non-Python base image", category=RuntimeWarning)
        try:
            return lcr_pipeline(**params).output
        except RuntimeError as err:  # kfp's: "Pipeline '…' finished with status FAILURE. Inner task failed: '…'."
            message = ANSI.sub("", str(err).splitlines()[0])
            raise PipelineError(f"{message} (its last lines are above; all of it is in {log_path})") from None


@contextmanager
def unbuffered_steps() -> Iterator[None]:
    """The steps' processes print as they go: into a pipe, Python would hold their output back in blocks."""
    before = os.environ.get("PYTHONUNBUFFERED")
    os.environ["PYTHONUNBUFFERED"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["PYTHONUNBUFFERED"]
        else:
            os.environ["PYTHONUNBUFFERED"] = before


def kfp_client(host: str, namespace: str | None):
    import kfp

    return kfp.Client(host=host, namespace=namespace)


def submit(host: str, params: dict[str, Any], namespace: str | None = None, experiment: str = EXPERIMENT) -> str:
    client = kfp_client(host, namespace)
    run = client.create_run_from_pipeline_package(str(COMPILED), arguments=params, experiment_name=experiment,
                                                  run_name=f"{NAME}-{time.strftime('%Y%m%d-%H%M%S')}",
                                                  namespace=namespace)
    return run.run_id


def schedule(host: str, cron: str, params: dict[str, Any], namespace: str | None = None,
             experiment: str = EXPERIMENT, job_name: str = NAME) -> str:
    """A recurring run: one at a time (`max_concurrency=1`), and missed ticks are not caught up."""
    fields = cron.split()
    if len(fields) != 6:
        raise PipelineError(f"--cron {cron!r}: expected 6 fields, seconds first (Kubeflow's cron), "
                            "e.g. '0 0 3 * * *' for 03:00 every day")
    client = kfp_client(host, namespace)
    experiment_id = client.create_experiment(experiment, namespace=namespace).experiment_id
    job = client.create_recurring_run(experiment_id, job_name, pipeline_package_path=str(COMPILED), params=params,
                                      cron_expression=cron, max_concurrency=1, no_catchup=True, enabled=True)
    return job.recurring_run_id


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    compile_ = sub.add_parser("compile", help=f"write the compiled pipeline (default {COMPILED})")
    compile_.add_argument("--out", default=str(COMPILED))
    sub.add_parser("params", help="list the pipeline's parameters and their defaults")
    run_ = sub.add_parser("run", help="run the pipeline here, with kfp's local runner")
    run_.add_argument("--local", action="store_true", required=True, help="(the only way to run it here)")
    run_.add_argument("--root", default=DEFAULT_ROOT, help="where the steps' artefacts go")
    for name, text in (("submit", "start one run on a Kubeflow Pipelines server"),
                       ("schedule", "create a recurring run on a Kubeflow Pipelines server")):
        remote = sub.add_parser(name, help=text)
        remote.add_argument("--host", required=True, help="the KFP API, e.g. http://ml-pipeline-ui.kubeflow:80")
        remote.add_argument("--namespace", help="the Kubeflow profile namespace (multi-user installs)")
        remote.add_argument("--experiment", default=EXPERIMENT)
        if name == "schedule":
            remote.add_argument("--cron", required=True, help="6 fields, seconds first: '0 0 3 * * *'")
            remote.add_argument("--job-name", default=NAME)
    for action in ("run", "submit", "schedule"):
        sub.choices[action].add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                                         help="a pipeline parameter (repeat)")


def run(args: argparse.Namespace) -> int:
    if args.action == "compile":
        print(f"wrote {compile_pipeline(args.out)}")
    elif args.action == "params":
        for name, value in defaults().items():
            print(f"{name} = {json.dumps(value)}")
    elif args.action == "run":
        print(run_local(parse_params(args.param), args.root))
    elif args.action == "submit":
        run_id = submit(args.host, parse_params(args.param), args.namespace, args.experiment)
        print(f"started run {run_id} on {args.host}")
    else:
        job_id = schedule(args.host, args.cron, parse_params(args.param), args.namespace, args.experiment,
                          args.job_name)
        print(f"recurring run {job_id} on {args.host}: {args.cron} (max_concurrency=1, no catch-up)")
    return 0
