"""The Kubeflow pipeline's wiring, and the remote launchers that cannot run here for real.

No Kubernetes API server or Kubeflow Pipelines server can run on this machine. The `kuberay` mode
and `lcr pipeline submit`/`schedule` are therefore tested against a loopback HTTP recorder
(tests.services.Recorder) that answers as those APIs do; the tests assert on the requests' bodies
(the RayJob, validated against KubeRay's CRD; the cron expression, max_concurrency and the pipeline
spec). The `ray-job` mode runs for real against `ray start --head` in tests/test_pretrain.py, and the
whole pipeline runs with kfp's local runner in tests/test_demo.py.
"""

from __future__ import annotations

import io
import json
import re
import threading
from contextlib import redirect_stdout

import pytest
import yaml
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2

from components import launch
from components.cli import main
from lcr_core.config import load_config
from pipeline import cli
from pipeline.pipeline import COMPILED, compile_pipeline
from pipeline.progress import SHOWN_ON_FAILURE, StepLog
from tests.services import Recorder
from tests.test_infra import crd_errors

STEPS = {"check-new-shards", "pretrain", "probe", "retrieve", "attention-report", "register", "summary",
         "nothing-new"}


def compiled_tasks(spec: dict) -> dict[str, dict]:
    """Every task of the pipeline, nested DAGs (conditions, loops) included, by task name."""
    found = {}
    for component in spec["components"].values():
        found.update(component.get("dag", {}).get("tasks", {}))
    found.update(spec["root"]["dag"]["tasks"])
    return found


def test_the_committed_pipeline_is_what_the_source_compiles_to(tmp_path):
    fresh = yaml.safe_load(compile_pipeline(tmp_path / "fresh.yaml").read_text())
    committed = yaml.safe_load(COMPILED.read_text())
    fresh.pop("sdkVersion", None), committed.pop("sdkVersion", None)
    assert committed == fresh, "pipeline/lcr_pipeline.yaml is stale: run `lcr pipeline compile`"


def test_the_compiled_pipeline_is_a_valid_spec_with_every_step():
    spec = yaml.safe_load(COMPILED.read_text())
    json_format.ParseDict(spec, pipeline_spec_pb2.PipelineSpec())  # raises on an invalid spec
    tasks = compiled_tasks(spec)
    assert {t["taskInfo"]["name"] for t in tasks.values()} >= STEPS
    loop = next(t for t in tasks.values() if "parameterIterator" in t)
    assert loop["parameterIterator"]["items"]["inputParameter"].endswith("fractions")
    conditions = [t["triggerPolicy"]["condition"] for t in tasks.values() if "triggerPolicy" in t]
    assert any("new" in c and "true" in c for c in conditions), conditions
    defaults = spec["root"]["inputDefinitions"]["parameters"]
    assert defaults["fractions"]["defaultValue"] == [1.0, 0.5, 0.2]
    assert {"shards", "config", "overrides", "mlflow_uri", "model_name", "mode"} <= defaults.keys()
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {"ghcr.io/your-org/lcr:0.1.0"}


def test_lcr_pipeline_compile_writes_the_yaml(tmp_path, capsys):
    assert main(["pipeline", "compile", "--out", str(tmp_path / "p.yaml")]) == 0
    assert yaml.safe_load((tmp_path / "p.yaml").read_text())["pipelineInfo"]["name"] == "lcr-pretrain-evaluate-promote"


def test_pipeline_parameters_are_typed_and_bad_ones_named():
    assert cli.parse_params(["shards=s3://b/x", "fractions=[1, 0.5]", "warm_start=false", "overrides=[\"epochs=2\"]"]) \
        == {"shards": "s3://b/x", "fractions": [1, 0.5], "warm_start": False, "overrides": ["epochs=2"]}
    with pytest.raises(cli.PipelineError, match=r"-p 'shard=x': expected NAME=VALUE with NAME one of shards, "):
        cli.parse_params(["shard=x"])
    with pytest.raises(cli.PipelineError, match=r"-p warm_start=yes: expected a bool in JSON, e.g. true"):
        cli.parse_params(["warm_start=yes"])


# ---------------------------------------------------------------------------------------------
# kuberay mode against a recorder of the Kubernetes API

RAYJOBS = r"/apis/ray.io/v1/namespaces/lcr/rayjobs"


def kubernetes_recorder(statuses: list[dict]) -> Recorder:
    """Answers a RayJob's creation as the API server does (201 with the object), then each GET with
    the next of `statuses`, as the KubeRay operator would update them."""
    created: dict = {}

    def create(_, body):
        created.update(body)
        return 201, {**body, "metadata": {**body["metadata"], "uid": "0b1c", "resourceVersion": "1"}}

    def get(found, _):
        status = statuses.pop(0) if len(statuses) > 1 else statuses[0]
        return 200, {**created, "status": status}

    return Recorder([("POST", RAYJOBS, create), ("GET", RAYJOBS + r"/([a-z0-9-]+)", get)])


def kuberay_target(url: str) -> launch.Target:
    return launch.Target("kuberay", cluster="lcr", namespace="lcr", kube_host=url, command="lcr", poll_s=0.01,
                         timeout_s=10)


def test_the_rayjob_matches_the_crd_and_carries_no_secret(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fake-secret-1234")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio.lcr:9000")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.lcr:5000")
    cfg = load_config("cub", ["backbone_weights=s3://lcr-models/r50.pth", "shards=s3://lcr-data/cub"])
    body = launch.rayjob_body(cfg, launch.pretrain_command(cfg), kuberay_target("http://x"))
    assert crd_errors(body) == []
    assert body["spec"]["clusterSelector"] == {"ray.io/cluster": "lcr"}
    env = json.loads(body["spec"]["runtimeEnvYAML"])["env_vars"]
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.lcr:5000" and env["AWS_ENDPOINT_URL"] == "http://minio.lcr:9000"
    assert "fake-secret-1234" not in json.dumps(body)


def test_the_job_command_reproduces_the_config():
    cfg = load_config("demo", ["epochs=3", "extra={note: 'a b', n: 2}", "backbone_weights=null"])
    words = launch.shlex.split(launch.pretrain_command(cfg, "lcr"))
    assert words[:2] == ["lcr", "pretrain"]
    assert load_config(None, words[2:]) == cfg


def test_kuberay_mode_creates_the_rayjob_and_polls_it_to_success(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.lcr:5000")
    cfg = load_config("demo", ["run_name=lcr-inat2019-0123456789ab", "shards=s3://lcr-data/inat2019"])
    statuses = [{}, {"jobStatus": "PENDING", "jobDeploymentStatus": "Initializing"},
                {"jobStatus": "RUNNING", "jobDeploymentStatus": "Running"},
                {"jobStatus": "SUCCEEDED", "jobDeploymentStatus": "Complete"}]
    with kubernetes_recorder(statuses) as api:
        entrypoint = launch.pretrain_command(cfg)
        launch.submit_rayjob(cfg, entrypoint, kuberay_target(api.url), launch.kubernetes_api(api.url))
    (body,) = api.bodies("POST", RAYJOBS)
    assert body["spec"]["entrypoint"] == entrypoint and crd_errors(body) == []
    assert body["metadata"]["name"].startswith("lcr-inat2019-0123456789ab"[:30])
    assert len(api.bodies("GET", RAYJOBS + r"/.+")) == 4


def test_kuberay_mode_fails_with_the_operators_message():
    cfg = load_config("demo", ["run_name=broken"])
    failed = {"jobStatus": "FAILED", "jobDeploymentStatus": "Failed", "message": "job entrypoint exited with 2"}
    with kubernetes_recorder([{"jobStatus": "RUNNING"}, failed]) as api:
        with pytest.raises(launch.LaunchError, match=r"RayJob lcr/broken-\d+ FAILED: job entrypoint exited with 2"):
            launch.submit_rayjob(cfg, "lcr pretrain", kuberay_target(api.url), launch.kubernetes_api(api.url))


def test_a_refused_rayjob_is_one_line():
    with Recorder([("POST", RAYJOBS, lambda *_: (403, {"kind": "Status", "reason": "Forbidden"}))]) as api:
        with pytest.raises(launch.LaunchError, match=r"^creating RayJob lcr/demo-\d+: 403 Forbidden$"):
            launch.submit_rayjob(load_config("demo", ["run_name=demo"]), "lcr pretrain", kuberay_target(api.url),
                                 launch.kubernetes_api(api.url))


# ---------------------------------------------------------------------------------------------
# submit and schedule against a recorder of the Kubeflow Pipelines API (v2beta1)

def kfp_recorder() -> Recorder:
    return Recorder([
        ("GET", r"/apis/v2beta1/healthz", lambda *_: (200, {"multi_user": False})),
        ("GET", r"/apis/v2beta1/experiments", lambda *_: (200, {"experiments": [], "total_size": 0})),
        ("POST", r"/apis/v2beta1/experiments", lambda _, body: (200, {**body, "experiment_id": "exp-1"})),
        ("POST", r"/apis/v2beta1/runs", lambda _, body: (200, {**body, "run_id": "run-1", "state": "PENDING"})),
        ("POST", r"/apis/v2beta1/recurringruns", lambda _, body: (200, {**body, "recurring_run_id": "rr-1"})),
    ])


def test_pipeline_submit_sends_the_compiled_spec_and_parameters(capsys):
    with kfp_recorder() as api:
        assert main(["pipeline", "submit", "--host", api.url, "-p", "shards=s3://lcr-data/inat2019",
                     "-p", "fractions=[1.0, 0.1]"]) == 0
    assert "started run run-1" in capsys.readouterr().out
    (run,) = api.bodies("POST", r"/apis/v2beta1/runs")
    assert run["experiment_id"] == "exp-1"
    assert run["pipeline_spec"]["pipelineInfo"]["name"] == "lcr-pretrain-evaluate-promote"
    assert run["pipeline_spec"] == json.loads(json.dumps(yaml.safe_load(COMPILED.read_text())))
    assert run["runtime_config"]["parameters"] == {"shards": "s3://lcr-data/inat2019", "fractions": [1.0, 0.1]}


def test_pipeline_schedule_creates_one_recurring_run_at_a_time_without_catch_up(capsys):
    with kfp_recorder() as api:
        assert main(["pipeline", "schedule", "--host", api.url, "--cron", "0 0 3 * * *",
                     "-p", "shards=s3://lcr-data/inat2019"]) == 0
    (job,) = api.bodies("POST", r"/apis/v2beta1/recurringruns")
    assert job["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * *"
    assert int(job["max_concurrency"]) == 1 and job["no_catchup"] is True and job["mode"] == "ENABLE"
    assert job["pipeline_spec"]["root"] == yaml.safe_load(COMPILED.read_text())["root"]
    assert job["runtime_config"]["parameters"] == {"shards": "s3://lcr-data/inat2019"}
    assert "recurring run rr-1" in capsys.readouterr().out


def test_a_five_field_cron_is_refused_before_any_request(capsys):
    with kfp_recorder() as api:
        assert main(["pipeline", "schedule", "--host", api.url, "--cron", "0 3 * * *"]) == 2
    assert api.requests == []
    assert "expected 6 fields, seconds first" in capsys.readouterr().err


def kfp_task(name: str, status: str, *output: str) -> str:
    """What kfp's local runner prints for one task: its logger's lines (task names in colour) around
    the step's streamed output, indented."""
    colour = "\x1b[92m" if status == "SUCCESS" else "\x1b[91m"
    level = "INFO" if status == "SUCCESS" else "ERROR"
    return (f"12:00:00.000 - INFO - Executing task \x1b[96m'{name}'\x1b[0m\n12:00:00.001 - INFO - Streamed logs:\n"
            + "".join(f"    {line}\n" for line in output)
            + f"12:00:01.000 - {level} - Task \x1b[96m'{name}'\x1b[0m finished with status {colour}{status}\x1b[0m\n")


def test_a_local_run_shows_one_line_per_step_and_logs_everything():
    log, terminal = io.StringIO(), io.StringIO()
    bar = "".join(f"\r(pid=1) epoch {e}/2 step {s}/3 loss 4.1: {(e - 1) * 3 + s}/6\x1b[A" for e in (1, 2)
                  for s in (1, 2, 3))
    start, rest = kfp_task("probe", "SUCCESS", "top-1 90.0").split("12:00:00.001")
    text = (kfp_task("check-new-shards", "SUCCESS", '{"inputs": {"parameterValues": {}}}', "no lcr-demo@champion yet")
            + kfp_task("pretrain", "SUCCESS", "worker logs: runs/x/logs/1.log", bar)
            + start + start + f"12:00:00.001{rest}" * 2)  # two tasks of a loop at once, as kfp runs them
    with StepLog(log, terminal) as shown:
        for start in range(0, len(text), 7):  # kfp prints in pieces that split lines anywhere
            shown.write(text[start:start + 7])
    assert log.getvalue() == text  # everything, as printed
    lines = [line for line in terminal.getvalue().replace("\r", "\n").splitlines() if line.strip()]
    steps = [line.split()[:2] for line in lines if " in " in line and line.endswith(" s")]
    assert steps == [["check-new-shards", "success"], ["pretrain", "success"], *[["probe", "success"]] * 2]
    assert any("pretrain" in line and "6/6" in line and "epoch 2/2" in line for line in lines)  # the bar
    assert "parameterValues" not in terminal.getvalue() and "\x1b[96m" not in terminal.getvalue()


def test_the_step_log_takes_kfps_indenting_print_from_threads():
    """kfp's runner replaces `print` with one that writes indentation to sys.stdout (this stream) and
    runs a loop's tasks in threads: a StepLog that printed would wait on its own lock for ever."""
    from kfp.local import logging_utils

    log, terminal = io.StringIO(), io.StringIO()
    text = kfp_task("probe", "SUCCESS", "top-1 90.0")

    with StepLog(log, terminal) as shown, redirect_stdout(shown), logging_utils.indented_print():
        threads = [threading.Thread(target=print, args=(text,), kwargs={"end": ""}, daemon=True) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=10)
        assert not any(thread.is_alive() for thread in threads), "deadlocked"
    assert terminal.getvalue().count("probe                success in ") == 2


def test_a_failed_step_shows_its_last_lines():
    terminal = io.StringIO()
    output = [f"line {i}" for i in range(40)] + ["lcr pretrain: error: shards: no manifest at data/shards/train"]
    with StepLog(io.StringIO(), terminal) as shown:
        shown.write(kfp_task("check-new-shards", "SUCCESS", "fine") + kfp_task("pretrain", "FAILURE", *output))
    shown_lines = terminal.getvalue().splitlines()
    assert shown_lines[1].split()[:2] == ["pretrain", "failure"]
    assert shown_lines[2:] == [f"    | {line}" for line in output[-SHOWN_ON_FAILURE:]]
    assert "fine" not in terminal.getvalue()  # only the failed step's lines


def test_a_failing_local_run_names_the_step_shows_its_error_and_keeps_the_log(tmp_path, capsys):
    """The whole local runner, stopped at its first step: shards without a manifest."""
    params = {"shards": str(tmp_path / "no-shards"), "mlflow_uri": f"sqlite:///{tmp_path}/mlflow.db",
              "mode": "local", "cache_dir": str(tmp_path / "features")}
    with pytest.raises(cli.PipelineError) as err:
        cli.run_local(params, str(tmp_path / "pipeline"))
    shown = capsys.readouterr().out
    [log] = (tmp_path / "pipeline").glob("local-*.log")
    assert re.fullmatch(r"Pipeline 'lcr-pretrain-evaluate-promote' finished with status FAILURE\. Inner task "
                        rf"failed: 'check-new-shards'\. \(its last lines are above; all of it is in {log}\)",
                        str(err.value)), str(err.value)
    failed = re.split(r"  check-new-shards     failure in \d+ s\n", shown)[1]
    # the step's error as one line: kfp's executor let the ShardError end the step with a traceback
    assert failed.splitlines()[-1].startswith("    | components.data.ShardError: ") and "no manifest.json" in failed
    assert "Traceback" not in failed and "Traceback" in log.read_text()
    assert "Executing task" in log.read_text() and "Executing task" not in shown
