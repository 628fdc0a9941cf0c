"""`lcr pretrain`: self-supervised pretraining with PyTorch DDP under Ray Train (DESIGN §5).

The driver (`pretrain`) connects to Ray (a local instance sized to the machine, or the cluster that
`RAY_ADDRESS` names, as inside `ray job submit`), creates the MLflow run, and starts a `TorchTrainer`
whose workers run `train_loop_per_worker`: DDP over gloo (CPU) or nccl (GPU, with bf16 autocast and
channels_last), shards read by `components.data`, a checkpoint every `checkpoint_every_steps` steps
and at every epoch end, reported to Ray Train (a barrier: all ranks report, rank 0 writes the file).

Re-running with the same `run_name` and `storage_path` resumes from the latest checkpoint, and
`max_failures` lets Ray restart a failed worker group from it. A resumed epoch skips the batches
already done: an epoch's data order depends only on (seed, epoch).

Rank 0 alone talks to MLflow: the config as parameters, per-step metrics, the final checkpoint and
the final encoder (a pyfunc model, see `components.tracking`). The driver only creates the store,
the experiment and the run beforehand (so that every restart logs into the same run) and closes it.

Hooks in `extra` (all optional): `stop_after_epoch: N` ends the run after epoch N (a later run with
the same name continues it); `fail_at_step: N` with `fail_marker: PATH` makes the last rank raise
once, after global step N (fault-injection tests); `dump_final_weights: DIR` makes every rank save
its final state_dict as `DIR/rank<r>.pt` (to check that the ranks agree).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import Checkpoint, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from components import data, storage, tracking
from components.checkpoint import (
    Progress,
    check_resumable,
    load_checkpoint,
    restore_training_state,
    rng_state,
    save_checkpoint,
    training_state,
    unwrap,
)
from lcr_core.backbones import IMAGENET
from lcr_core.config import LCRConfig, config_from_dict, config_yaml, load_config, warn_queue_exceeds_dataset
from lcr_core.errors import LCRError
from lcr_core.model import build_model
from lcr_core.train import TrainingHealth, build_optimizer, build_scheduler, train_step

# Variables the workers need to reach S3 and MLflow's artefact store, passed on from the driver.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_DEFAULT_REGION", "AWS_REGION", "MLFLOW_S3_ENDPOINT_URL")
S3_CREDENTIALS = {"access_key": "AWS_ACCESS_KEY_ID", "secret_key": "AWS_SECRET_ACCESS_KEY",
                  "session_token": "AWS_SESSION_TOKEN"}
MODEL_URI_TAG = "lcr.model_uri"
CHECKPOINT_TAG = "lcr.last_checkpoint"


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


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(config_yaml(cfg), end="")
        return 0
    result = pretrain(cfg)
    print(f"run {result.run_name}: MLflow run {result.mlflow_run_id}")
    print(f"checkpoint: {result.checkpoint_uri}")
    print(f"model: {result.model_uri}")
    print("metrics: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                  for k, v in sorted(result.metrics.items())))
    return 0


# ---------------------------------------------------------------------------------------------
# Driver

def pretrain(cfg: LCRConfig) -> PretrainResult:
    """Train (or resume) `cfg.run_name` on Ray Train; returns where the checkpoint and model are."""
    cfg = with_absolute_paths(cfg)
    check_hooks(cfg)
    storage_path, filesystem = checkpoint_storage(cfg.storage_path)
    connect_ray()
    uri = tracking.tracking_uri()
    storage_tag = tracking.without_credentials(cfg.storage_path)
    run_id = tracking.start_run(uri, cfg, {"lcr.variant": cfg.variant, "lcr.storage_path": storage_tag})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "tracking_uri": uri, "mlflow_run_id": run_id},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(name=cfg.run_name, storage_path=storage_path, storage_filesystem=filesystem,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             worker_runtime_env={"env_vars": forwarded_env()}),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo",
                                 timeout_s=cfg.collective_timeout_s),
    )
    try:
        result = trainer.fit()
    except BaseException as err:  # the MLflow run must not stay RUNNING, whatever stopped training
        tracking.end_run(uri, run_id, succeeded=False)
        if isinstance(err, ray.train.TrainingFailedError):
            raise PretrainError(f"run {cfg.run_name!r} failed: {failure_summary(err)}") from None
        raise
    tags = tracking.run_tags(uri, run_id)
    tracking.end_run(uri, run_id, succeeded=True)
    if result.checkpoint is None:
        raise PretrainError(f"run {cfg.run_name!r}: finished without a checkpoint")
    return PretrainResult(run_name=cfg.run_name, mlflow_run_id=run_id,
                          checkpoint_uri=checkpoint_uri(result.checkpoint, filesystem),
                          model_uri=tags.get(MODEL_URI_TAG, ""), metrics=dict(result.metrics))


def with_absolute_paths(cfg: LCRConfig) -> LCRConfig:
    """Workers may run in another directory: local paths are made absolute (URIs stay as they are)."""
    def absolute(path: str | None) -> str | None:
        return path if path in (None, IMAGENET) or "://" in path else str(Path(path).resolve())

    return replace(cfg, shards=absolute(cfg.shards), storage_path=absolute(cfg.storage_path),
                   backbone_weights=absolute(cfg.backbone_weights))


def check_hooks(cfg: LCRConfig) -> None:
    if "fail_at_step" in cfg.extra and not cfg.extra.get("fail_marker"):
        raise LCRError("config field 'extra.fail_at_step' needs 'extra.fail_marker': a file path that "
                       "makes the failure happen once")


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


def checkpoint_uri(checkpoint: Checkpoint, filesystem: pyarrow.fs.FileSystem | None) -> str:
    return checkpoint.path if filesystem is None else storage.S3_SCHEME + checkpoint.path


def forwarded_env() -> dict[str, str]:
    return {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}


def connect_ray() -> None:
    """Join the cluster RAY_ADDRESS names (set inside `ray job submit`), else start a local instance
    with every CPU and GPU of this machine."""
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"))


def failure_summary(err: ray.train.TrainingFailedError) -> str:
    """The first line of the first failing rank's error (an LCRError's message as it is)."""
    failures = getattr(err, "worker_failures", None) or {}
    for rank in sorted(failures):
        cause = failures[rank]
        while cause is not None and not isinstance(cause, LCRError):
            cause = cause.__cause__
        text = str(cause if cause is not None else failures[rank]).strip()
        return f"rank {rank}: {text.splitlines()[-1] if cause is None else text.splitlines()[0]}"
    return str(err).strip().splitlines()[0]


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

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def last_epoch(self) -> int:
        return min(self.cfg.epochs, int(self.cfg.extra.get("stop_after_epoch", self.cfg.epochs)))


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    cfg = config_from_dict(loop_config["config"], "pretrain worker config")
    context = ray.train.get_context()
    worker = build_worker(cfg, context.get_world_rank(), context.get_world_size(), loop_config)
    progress = resume(worker)
    if worker.logger:
        worker.logger.log_params(tracking.config_params(cfg.to_dict()))
    bar = progress_bar(worker, progress)
    for epoch in range(progress.epoch, worker.last_epoch):
        progress = train_epoch(worker, epoch, progress, bar)
    finish(worker, bar)


def build_worker(cfg: LCRConfig, rank: int, world_size: int, loop_config: dict[str, Any]) -> Worker:
    device = ray.train.torch.get_device()
    seed_everything(cfg.seed + rank)  # the weights start alike anyway: DDP copies rank 0's
    model = build_model(with_local_weights(cfg))
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    optimizer = build_optimizer(model, cfg)  # lr already scaled to the global batch (cfg.scaled_lr)
    loader = data.train_loader(cfg, 0, rank, world_size)
    logger = None
    if rank == 0:
        logger = tracking.MetricLogger(loop_config["tracking_uri"], loop_config["mlflow_run_id"])
        if not cfg.is_byol:
            warn_queue_exceeds_dataset(cfg, loader.manifest.total)
    steps = len(loader)
    return Worker(cfg, rank, world_size, device, model, optimizer, build_scheduler(optimizer, cfg, steps),
                  steps, logger, storage.join(cfg.storage_path, cfg.run_name), TrainingHealth(cfg.embed_dim))


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def with_local_weights(cfg: LCRConfig) -> LCRConfig:
    """Initial backbone weights in object storage are fetched to a local file first."""
    if cfg.backbone_weights is None or not storage.is_s3(cfg.backbone_weights):
        return cfg
    local = Path(tempfile.mkdtemp(prefix="lcr-weights-")) / storage.name_of(cfg.backbone_weights)
    return replace(cfg, backbone_weights=str(storage.download(cfg.backbone_weights, local)))


def resume(worker: Worker) -> Progress:
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return Progress()
    with checkpoint.as_directory() as directory:
        state = load_checkpoint(directory)
    check_resumable(state["config"], worker.cfg.to_dict(), checkpoint.path)
    progress = restore_training_state(state, worker.model, worker.optimizer, worker.scheduler,
                                      worker.rank, worker.world_size)
    if worker.logger:
        worker.logger.log({"resumed_from_step": progress.global_step}, step=progress.global_step)
        print(f"resumed {worker.cfg.run_name} from {checkpoint.path}: epoch {progress.epoch + 1}, "
              f"{progress.step_in_epoch} batches in, global step {progress.global_step}", flush=True)
    return progress


def progress_bar(worker: Worker, progress: Progress):
    """Rank 0's bar, drawn by the Ray driver in the terminal."""
    if worker.rank != 0:
        return None
    from ray.experimental.tqdm_ray import tqdm

    bar = tqdm(total=worker.cfg.epochs * worker.steps_per_epoch, desc=f"pretrain {worker.cfg.run_name}")
    bar.update(progress.global_step)
    return bar


def train_epoch(worker: Worker, epoch: int, progress: Progress, bar) -> Progress:
    """The rest of `epoch` from `progress`; checkpoints on the way and at its end."""
    cfg = worker.cfg
    first = progress.step_in_epoch if progress.epoch == epoch else 0
    loader = data.train_loader(cfg, epoch, worker.rank, worker.world_size, start_step=first)
    worker.model.train()
    started = last_step_end = time.perf_counter()
    global_step = progress.global_step
    metrics: dict[str, float] = {}
    sums: dict[str, float] = {}
    for step_in_epoch, (im_q, im_k) in enumerate(loader, start=first):
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
        every = cfg.checkpoint_every_steps
        if every and global_step % every == 0 and step_in_epoch + 1 < worker.steps_per_epoch:
            save(worker, Progress(epoch, step_in_epoch + 1, global_step), metrics)
    if worker.logger and sums:
        steps_done = worker.steps_per_epoch - first
        epoch_means = {name: total / steps_done for name, total in sums.items()}
        epoch_means["images_per_s"] = steps_done * cfg.batch_size / (last_step_end - started)
        check_health(worker, epoch_means, global_step)
    progress = Progress(epoch + 1, 0, global_step)
    final = epoch + 1 == worker.last_epoch
    save(worker, progress, metrics | {"epoch_data_skipped": loader.skipped}, final=final)
    return progress


def check_health(worker: Worker, epoch_means: dict[str, float], global_step: int) -> None:
    """Rank 0: the epoch's means and the queue's effective rank to MLflow (`epoch/…`), and a warning,
    once each, on the terminal and as an `lcr.warning.<kind>` tag when the training looks unhealthy."""
    rank = unwrap(worker.model).embedding_effective_rank()
    logged = epoch_means | ({} if rank is None else {"embedding_effective_rank": rank})
    worker.logger.log({f"epoch/{name}": value for name, value in logged.items()}, step=global_step)
    for kind, message in worker.health.end_epoch(epoch_means, rank).items():
        print(f"warning: {worker.cfg.run_name}: {message}", file=sys.stderr, flush=True)
        worker.logger.set_tag(f"lcr.warning.{kind}", message)


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
    name = f"checkpoint_{progress.global_step:08d}"
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
