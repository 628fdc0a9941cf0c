"""`lcr pretrain`: self-supervised pretraining with PyTorch DDP under Ray Train (DESIGN §5).

The driver (`pretrain`) connects to Ray (a local instance sized to the machine, or the cluster that
`RAY_ADDRESS` names, as inside `ray job submit`), creates the MLflow run, and starts a `TorchTrainer`
whose workers run `train_loop_per_worker`: DDP over gloo (CPU) or nccl (GPU, with bf16 autocast and
channels_last), shards read by `components.data`, a checkpoint every `checkpoint_every_steps` steps
and at every epoch end, reported to Ray Train (a barrier: all ranks report, rank 0 writes the file).

Re-running with the same `run_name` and `storage_path` resumes from the latest checkpoint that reads
back whole (a truncated or damaged newer one is skipped with a warning), and `max_failures` lets Ray
restart a failed worker group from it. Ray keeps the last `keep_checkpoints` checkpoints, the
run's latest among them. A resumed epoch skips the batches already done: an epoch's data order
depends only on (seed, epoch), and each image's augmentation only on (seed, epoch, the image), so a
run resumed mid-epoch ends with the same weights as an uninterrupted one.

Workers get no credentials through Ray: Ray writes `runtime_env` variables in plain text to its
logs. Local workers inherit the driver's environment; the nodes of a remote cluster need their own
(an instance role, say). Checkpoint storage on S3 gets the driver's credentials inside the
pyarrow file system object that Ray hands to its processes.

Rank 0 alone of the workers talks to MLflow: per-step metrics, the final checkpoint and the final
encoder (a pyfunc model, see `components.tracking`). The driver creates the store, the experiment and
the run beforehand (so that every restart logs into the same run), logs the config as its parameters
and closes it: FINISHED, FAILED, or KILLED on Ctrl-C. A run that a killed driver left RUNNING is
continued by the next driver with the same `run_name` and `storage_path`.

A new run with `init_from` starts from that model's weights (a warm start, see `components.warm_start`):
the driver reads them before Ray starts, rank 0 loads them from Ray's object store, and DDP copies
them to the other ranks; the MLflow run's `lcr.init_from*` tags name what was read.

What can fail before training does is checked before Ray starts (`components.preflight`), and the
driver prints the run's config. It shows rank 0's progress bar and `[lcr]` notices only; everything
the workers and Ray Train's controller print goes to a log file (see `WorkerOutput`).

Hooks in `extra` (all optional): `stop_after_epoch: N` ends the run after epoch N, `stop_after_step: N`
after global step N, with a checkpoint there (a later run with the same name continues it);
`fail_at_step: N` with `fail_marker: PATH` makes the last rank raise once, after global step N
(fault-injection tests); `dump_final_weights: DIR` makes every rank save its final state_dict as
`DIR/rank<r>.pt` (to check that the ranks agree).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pyarrow.fs
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import yaml
from PIL import Image
from ray._private.ray_logging import global_worker_stdstream_dispatcher
from ray.experimental import tqdm_ray
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, Result, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from components import data, preflight, storage, tracking, warm_start
from components.checkpoint import (
    CHECKPOINT_FILE,
    CHECKSUM_FILE,
    Progress,
    check_resumable,
    checkpoint_dir_name,
    checkpoint_dirs,
    load_checkpoint,
    newest_readable,
    restore_training_state,
    rng_state,
    save_checkpoint,
    training_state,
    unwrap,
)
from lcr_core.augment import two_crop_transform
from lcr_core.backbones import IMAGENET
from lcr_core.config import LCRConfig, config_from_dict, config_yaml, load_config
from lcr_core.errors import LCRError
from lcr_core.metrics import retrieval_metrics
from lcr_core.model import build_model
from lcr_core.train import (
    NonFiniteLossError,
    TrainingHealth,
    build_optimizer,
    build_scheduler,
    extract_embeddings,
    train_step,
)

# Where the workers find S3 and MLflow's artefact store, passed on from the driver; never credentials
# (see the module's docstring).
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION", "MLFLOW_S3_ENDPOINT_URL")
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's list of a run's checkpoints
S3_CREDENTIALS = {"access_key": "AWS_ACCESS_KEY_ID", "secret_key": "AWS_SECRET_ACCESS_KEY",
                  "session_token": "AWS_SESSION_TOKEN"}
MODEL_URI_TAG = "lcr.model_uri"
CHECKPOINT_TAG = "lcr.last_checkpoint"
DIVERGED_TAG = "lcr.diverged"
RUN_NAME_TAG = "lcr.run_name"
STORAGE_TAG = "lcr.storage_path"
CHANGED_PARAMS_TAG = "lcr.changed_params"  # config values a continued run has but MLflow keeps the first of
ALWAYS_SHOWN = ("run_name", "variant", "backbone")  # printed at the start even when they are the defaults
NOTICE = "[lcr] "  # starts a line of a Ray process that the driver shows on the terminal
RAY_PRINTER = "ray_print_logs"  # Ray's handler that prints every forwarded line on the driver
LOG_HANDLER = "lcr_worker_output"  # ours instead (`WorkerOutput`)
COLLECTIVE_ERROR = re.compile(r"gloo|nccl", re.IGNORECASE)
URI_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:")  # s3://, models:/, runs:/, init:, ...: not a local path
ACTOR_PROCESS = re.compile(r"\bpid: (\d+)\s.*?\bip: (\S+)", re.DOTALL)  # in Ray's ActorDiedError message


class PretrainError(LCRError):
    """Training failed; the message is the first line of the failing rank's error."""


@dataclass
class PretrainResult:
    run_name: str
    mlflow_run_id: str
    checkpoint_uri: str  # the latest checkpoint folder (local path or s3://…)
    model_uri: str  # the logged encoder, for `tracking.load_encoder` / mlflow.pyfunc.load_model
    metrics: dict[str, Any] = field(default_factory=dict)  # those reported with the latest checkpoint


# ---------------------------------------------------------------------------------------------
# Command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a YAML file or the name of a shipped config (lcr_core/configs)")
    parser.add_argument("overrides", nargs="*", metavar="FIELD=VALUE",
                        help="config overrides, e.g. epochs=2 num_workers=2 storage_path=s3://bucket/runs")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved, validated config as YAML and exit (Ray is not started)")
    from components.launch import add_target_arguments  # (components.launch imports this module)

    add_target_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from components.launch import launch, target_from_args

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(config_yaml(cfg), end="")
        return 0
    result = launch(cfg, target_from_args(args))
    print(f"run {result.run_name}: MLflow run {result.mlflow_run_id}")
    print(f"checkpoint: {result.checkpoint_uri}")
    print(f"model: {result.model_uri}")
    print("metrics: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                  for k, v in sorted(result.metrics.items())))
    return 0


# ---------------------------------------------------------------------------------------------
# Driver

def pretrain(cfg: LCRConfig, *, tags: dict[str, str] | None = None, callbacks: tuple | list = ()) -> PretrainResult:
    """Train (or resume) `cfg.run_name` on Ray Train; returns where the checkpoint and model are.
    `tags` go on the MLflow run (e.g. a sweep's parent run), `callbacks` to Ray Train (e.g. Tune's)."""
    preflight.check_config(cfg)
    cfg = with_absolute_paths(cfg)
    preflight.check_inputs(cfg)
    source = preflight.warm_start_source(cfg)
    storage_path, filesystem = checkpoint_storage(cfg.storage_path)
    stand_in_for_missing_checkpoints(cfg, storage_path, filesystem)
    print(config_summary(cfg), end="", flush=True)
    if source is not None:
        print(source.describe(), flush=True)
    with ray_session(cfg):
        preflight.check_resources(cfg)
        uri = tracking.tracking_uri()
        run_id = mlflow_run(uri, cfg, (tags or {}) | ({} if source is None else source.tags()))
        trainer = Trainer(
            train_loop_per_worker,
            train_loop_config={"config": cfg.to_dict(), "tracking_uri": uri, "mlflow_run_id": run_id,
                               "warm_start": None if source is None else ray.put(source.weights)},
            scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                         resources_per_worker=preflight.worker_resources(cfg)),
            run_config=RunConfig(name=cfg.run_name, storage_path=storage_path, storage_filesystem=filesystem,
                                 failure_config=FailureConfig(max_failures=cfg.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                                 worker_runtime_env={"env_vars": forwarded_env()},
                                 callbacks=[WorkerFailures(cfg.max_failures), *callbacks]),
            torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo",
                                     timeout_s=cfg.collective_timeout_s),
        )
        result = fit(trainer, cfg, uri, run_id)
    logged = tracking.run_tags(uri, run_id)
    if DIVERGED_TAG in logged:  # no model was logged; the checkpoints before the divergence are kept
        end_run(uri, run_id, "FAILED")
        raise PretrainError(f"run {cfg.run_name!r} diverged: {logged[DIVERGED_TAG]}")
    end_run(uri, run_id, "FINISHED")
    if result.checkpoint is None:
        raise PretrainError(f"run {cfg.run_name!r}: finished without a checkpoint")
    return PretrainResult(run_name=cfg.run_name, mlflow_run_id=run_id,
                          checkpoint_uri=checkpoint_uri(result.checkpoint, filesystem),
                          model_uri=logged.get(MODEL_URI_TAG, ""), metrics=dict(result.metrics))


class Trainer(TorchTrainer):
    """A TorchTrainer that leaves Ctrl-C to the driver. Ray 2.60's own SIGINT handler waits, inside
    the handler, for the train controller to abort (which it does not do while it waits for workers
    that do not fit), then exits with status 0 and the MLflow run FAILED. Without it, Ctrl-C raises
    KeyboardInterrupt in `fit`, and `fit` below calls `stop`."""

    controller = None

    def _register_sigint_handler(self, controller) -> None:
        self.controller = controller

    def stop(self, timeout_s: float = 15) -> None:
        """Abort the run: the controller stops the workers and ends. One that does not answer in
        time is killed, and its workers with it (Ray ends the actors that an actor owns)."""
        if self.controller is None:
            return
        try:
            ray.get(self.controller.abort.remote(), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            ray.kill(self.controller)
        except ray.exceptions.RayError:  # the controller ended its own process: the usual answer
            pass


def fit(trainer: Trainer, cfg: LCRConfig, uri: str, run_id: str) -> Result:
    """Ray Train's result. The MLflow run never stays RUNNING: FAILED if training failed, KILLED on
    Ctrl-C (marked first, then the workers are stopped: a second Ctrl-C may cut that short)."""
    try:
        return trainer.fit()
    except KeyboardInterrupt:
        print("interrupted: stopping the workers…", file=sys.stderr, flush=True)
        end_run(uri, run_id, "KILLED")
        trainer.stop()
        raise
    except BaseException as err:
        end_run(uri, run_id, "FAILED")
        if isinstance(err, ray.train.TrainingFailedError):
            raise PretrainError(f"run {cfg.run_name!r} failed: {failure_summary(err)}") from None
        raise


def end_run(uri: str, run_id: str, status: str) -> None:
    """FINISHED, FAILED or KILLED (`tracking.end_run` knows the first two only)."""
    mlflow.MlflowClient(uri).set_terminated(run_id, status)


def config_summary(cfg: LCRConfig) -> str:
    """The config as YAML for the start of the run's output: run_name, variant and backbone, then
    every field that differs from the defaults (`--print-config` shows them all); credentials never
    (see `tracking.config_params`)."""
    defaults, values = LCRConfig().to_dict(), without_secrets(cfg.to_dict())
    shown = {name: values[name] for name in ALWAYS_SHOWN} | {
        name: value for name, value in values.items() if value != defaults.get(name)}
    ignored = ("# backbone_weights is not loaded: init_from's weights replace it\n"
               if cfg.init_from is not None and cfg.backbone_weights is not None else "")
    return (f"# run {cfg.run_name}: the config fields that differ from the defaults\n"
            + yaml.safe_dump(shown, sort_keys=False) + ignored)


def without_secrets(values: dict[str, Any]) -> dict[str, Any]:
    return {name: without_secrets(value) if isinstance(value, dict)
            else tracking.without_credentials(value) if isinstance(value, str) else value
            for name, value in values.items() if not tracking.is_secret(name)}


def mlflow_run(uri: str, cfg: LCRConfig, tags: dict[str, str]) -> str:
    """The MLflow run this driver logs into, with the config as its parameters. A driver killed
    (kill -9) before it ended its run leaves it RUNNING; the next driver with the same run_name and
    storage_path resumes the training, and continues that run too."""
    storage_tag = tracking.without_credentials(cfg.storage_path)
    run_id = orphaned_run(uri, cfg, storage_tag)
    if run_id is None:
        run_id = tracking.start_run(uri, cfg, {"lcr.variant": cfg.variant, STORAGE_TAG: storage_tag, **tags})
    else:
        print(f"continuing MLflow run {run_id}: a driver that did not end it left it RUNNING", flush=True)
        client = mlflow.MlflowClient(uri)
        for name, value in tags.items():
            client.set_tag(run_id, name, value)
    log_params(uri, run_id, cfg)
    return run_id


def orphaned_run(uri: str, cfg: LCRConfig, storage_tag: str) -> str | None:
    """The newest RUNNING run of this run_name and storage_path, if any."""
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(cfg.mlflow_experiment)
    if experiment is None:
        return None
    running = client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'",
                                 order_by=["attributes.start_time DESC"])
    return next((run.info.run_id for run in running if run.data.tags.get(RUN_NAME_TAG) == cfg.run_name
                 and run.data.tags.get(STORAGE_TAG) == storage_tag), None)


def log_params(uri: str, run_id: str, cfg: LCRConfig) -> None:
    """The config as the run's parameters. MLflow refuses to change one: a continued run keeps its
    first values, and the names of those that changed go in the `lcr.changed_params` tag."""
    client = mlflow.MlflowClient(uri)
    logged = client.get_run(run_id).data.params
    params = tracking.config_params(cfg.to_dict())
    tracking.MetricLogger(uri, run_id).log_params({k: v for k, v in params.items() if k not in logged})
    changed = sorted(name for name, value in params.items() if logged.get(name, value) != value)
    if changed:
        client.set_tag(run_id, CHANGED_PARAMS_TAG, ", ".join(changed))


def with_absolute_paths(cfg: LCRConfig) -> LCRConfig:
    """Workers may run in another directory: local paths are made absolute (URIs stay as they are)."""
    def absolute(path: str | None) -> str | None:
        if path in (None, IMAGENET) or URI_SCHEME.match(path):
            return path
        return str(Path(path).resolve())

    return replace(cfg, shards=absolute(cfg.shards), storage_path=absolute(cfg.storage_path),
                   backbone_weights=absolute(cfg.backbone_weights), init_from=absolute(cfg.init_from))


def checkpoint_storage(storage_path: str) -> tuple[str, pyarrow.fs.FileSystem | None]:
    """Ray Train's (storage_path, storage_filesystem) for a folder or `s3://bucket/prefix`; for S3 the
    endpoint comes from AWS_ENDPOINT_URL and the bucket must exist. Credentials found in the
    environment are given to the file system explicitly: Ray ships it to processes of the cluster
    (the train controller among them) that do not have this environment."""
    if not storage.is_s3(storage_path):
        Path(storage_path).mkdir(parents=True, exist_ok=True)
        return storage_path, None
    bucket, prefix = storage.split_s3(storage_path)
    options: dict[str, Any] = {"region": os.environ.get("AWS_DEFAULT_REGION", "us-east-1")}
    for option, variable in S3_CREDENTIALS.items():
        if variable in os.environ:
            options[option] = os.environ[variable]
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        parts = urllib.parse.urlsplit(endpoint)
        options |= {"endpoint_override": parts.netloc, "scheme": parts.scheme or "https"}
    filesystem = pyarrow.fs.S3FileSystem(**options)
    try:
        found = filesystem.get_file_info(bucket).type
    except OSError as err:
        reason = str(err).splitlines()[0]
        raise LCRError(f"storage_path {storage_path}: S3 not reachable ({reason})") from None
    if found == pyarrow.fs.FileType.NotFound:
        raise LCRError(f"storage_path {storage_path}: bucket {bucket!r} does not exist at "
                       f"{endpoint or 'AWS'}; expected an existing bucket")
    return f"{bucket}/{prefix}".rstrip("/"), filesystem


def stand_in_for_missing_checkpoints(cfg: LCRConfig, storage_path: str,
                                     filesystem: pyarrow.fs.FileSystem | None) -> None:
    """An empty folder for each checkpoint that Ray's snapshot of the run lists but that is gone
    (deleted by hand, say). Ray would refuse to resume and advise deleting the whole run; with the
    stand-in it resumes, and the workers skip it, with a warning, for the newest intact checkpoint."""
    filesystem = filesystem or pyarrow.fs.LocalFileSystem()
    run = f"{storage_path}/{cfg.run_name}"
    if filesystem.get_file_info(f"{run}/{RAY_SNAPSHOT}").type == pyarrow.fs.FileType.NotFound:
        return  # a new run
    with filesystem.open_input_stream(f"{run}/{RAY_SNAPSHOT}") as stream:
        text = stream.read()
    try:
        listed = {entry["checkpoint_dir_name"] for entry in json.loads(text)["checkpoint_results"]}
    except (ValueError, KeyError, TypeError):
        return  # not the snapshot Ray writes: Ray will say so
    for name in sorted(listed):
        if filesystem.get_file_info(f"{run}/{name}").type == pyarrow.fs.FileType.NotFound:
            print(f"warning: {cfg.run_name}: checkpoint {storage.join(cfg.storage_path, cfg.run_name, name)} "
                  "is listed by Ray but gone; an empty folder stands in for it", file=sys.stderr, flush=True)
            filesystem.create_dir(f"{run}/{name}")


def checkpoint_uri(checkpoint: Checkpoint, filesystem: pyarrow.fs.FileSystem | None) -> str:
    return checkpoint.path if filesystem is None else storage.S3_SCHEME + checkpoint.path


def forwarded_env() -> dict[str, str]:
    return {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}


def connect_ray() -> bool:
    """Join the cluster RAY_ADDRESS names (set inside `ray job submit`), else start a local instance
    with every CPU and GPU of this machine; False (and nothing done) if Ray is already initialised."""
    if ray.is_initialized():
        return False
    ray.init(address=os.environ.get("RAY_ADDRESS"))
    return True


@contextmanager
def ray_session(cfg: LCRConfig) -> Iterator[None]:
    """Ray for one run. One the caller initialised (a test, a Tune trial) is used as it is. Otherwise
    the driver connects (`connect_ray`), sends what Ray's processes print to the run's log file, and
    shuts Ray down afterwards, on Ctrl-C too: a local instance it started stops with it."""
    if not connect_ray():
        yield
        return
    output = WorkerOutput(worker_log_path(cfg))
    print(f"worker logs: {output.path}", flush=True)
    global_worker_stdstream_dispatcher.remove_handler(RAY_PRINTER)
    global_worker_stdstream_dispatcher.add_handler(LOG_HANDLER, output)
    try:
        yield
    finally:
        ray.shutdown()
        global_worker_stdstream_dispatcher.remove_handler(LOG_HANDLER)
        output.close()


def worker_log_path(cfg: LCRConfig) -> Path:
    """`<storage_path>/<run_name>/logs/<UTC time>.log`; for storage on S3, `lcr-logs/<run_name>/…` in
    the working directory (the driver writes the file)."""
    folder = (Path("lcr-logs", cfg.run_name) if storage.is_s3(cfg.storage_path)
              else Path(cfg.storage_path, cfg.run_name, "logs"))
    return folder.resolve() / f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.log"


class WorkerOutput:
    """The driver's end of what Ray forwards from the processes of its job (the workers, Ray Train's
    controller): every line goes to the log file, rank 0's progress bar to the terminal, and `[lcr] `
    notices to stderr. Ray would print every line with its process's prefix: each worker's output,
    and a failure as tracebacks of 45 to 110 lines. `ray.init(log_to_driver=False)` would drop the
    progress bar too (tqdm_ray's bars travel in that stream), so `ray_session` puts this in place of
    Ray's printer among the handlers of Ray's log dispatcher (a private module of Ray 2.60, pinned)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.file = path, open(path, "a", buffering=1)
        self.bars: dict[str, dict[str, Any]] = {}  # the last state of each bar still open, by its uuid

    def __call__(self, batch: dict[str, Any]) -> None:
        source = (f"({batch.get('actor_name') or batch.get('task_name') or 'ray'} pid={batch.get('pid')}, "
                  f"ip={batch.get('ip')})")
        for line in batch.get("lines", []):
            if tqdm_ray.RAY_TQDM_MAGIC in line:
                self.show_progress(line)
                continue
            self.write(f"{source} {line}\n")
            if line.startswith(NOTICE):
                tqdm_ray.instance().hide_bars()
                print(line[len(NOTICE):], file=sys.stderr, flush=True)
                tqdm_ray.instance().unhide_bars()

    def show_progress(self, line: str) -> None:
        """Draw a worker's tqdm_ray bar state as Ray's printer would; a line cut short is skipped."""
        try:
            state = json.loads(line)
        except ValueError:
            return
        tqdm_ray.instance().process_state_update(state)
        self.bars[state["uuid"]] = state
        if state["closed"]:
            del self.bars[state["uuid"]]

    def close(self) -> None:
        """Close the log file, and the bars of workers that stopped without closing them (Ctrl-C, a
        failure): the terminal would show them again when the driver exits, after its last message."""
        for state in self.bars.values():
            tqdm_ray.instance().process_state_update(state | {"closed": True})
        try:
            self.file.close()
        except OSError as err:
            self.lost(err)

    def write(self, text: str) -> None:
        if self.file.closed:
            return
        try:
            self.file.write(text)
        except OSError as err:  # a full disk: the run's own error says so; the log must not add a traceback
            self.lost(err)

    def lost(self, err: OSError) -> None:
        print(f"warning: worker log {self.path}: {err.strerror}; its last lines are lost", file=sys.stderr, flush=True)
        with suppress(OSError):
            self.file.close()


def failure_summary(err: ray.train.TrainingFailedError) -> str:
    """One line for a failed run: see `summarise_failures`, or the error's first line."""
    failures = getattr(err, "worker_failures", None) or {}
    return summarise_failures(failures) if failures else str(err).strip().splitlines()[0]


def summarise_failures(failures: dict[int, BaseException]) -> str:
    """The error of the rank that explains the failure: a dead process first, then an LCRError (its
    message as it is), then any other error's last line; a collective's error (gloo, NCCL) last, as
    the other ranks get one when a rank stops."""
    rank = min(failures, key=lambda r: (failure_order(failures[r]), r))
    error = failures[rank]
    if dead_actor(error) is not None:
        return f"worker rank {rank} died ({how_it_died(dead_actor(error))})"
    cause = lcr_cause(error)
    text = str(cause if cause is not None else error).strip()
    return f"rank {rank}: {text.splitlines()[-1] if cause is None else text.splitlines()[0]}"


def failure_order(error: BaseException) -> int:
    if dead_actor(error) is not None:
        return 0
    if lcr_cause(error) is not None:
        return 1
    return 3 if COLLECTIVE_ERROR.search(str(error)) else 2


def dead_actor(error: BaseException) -> ray.exceptions.RayActorError | None:
    """The RayActorError of a worker whose process is gone; Ray Train wraps it in the error of the
    health check that found it."""
    error = getattr(error, "health_check_failure", error)
    return error if isinstance(error, ray.exceptions.RayActorError) else None


def how_it_died(error: ray.exceptions.RayActorError) -> str:
    """Ray 2.60 says that the process ended, not how: the signal is not passed on."""
    found = ACTOR_PROCESS.search(str(error))
    process = f"process {found[1]} on {found[2]}" if found else "its process"
    return f"{process} ended without a Python error: killed, e.g. by SIGKILL or the OOM killer, or crashed"


def lcr_cause(error: BaseException | None) -> LCRError | None:
    while error is not None and not isinstance(error, LCRError):
        error = error.__cause__
    return error


class WorkerFailures(ray.train.UserCallback):
    """Runs in Ray Train's controller. When workers fail and `max_failures` lets Ray Train restart
    them from the last checkpoint, the driver shows which rank failed, as a notice; a failure that
    ends the run is the driver's error (`failure_summary`)."""

    def __init__(self, max_failures: int):
        self.max_failures, self.failures = max_failures, 0

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        self.failures += 1
        if self.failures <= self.max_failures:
            notice(f"warning: {summarise_failures(worker_exceptions)}; recovering: the workers restart from the "
                   f"last checkpoint (failure {self.failures} of max_failures={self.max_failures})")


# ---------------------------------------------------------------------------------------------
# Workers

@dataclass
class Worker:
    """One rank's training state."""

    cfg: LCRConfig
    rank: int
    world_size: int
    device: torch.device
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    steps_per_epoch: int
    logger: tracking.MetricLogger | None  # rank 0 only
    checkpoint_root: str
    health: TrainingHealth
    taken: set[str] = field(default_factory=set)  # the run folder's entries when it resumed

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def last_epoch(self) -> int:
        return min(self.cfg.epochs, int(self.cfg.extra.get("stop_after_epoch", self.cfg.epochs)))

    @property
    def stop_step(self) -> int | None:
        """The `stop_after_step` hook's global step, if set."""
        step = self.cfg.extra.get("stop_after_step")
        return None if step is None else int(step)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    cfg = config_from_dict(loop_config["config"], "pretrain worker config")
    context = ray.train.get_context()
    worker = build_worker(cfg, context.get_world_rank(), context.get_world_size(), loop_config)
    progress = resume(worker)
    bar = progress_bar(worker, progress)
    try:
        for epoch in range(progress.epoch, worker.last_epoch):
            progress = train_epoch(worker, epoch, progress, bar)
            if progress.global_step == worker.stop_step:
                break
    except NonFiniteLossError as err:  # raised on every rank at once; a retry would diverge again
        if worker.logger:
            worker.logger.set_tag(DIVERGED_TAG, str(err))
        return
    finish(worker, bar)


def build_worker(cfg: LCRConfig, rank: int, world_size: int, loop_config: dict[str, Any]) -> Worker:
    device = ray.train.torch.get_device()
    seed_everything(cfg.seed + rank)  # the weights start alike anyway: DDP copies rank 0's
    model = build_model(with_local_weights(cfg))
    if rank == 0 and loop_config["warm_start"] is not None and ray.train.get_checkpoint() is None:
        # (resume() below restores a checkpoint Ray has not registered yet over these weights)
        warm_start.load_weights(model, ray.get(loop_config["warm_start"]))  # DDP copies them to the other ranks
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    optimizer = build_optimizer(model, cfg)  # lr already scaled to the global batch (cfg.scaled_lr)
    loader = data.train_loader(cfg, 0, rank, world_size)
    logger = None
    if rank == 0:
        logger = tracking.MetricLogger(loop_config["tracking_uri"], loop_config["mlflow_run_id"])
    steps = len(loader)
    return Worker(cfg, rank, world_size, device, model, optimizer, build_scheduler(optimizer, cfg, steps),
                  steps, logger, storage.join(cfg.storage_path, cfg.run_name), TrainingHealth(cfg.embed_dim))


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def with_local_weights(cfg: LCRConfig) -> LCRConfig:
    """Initial backbone weights in object storage are fetched to a local file first; with `init_from`
    none are loaded: its weights (or, on resume, the checkpoint's) replace them."""
    if cfg.init_from is not None:
        return replace(cfg, backbone_weights=None)
    if cfg.backbone_weights is None or not storage.is_s3(cfg.backbone_weights):
        return cfg
    local = Path(tempfile.mkdtemp(prefix="lcr-weights-")) / storage.name_of(cfg.backbone_weights)
    return replace(cfg, backbone_weights=str(storage.download(cfg.backbone_weights, local)))


def resume(worker: Worker) -> Progress:
    """Continue from the run's newest checkpoint that reads back whole. Ray's `get_checkpoint()` is
    not enough: it is None until Ray's controller has registered a report (a worker group restarted,
    or a driver killed, just after a checkpoint was written loses it), and its latest may be truncated
    or damaged. So rank 0 looks through the run folder itself, newest first, and every rank loads the
    one it chose."""
    context = ray.train.get_context().get_storage()  # Ray's DeveloperAPI, pinned with Ray 2.60
    run_folder = CheckpointFolder(context.storage_filesystem, context.experiment_fs_path, worker.checkpoint_root)
    choice = share(choose_checkpoint(worker, run_folder) if worker.rank == 0 else None, worker.world_size)
    if "error" in choice:
        raise LCRError(choice["error"])
    if "new" in choice:
        worker.taken = set(choice["taken"])
        return Progress()
    worker.taken = set(choice["taken"])
    state = choice.pop("state", None) or run_folder.load(choice["name"])
    where = storage.join(worker.checkpoint_root, choice["name"])
    check_resumable(state["config"], worker.cfg.to_dict(), where)
    progress = restore_training_state(state, worker.model, worker.optimizer, worker.scheduler,
                                      worker.rank, worker.world_size)
    if worker.logger:
        worker.logger.log({"resumed_from_step": progress.global_step}, step=progress.global_step)
        notice(f"resumed {worker.cfg.run_name} from {where}: epoch {progress.epoch + 1}, "
               f"{progress.step_in_epoch} batches in, global step {progress.global_step}")
    return progress


@dataclass
class CheckpointFolder:
    """A run's folder as Ray's storage file system reaches it: workers may hold no credentials of
    their own, but Ray's file system object carries the driver's."""

    filesystem: pyarrow.fs.FileSystem
    path: str
    uri: str  # what messages call it (s3://… or a local path)

    def names(self) -> list[str]:
        infos = self.filesystem.get_file_info(pyarrow.fs.FileSelector(self.path, allow_not_found=True))
        return [info.base_name for info in infos if info.type == pyarrow.fs.FileType.Directory]

    def load(self, name: str) -> dict[str, Any]:
        checkpoint = Checkpoint(path=f"{self.path}/{name}", filesystem=self.filesystem)
        with checkpoint.as_directory() as directory:
            return load_checkpoint(directory, storage.join(self.uri, name, CHECKPOINT_FILE))


def choose_checkpoint(worker: Worker, run_folder: CheckpointFolder) -> dict[str, Any]:
    """Rank 0: {"name", "state", "taken"} of the newest readable checkpoint, {"new", "taken"} when
    there is none yet, or {"error"}."""
    names = run_folder.names()
    if not checkpoint_dirs(names):
        return {"new": True, "taken": names}
    found = newest_readable(names, run_folder.load, lambda message: warn(worker, "skipped_checkpoint", message))
    if found is None:
        return {"error": f"run {worker.cfg.run_name!r}: no checkpoint in {run_folder.uri} reads back whole; "
                         "expected at least one intact checkpoint (or a new run_name to start afresh)"}
    return {"name": found[0], "state": found[1], "taken": names}


def share(choice: dict[str, Any] | None, world_size: int) -> dict[str, Any]:
    """Rank 0's choice on every rank (a collective); the state it loaded stays on rank 0."""
    if world_size == 1:
        return choice
    shared = [None if choice is None else {k: v for k, v in choice.items() if k != "state"}]
    dist.broadcast_object_list(shared, src=0)
    return choice if choice is not None else shared[0]


def warn(worker: Worker, kind: str, message: str) -> None:
    """Rank 0: a warning on the driver's terminal (a notice) and as the run's `lcr.warning.<kind>` tag."""
    notice(f"warning: {worker.cfg.run_name}: {message}")
    worker.logger.set_tag(f"lcr.warning.{kind}", message)


def notice(text: str) -> None:
    """A line for the driver's terminal (see `WorkerOutput`). Written to the process's own stdout:
    Ray Train's `print` on the workers would also copy it through its logger, so it came twice."""
    print(NOTICE + text, file=sys.__stdout__, flush=True)


def progress_bar(worker: Worker, progress: Progress):
    """Rank 0's bar, drawn by the Ray driver in the terminal."""
    if worker.rank != 0:
        return None
    from ray.experimental.tqdm_ray import tqdm

    bar = tqdm(total=worker.cfg.epochs * worker.steps_per_epoch, desc=f"pretrain {worker.cfg.run_name}")
    bar.update(progress.global_step)
    return bar


def train_epoch(worker: Worker, epoch: int, progress: Progress, bar) -> Progress:
    """The rest of `epoch` from `progress` (or up to the `stop_after_step` hook); checkpoints on the
    way and at its end."""
    cfg = worker.cfg
    first = progress.step_in_epoch if progress.epoch == epoch else 0
    loader = epoch_loader(cfg, epoch, worker.rank, worker.world_size, first)
    worker.model.train()
    started = last_step_end = time.perf_counter()
    global_step = progress.global_step
    metrics: dict[str, float] = {}
    sums: dict[str, float] = {}
    for step_in_epoch, (im_q, im_k) in enumerate(batches(loader), start=first):
        views = (to_device(im_q, worker), to_device(im_k, worker))
        metrics = train_step(worker.model, views, worker.optimizer, worker.scheduler,
                             autocast_dtype=torch.bfloat16 if worker.on_gpu else None)
        sums = {name: sums.get(name, 0.0) + value for name, value in metrics.items()}
        global_step += 1
        # Wall time from the previous step's end: the data wait counts too (global images/s).
        step_end = time.perf_counter()
        images_per_s = cfg.batch_size / (step_end - last_step_end)
        last_step_end = step_end
        epochs_done = epoch + (step_in_epoch + 1) / worker.steps_per_epoch  # as `report` counts them
        metrics |= {"images_per_s": images_per_s, "epoch": epochs_done, "data_skipped": loader.skipped}
        if worker.logger:
            worker.logger.log(metrics, step=global_step)
            seconds_per_step = (time.perf_counter() - started) / (step_in_epoch + 1 - first)
            eta = seconds_per_step * (cfg.epochs * worker.steps_per_epoch - global_step)
            bar.set_description(f"epoch {epoch + 1}/{cfg.epochs} step {step_in_epoch + 1}/"
                                f"{worker.steps_per_epoch} loss {metrics['loss']:.3f} "
                                f"{images_per_s:.0f} img/s ETA {format_eta(eta)}")
            bar.update(1)
        inject_failure(worker, global_step)
        if step_in_epoch + 1 < worker.steps_per_epoch:  # the epoch's end is checkpointed below
            stop = global_step == worker.stop_step
            every = cfg.checkpoint_every_steps
            if stop or (every and global_step % every == 0):
                save(worker, Progress(epoch, step_in_epoch + 1, global_step), metrics, final=stop)
            if stop:
                return Progress(epoch, step_in_epoch + 1, global_step)
    if worker.logger and sums:
        steps_done = worker.steps_per_epoch - first
        epoch_means = {name: total / steps_done for name, total in sums.items()}
        epoch_means["images_per_s"] = steps_done * cfg.batch_size / (last_step_end - started)
        check_health(worker, epoch_means, global_step)
    progress = Progress(epoch + 1, 0, global_step)
    final = epoch + 1 == worker.last_epoch or global_step == worker.stop_step
    if cfg.eval_every_epochs and (epoch + 1) % cfg.eval_every_epochs == 0:
        metrics = metrics | validate(worker, global_step)
    save(worker, progress, metrics | {"epoch_data_skipped": loader.skipped}, final=final)
    return progress


def validate(worker: Worker, global_step: int) -> dict[str, float]:
    """Rank 0: leave-one-out retrieval on the shards' test split (for `lcr tune`, the hold-out split),
    with the variant's test pooling; the other ranks wait in the report that follows."""
    if worker.rank != 0:
        return {}
    cfg, model = worker.cfg, unwrap(worker.model)
    loader = data.eval_loader(storage.join(cfg.shards, "test"), cfg.image_size, cfg.eval_resize, batch_size=64)
    with torch.random.fork_rng(devices=[]):  # iterating a DataLoader draws from torch's RNG: keep resumes exact
        embeddings, labels = extract_embeddings(model, ((b[0], b[1]) for b in loader), [cfg.test_pooling],
                                                worker.device)
    worker.model.train()
    found = retrieval_metrics(embeddings[cfg.test_pooling], labels)
    metrics = {"val_rank1": found["rank1"], "val_mAP": found["mAP"]}
    worker.logger.log(metrics, step=global_step)
    return metrics


def epoch_loader(cfg: LCRConfig, epoch: int, rank: int, world_size: int, first: int) -> data.ShardLoader:
    """This rank's batches of `epoch` from batch `first` on, each image's views drawn under its own seed."""
    transform = SeededPerImage(two_crop_transform(cfg.image_size), f"{cfg.seed}/{epoch}")
    return data.train_loader(cfg, epoch, rank, world_size, transform, start_step=first)


class SeededPerImage:
    """Runs a transform (the two random views) under RNGs seeded by `seed` and the image's pixels,
    and leaves the process's RNGs as they were.

    A resumed epoch skips the batches already done without augmenting their images, so a DataLoader
    worker's RNG would stand elsewhere than in an uninterrupted epoch and every later view would
    differ. Seeded per image, views depend on neither that nor `loader_workers`. The transforms draw
    from torch's and Python's RNGs."""

    def __init__(self, transform, seed: str):
        self.transform, self.seed = transform, seed

    def __call__(self, image: Image.Image):
        digest = hashlib.blake2b(f"{self.seed}/{image.mode}/{image.size}/".encode(), digest_size=8)
        digest.update(image.tobytes())
        seed = int.from_bytes(digest.digest(), "little")
        python_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            try:
                return self.transform(image)
            finally:
                random.setstate(python_state)


def batches(loader: data.ShardLoader):
    """The loader's batches. Starting to iterate a DataLoader draws its workers' seed from torch's RNG:
    a resumed epoch would draw it at another point of the RNG stream than an uninterrupted one and
    shift every later draw (shuffle-BN's permutations). It is drawn from a fork of the RNG."""
    iterator = iter(loader)
    with torch.random.fork_rng(devices=[]):
        first = next(iterator, None)
    if first is not None:
        yield first
        yield from iterator


def check_health(worker: Worker, epoch_means: dict[str, float], global_step: int) -> None:
    """Rank 0: the epoch's means and the queue's effective rank to MLflow (`epoch/…`), and a warning,
    once each, on the terminal and as an `lcr.warning.<kind>` tag when the training looks unhealthy."""
    rank = unwrap(worker.model).embedding_effective_rank()
    logged = epoch_means | ({} if rank is None else {"embedding_effective_rank": rank})
    worker.logger.log({f"epoch/{name}": value for name, value in logged.items()}, step=global_step)
    for kind, message in worker.health.end_epoch(epoch_means, rank).items():
        warn(worker, kind, message)


def to_device(images: torch.Tensor, worker: Worker) -> torch.Tensor:
    if worker.on_gpu:
        return images.to(worker.device, non_blocking=True, memory_format=torch.channels_last)
    return images


def format_eta(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def inject_failure(worker: Worker, global_step: int) -> None:
    """The fault-injection hook (`extra.fail_at_step` + `extra.fail_marker`): the last rank raises once."""
    extra = worker.cfg.extra
    if extra.get("fail_at_step") != global_step or worker.rank != worker.world_size - 1:
        return
    marker = Path(extra["fail_marker"])
    if not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"failed at step {global_step}\n")
        raise RuntimeError(f"injected failure after global step {global_step} (extra.fail_at_step)")


def gather_rng_states(world_size: int) -> list[dict[str, Any]]:
    """Every rank's RNG state, in rank order (a collective: all ranks call it)."""
    if world_size == 1:
        return [rng_state()]
    states: list[Any] = [None] * world_size
    dist.all_gather_object(states, rng_state())
    return states


def save(worker: Worker, progress: Progress, metrics: dict[str, float], final: bool = False) -> None:
    """Checkpoint through `ray.train.report`: every rank calls it, rank 0 writes the file."""
    rng_states = gather_rng_states(worker.world_size)
    name = checkpoint_dir_name(progress.global_step, worker.taken)
    with tempfile.TemporaryDirectory(prefix="lcr-checkpoint-") as tmp:
        checkpoint = None
        if worker.rank == 0:
            state = training_state(worker.model, worker.optimizer, worker.scheduler, progress, rng_states,
                                   worker.cfg.to_dict())
            file = save_checkpoint(tmp, state)
            checkpoint = Checkpoint.from_directory(tmp)
            worker.logger.flush()  # metrics up to here are in MLflow before the checkpoint exists
            if final:
                worker.logger.log_artifact(file, "checkpoint")
                worker.logger.log_artifact(file.with_name(CHECKSUM_FILE), "checkpoint")
        reported = {**metrics, "epoch": progress.epoch, "step_in_epoch": progress.step_in_epoch,
                    "global_step": progress.global_step}
        ray.train.report(reported, checkpoint=checkpoint, checkpoint_dir_name=name)
    if worker.logger:
        worker.logger.set_tag(CHECKPOINT_TAG, storage.join(worker.checkpoint_root, name))


def finish(worker: Worker, bar) -> None:
    """Rank 0 logs the encoder as an MLflow model; the hook may dump every rank's weights."""
    dump = worker.cfg.extra.get("dump_final_weights")
    if dump:
        Path(dump).mkdir(parents=True, exist_ok=True)
        torch.save(unwrap(worker.model).state_dict(), Path(dump) / f"rank{worker.rank}.pt")
    if worker.logger:
        bar.close()
        worker.logger.flush()
        model_state = unwrap(worker.model).state_dict()
        model_uri = tracking.log_encoder(worker.logger.uri, worker.logger.run_id, model_state, worker.cfg)
        worker.logger.set_tag(MODEL_URI_TAG, model_uri)
