"""The pipeline's steps: thin KFP components over the functions in `components/`.

Each body only moves parameters in and results out; the work is `components.*`, which knows nothing
of Kubeflow. Imports sit inside the bodies because KFP ships a body's source alone to the step's
container (the image that has this project installed, `IMAGE`); there, `mlflow_uri` becomes the
MLFLOW_TRACKING_URI of the step. Results that the summary reads come back as JSON strings.
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Input, Markdown, Output

IMAGE = "ghcr.io/your-org/lcr:0.1.0"  # the image of infra/docker/Dockerfile
component = dsl.component(base_image=IMAGE, install_kfp_package=False)


@component
def check_new_shards(shards: str, model_name: str, run_prefix: str, mlflow_uri: str, always: bool,
                     warm_start: bool) -> NamedTuple(
        "Checked", [("new", bool), ("reason", str), ("run_name", str), ("init_from", str)]):
    import os
    from collections import namedtuple

    from components.check_shards import check_new_shards as check

    if mlflow_uri:
        os.environ["MLFLOW_TRACKING_URI"] = mlflow_uri
    found = check(shards, model_name, run_prefix, always)
    print(found.reason)
    return namedtuple("Checked", ["new", "reason", "run_name", "init_from"])(
        found.new, found.reason, found.run_name, found.champion if warm_start else "")


@component
def pretrain(config: str, overrides: list, shards: str, run_name: str, init_from: str, mlflow_uri: str,
             mode: str, ray_address: str, kuberay_cluster: str, namespace: str) -> NamedTuple(
        "Trained", [("model_uri", str), ("mlflow_run_id", str), ("checkpoint_uri", str)]):
    import os
    from collections import namedtuple

    from components.launch import Target, launch
    from lcr_core.config import load_config

    if mlflow_uri:
        os.environ["MLFLOW_TRACKING_URI"] = mlflow_uri
    warm_start = [f"init_from={init_from}"] if init_from else []
    cfg = load_config(config or None, [*overrides, f"shards={shards}", f"run_name={run_name}", *warm_start])
    result = launch(cfg, Target(mode, ray_address, kuberay_cluster, namespace))
    return namedtuple("Trained", ["model_uri", "mlflow_run_id", "checkpoint_uri"])(
        result.model_uri, result.mlflow_run_id, result.checkpoint_uri)


@component
def probe(model_uri: str, mlflow_run_id: str, shards: str, fraction: float, mlflow_uri: str, cache_dir: str) -> str:
    import json
    import os

    from components.features import evaluation_setup
    from components.probe import format_table, run_probes

    if mlflow_uri:
        os.environ["MLFLOW_TRACKING_URI"] = mlflow_uri
    results, _ = run_probes(evaluation_setup(model_uri, shards, cache_dir=cache_dir), model_uri, [fraction],
                            run_id=mlflow_run_id)
    print(format_table(results))
    return json.dumps([{"pooling": r.pooling, "fraction": r.fraction, "train_images": r.train_images,
                        "accuracy": r.accuracy} for r in results])


@component
def retrieve(model_uri: str, mlflow_run_id: str, shards: str, mlflow_uri: str, cache_dir: str) -> str:
    import json
    import os

    from components.features import evaluation_setup
    from components.retrieve import format_table
    from components.retrieve import retrieve as evaluate

    if mlflow_uri:
        os.environ["MLFLOW_TRACKING_URI"] = mlflow_uri
    result = evaluate(evaluation_setup(model_uri, shards, cache_dir=cache_dir), model_uri, mlflow_run_id)
    print(format_table(result.metrics))
    return json.dumps(result.metrics)


@component
def attention_report(model_uri: str, mlflow_run_id: str, shards: str, mlflow_uri: str, cache_dir: str,
                     report: Output[HTML]):
    import os

    from components.features import evaluation_setup
    from components.report import report as build

    if mlflow_uri:
        os.environ["MLFLOW_TRACKING_URI"] = mlflow_uri
    # The page and its figures go into the artefact's folder (KFP keeps it) and into the MLflow run.
    result = build(evaluation_setup(model_uri, shards, cache_dir=cache_dir), model_uri, report.path,
                   run_id=mlflow_run_id)
    report.metadata["index"] = str(result.html)


@component
def register(model_uri: str, model_name: str, shards: str, mlflow_uri: str, cache_dir: str) -> str:
    import json
    import os

    from components.register import register as register_model

    if mlflow_uri:
        os.environ["MLFLOW_TRACKING_URI"] = mlflow_uri
    registration = register_model(model_uri, model_name, shards, cache_dir=cache_dir)
    decision = registration.decision
    print(f"{model_name} version {registration.version}: {decision.kind} ({decision.reason})")
    return json.dumps({"model": model_name, "version": registration.version, "decision": decision.kind,
                       "reason": decision.reason, "rank1": registration.tags.get("lcr.rank1", "")})


@component
def summary(run_name: str, mlflow_run_id: str, retrieval: str, probes: list, registration: str,
            report: Input[HTML], table: Output[Markdown]) -> str:
    from components.summary import pipeline_summary

    text = pipeline_summary(run_name, mlflow_run_id, retrieval, probes, registration,
                            report.metadata.get("index", report.path))
    with open(table.path, "w") as out:
        out.write(text + "\n")
    return text


@component
def nothing_new(reason: str, table: Output[Markdown]) -> str:
    text = f"Nothing to do: {reason}."
    with open(table.path, "w") as out:
        out.write(text + "\n")
    return text
