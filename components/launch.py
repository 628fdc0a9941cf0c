"""Where pretraining runs: in this process, as a Ray job, or as a KubeRay RayJob.

    local    `pretrain(cfg)` here, on in-process Ray (or the cluster RAY_ADDRESS names)
    ray-job  `lcr pretrain …` submitted to a Ray job server (`ray.job_submission`), polled to the end
    kuberay  a `ray.io/v1 RayJob` created through the Kubernetes API, its `status.jobStatus` polled

The config is resolved and validated here, once; a remote job gets it as `field=value` overrides of
every field that differs from the defaults, so that nothing but the installed package has to be on
the cluster and the job's command line shows exactly what runs. Its result is read back from MLflow
(the run tagged with the config's run_name), where the job logged it. Credentials never travel with
a job: the cluster's own environment (Kubernetes secrets, instance roles) provides them.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from components import tracking
from components.pretrain import (
    CHECKPOINT_TAG,
    MODEL_URI_TAG,
    RUN_NAME_TAG,
    PretrainError,
    PretrainResult,
    forwarded_env,
    pretrain,
    with_absolute_paths,
)
from lcr_core.config import LCRConfig

MODES = ("local", "ray-job", "kuberay")
JOB_DONE = {"SUCCEEDED", "FAILED", "STOPPED"}  # ray.job_submission.JobStatus values that end a job
RAYJOB_DONE = {"SUCCEEDED", "FAILED", "STOPPED"}  # RayJob status.jobStatus values that end it
RAYJOB_FAILED_DEPLOYMENT = "Failed"  # status.jobDeploymentStatus when KubeRay gave up on the job
LOG_LINES = 20  # of a failed job's log, in the error


class LaunchError(PretrainError):
    """The job could not be submitted, failed, or ended without a model."""


@dataclass
class Target:
    """Where a remote job goes. `command` starts the CLI on the cluster (the image's `lcr`)."""
    mode: str = "local"
    address: str = ""  # ray-job: the job server, http://HEAD:8265
    cluster: str = ""  # kuberay: the RayCluster the RayJob runs on (clusterSelector)
    namespace: str = "lcr"
    kube_host: str = ""  # kuberay: the API server; empty = in-cluster config, else ~/.kube/config
    command: str = "lcr"
    poll_s: float = 10.0
    timeout_s: float = 7 * 24 * 3600.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise LaunchError(f"mode {self.mode!r}: expected one of {', '.join(MODES)}")
        if self.mode == "ray-job" and not self.address:
            raise LaunchError("mode ray-job needs the job server's address, e.g. http://127.0.0.1:8265")
        if self.mode == "kuberay" and not self.cluster:
            raise LaunchError("mode kuberay needs the name of the RayCluster to run on (infra/kuberay/raycluster.yaml)")


def launch(cfg: LCRConfig, target: Target) -> PretrainResult:
    if target.mode == "local":
        return pretrain(cfg)
    cfg = with_absolute_paths(cfg)
    entrypoint = pretrain_command(cfg, target.command)
    if target.mode == "ray-job":
        submit_ray_job(cfg, entrypoint, target)
    else:
        submit_rayjob(cfg, entrypoint, target, kubernetes_api(target.kube_host))
    return logged_result(cfg.run_name)


def pretrain_command(cfg: LCRConfig, command: str = "lcr") -> str:
    """`lcr pretrain field=value …` for every field that differs from the defaults (JSON values,
    which the override parser reads as YAML)."""
    defaults = LCRConfig()
    overrides = [f"{f.name}={json.dumps(getattr(cfg, f.name))}" for f in fields(LCRConfig)
                 if getattr(cfg, f.name) != getattr(defaults, f.name)]
    return " ".join([command, "pretrain", *map(shlex.quote, overrides)])


def job_env() -> dict[str, str]:
    """What a job needs to find MLflow and S3 (never credentials: see the module's docstring)."""
    uri = tracking.tracking_uri()
    if tracking.without_credentials(uri) != uri:
        raise LaunchError("MLFLOW_TRACKING_URI holds credentials; give the cluster its own (a Kubernetes "
                          "secret) and a URI without them here")
    return {"MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1", **forwarded_env()}


def wait(describe: Callable[[], tuple[str, bool]], target: Target, what: str) -> str:
    """Poll `describe() -> (status, done)` until done or the timeout; returns the last status."""
    deadline = time.monotonic() + target.timeout_s
    last = None
    while True:
        status, done = describe()
        if status != last:
            print(f"{what}: {status}", flush=True)
            last = status
        if done:
            return status
        if time.monotonic() > deadline:
            raise LaunchError(f"{what}: still {status} after {target.timeout_s:.0f} s")
        time.sleep(target.poll_s)


# ---------------------------------------------------------------------------------------------
# ray-job

def submit_ray_job(cfg: LCRConfig, entrypoint: str, target: Target) -> None:
    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(target.address)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise LaunchError(f"Ray job server {target.address}: {str(err).splitlines()[0]}") from None
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env={"env_vars": job_env()},
                               submission_id=f"{cfg.run_name}-{time.strftime('%Y%m%d-%H%M%S')}",
                               metadata={"lcr.run_name": cfg.run_name})
    print(f"submitted Ray job {job_id} to {target.address}: {entrypoint}", flush=True)

    def describe() -> tuple[str, bool]:
        status = str(client.get_job_status(job_id).value)
        return status, status in JOB_DONE

    status = wait(describe, target, f"Ray job {job_id}")
    if status != "SUCCEEDED":
        tail = client.get_job_logs(job_id).rstrip().splitlines()[-LOG_LINES:]
        raise LaunchError(f"Ray job {job_id} {status}; its last log lines:\n" + "\n".join(tail))


# ---------------------------------------------------------------------------------------------
# kuberay

def rayjob_body(cfg: LCRConfig, entrypoint: str, target: Target) -> dict[str, Any]:
    """A RayJob on an existing RayCluster: the cluster stays up (it is shared), the job does not."""
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": rayjob_name(cfg.run_name), "namespace": target.namespace,
                     "labels": {"app.kubernetes.io/part-of": "lcr", "lcr/run-name": label_value(cfg.run_name)}},
        "spec": {
            "entrypoint": entrypoint,
            "clusterSelector": {"ray.io/cluster": target.cluster},
            "runtimeEnvYAML": json.dumps({"env_vars": job_env()}),  # JSON is YAML
            "submissionMode": "HTTPMode",
            "shutdownAfterJobFinishes": False,  # must be false with clusterSelector
            "ttlSecondsAfterFinished": 0,
        },
    }


def rayjob_name(run_name: str) -> str:
    """A DNS-1123 name (KubeRay derives the submitter's names from it, so keep it short) with the time."""
    stem = re.sub(r"[^a-z0-9-]+", "-", run_name.lower()).strip("-")[:30].rstrip("-") or "lcr"
    return f"{stem}-{time.strftime('%m%d%H%M%S')}"


def label_value(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:63].strip("-_.")


def kubernetes_api(kube_host: str):
    from kubernetes import client, config

    if kube_host:
        configuration = client.Configuration()
        configuration.host = kube_host
        return client.CustomObjectsApi(client.ApiClient(configuration))
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.CustomObjectsApi()


def submit_rayjob(cfg: LCRConfig, entrypoint: str, target: Target, api) -> None:
    from kubernetes.client.exceptions import ApiException

    body = rayjob_body(cfg, entrypoint, target)
    name, ns = body["metadata"]["name"], target.namespace
    try:
        api.create_namespaced_custom_object("ray.io", "v1", ns, "rayjobs", body)
    except ApiException as err:
        raise LaunchError(f"creating RayJob {ns}/{name}: {err.status} {err.reason}") from None
    print(f"created RayJob {ns}/{name} on RayCluster {target.cluster}: {entrypoint}", flush=True)
    status: dict[str, Any] = {}

    def describe() -> tuple[str, bool]:
        nonlocal status
        status = api.get_namespaced_custom_object("ray.io", "v1", ns, "rayjobs", name).get("status") or {}
        job, deployment = status.get("jobStatus") or "PENDING", status.get("jobDeploymentStatus", "")
        return f"{job} ({deployment or 'Initializing'})", job in RAYJOB_DONE or deployment == RAYJOB_FAILED_DEPLOYMENT

    wait(describe, target, f"RayJob {ns}/{name}")
    if status.get("jobStatus") != "SUCCEEDED":
        raise LaunchError(f"RayJob {ns}/{name} {status.get('jobStatus') or status.get('jobDeploymentStatus')}: "
                          f"{status.get('message') or 'no message'} (kubectl -n {ns} logs -l "
                          f"job-name={name} for the job's output)")


# ---------------------------------------------------------------------------------------------
# The result, from MLflow

def logged_result(run_name: str) -> PretrainResult:
    """The newest finished MLflow run of `run_name`, as the job left it."""
    import mlflow

    client = mlflow.MlflowClient(tracking.tracking_uri())
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              f"tags.`{RUN_NAME_TAG}` = '{run_name}' and attributes.status = 'FINISHED'",
                              order_by=["attributes.end_time DESC"], max_results=1)
    if not runs or MODEL_URI_TAG not in runs[0].data.tags:
        raise LaunchError(f"the job of run {run_name!r} succeeded but no finished MLflow run with a model is "
                          f"tagged {RUN_NAME_TAG}={run_name} at {tracking.without_credentials(tracking.tracking_uri())}"
                          " (does the cluster use the same MLFLOW_TRACKING_URI?)")
    run = runs[0]
    return PretrainResult(run_name=run_name, mlflow_run_id=run.info.run_id,
                          checkpoint_uri=run.data.tags.get(CHECKPOINT_TAG, ""),
                          model_uri=run.data.tags[MODEL_URI_TAG], metrics=dict(run.data.metrics))


# ---------------------------------------------------------------------------------------------
# Command line (`lcr pretrain --mode …`)

def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", choices=MODES, default="local", help="where pretraining runs (default: local)")
    parser.add_argument("--address", default="", help="ray-job: the Ray job server, http://HEAD:8265")
    parser.add_argument("--cluster", default="", help="kuberay: the RayCluster to run the RayJob on")
    parser.add_argument("--namespace", default="lcr", help="kuberay: the RayJob's namespace")
    parser.add_argument("--kube-host", default="", help="kuberay: the API server (default: in-cluster, else "
                                                        "~/.kube/config)")
    parser.add_argument("--command", default="lcr", help="how a remote job starts the CLI (default: lcr)")


def target_from_args(args: argparse.Namespace) -> Target:
    return Target(args.mode, args.address, args.cluster, args.namespace, args.kube_host, args.command)
