"""The Kubeflow pipeline: it only wires the steps of `pipeline/steps.py`.

    check-new-shards ──(nothing new)──> nothing-new
           │ new shards, or no champion yet
           v
        pretrain (local Ray | Ray job | KubeRay RayJob), warm-started from the champion
           │
           ├─> probe @ 100 %, 50 %, 20 % of the labels (ParallelFor)
           ├─> retrieval ──> register + gated promotion
           └─> attention report
                                   └──> summary (Markdown)

`lcr pipeline compile` writes `lcr_pipeline.yaml` beside this file; a test keeps the two in step.
"""

from pathlib import Path

from kfp import compiler, dsl

from pipeline import steps

NAME = "lcr-pretrain-evaluate-promote"
COMPILED = Path(__file__).with_name("lcr_pipeline.yaml")


@dsl.pipeline(name="linear-probes")
def linear_probes(model_uri: str, mlflow_run_id: str, shards: str, mlflow_uri: str, cache_dir: str,
                  fractions: list) -> list[str]:
    """One probe per label fraction, in parallel. A pipeline of its own because kfp's local runner
    (2.17) hands a ParallelFor's body the loop item in place of every upstream task's output; the
    inputs of a nested pipeline reach it intact."""
    with dsl.ParallelFor(fractions, name="label-fractions") as fraction:
        probe = steps.probe(model_uri=model_uri, mlflow_run_id=mlflow_run_id, shards=shards, fraction=fraction,
                            mlflow_uri=mlflow_uri, cache_dir=cache_dir)
    return dsl.Collected(probe.output)


@dsl.pipeline(name=NAME, description="LCR: check for new shards, pretrain on Ray, evaluate, promote in MLflow")
def lcr_pipeline(
    shards: str = "s3://lcr-data/inat2019",
    config: str = "inat2019",
    overrides: list = [],  # noqa: B006 (KFP reads the default as the parameter's default)
    mlflow_uri: str = "",
    model_name: str = "lcr-inat2019",
    run_prefix: str = "lcr-inat2019",
    fractions: list = [1.0, 0.5, 0.2],  # noqa: B006
    warm_start: bool = True,
    always_train: bool = False,
    mode: str = "kuberay",
    ray_address: str = "",
    kuberay_cluster: str = "lcr",
    namespace: str = "lcr",
    cache_dir: str = "/tmp/lcr-features",
) -> str:
    checked = steps.check_new_shards(shards=shards, model_name=model_name, run_prefix=run_prefix,
                                     mlflow_uri=mlflow_uri, always=always_train, warm_start=warm_start)
    with dsl.If(checked.outputs["new"] == True, name="new-shards"):  # noqa: E712 (a KFP condition, not Python)
        trained = steps.pretrain(
            config=config, overrides=overrides, shards=shards, run_name=checked.outputs["run_name"],
            init_from=checked.outputs["init_from"], mlflow_uri=mlflow_uri, mode=mode, ray_address=ray_address,
            kuberay_cluster=kuberay_cluster, namespace=namespace)
        model = {"model_uri": trained.outputs["model_uri"], "mlflow_run_id": trained.outputs["mlflow_run_id"],
                 "shards": shards, "mlflow_uri": mlflow_uri, "cache_dir": cache_dir}
        probes = linear_probes(fractions=fractions, **model)
        retrieval = steps.retrieve(**model)
        report = steps.attention_report(**model)
        registered = steps.register(model_uri=trained.outputs["model_uri"], model_name=model_name, shards=shards,
                                    mlflow_uri=mlflow_uri, cache_dir=cache_dir).after(retrieval)
        done = steps.summary(run_name=checked.outputs["run_name"], mlflow_run_id=trained.outputs["mlflow_run_id"],
                             retrieval=retrieval.output, probes=probes.output,
                             registration=registered.output, report=report.outputs["report"])
    with dsl.Else(name="nothing-new"):
        skipped = steps.nothing_new(reason=checked.outputs["reason"])
    return dsl.OneOf(done.outputs["Output"], skipped.outputs["Output"])


def compile_pipeline(path: str | Path = COMPILED) -> Path:
    compiler.Compiler().compile(lcr_pipeline, str(path))
    return Path(path)
