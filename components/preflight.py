"""What `lcr pretrain` checks before it starts Ray, so that a bad run fails at once and in one line.

Inside Ray each of these mistakes costs a cluster start and surfaces as 45 to 110 lines of traceback
from every rank (or, for more workers than the cluster holds, as a wait that never ends): a missing
manifest, a batch larger than the data set, weights that do not fit the backbone, a resumed run with
another model, an `init_from` that cannot be read or has another architecture, an unwritable
`storage_path`, an empty path, a NaN. Each check raises an LCRError of one line naming the field and
what was expected. `check_resources` alone needs the cluster: the driver calls it once connected,
before it starts the workers.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import time
from dataclasses import fields
from pathlib import Path

import ray

from components import data, storage, tracking, warm_start
from components.checkpoint import check_resumable, checkpoint_dirs, newest_readable
from lcr_core.backbones import build_backbone
from lcr_core.config import LCRConfig, warn_queue_exceeds_dataset
from lcr_core.errors import LCRError

PATH_FIELDS = ("shards", "storage_path", "backbone_weights")
HOOK_STEPS = ("stop_after_epoch", "stop_after_step", "fail_at_step")  # `extra` hooks: counts >= 1
RESOURCE_WAIT_VARIABLE = "LCR_RESOURCE_WAIT_S"
RESOURCE_POLL_S = 5.0
SIZE_MISMATCH = re.compile(r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[.*?\])\) from "
                           r"checkpoint, the shape in current model is torch\.Size\((\[.*?\])\)")


def check_config(cfg: LCRConfig) -> None:
    """Field values, before any path is resolved (an empty path would resolve to the working directory).
    Validation runs again: `dataclasses.replace` makes configs that were never validated."""
    for name in PATH_FIELDS:
        value = getattr(cfg, name)
        if value is not None and not str(value).strip():
            raise LCRError(f"config field '{name}' is empty; expected a folder, a file or an s3:// URI")
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise LCRError(f"config field '{f.name}' = {value!r}: expected a finite number")
    cfg.validate()
    check_hooks(cfg)


def check_hooks(cfg: LCRConfig) -> None:
    """The `extra` hooks that steer training (see components/pretrain.py) are read as step counts."""
    for name in HOOK_STEPS:
        value = cfg.extra.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise LCRError(f"config field 'extra.{name}' = {value!r}: expected an integer >= 1")
    if "fail_at_step" in cfg.extra and not cfg.extra.get("fail_marker"):
        raise LCRError("config field 'extra.fail_at_step' needs 'extra.fail_marker': a file path that "
                       "makes the failure happen once")


def check_inputs(cfg: LCRConfig) -> None:
    """Everything the run reads or writes: shards, initial weights, storage, a checkpoint to resume."""
    check_shards(cfg)
    check_weights(cfg)
    check_storage(cfg)
    check_resume(cfg)


def check_shards(cfg: LCRConfig) -> None:
    """The train split has a manifest and at least one global batch per epoch (drop_last would leave
    every rank without a batch)."""
    split = storage.join(cfg.shards, "train")
    manifest = data.read_manifest(split)
    if data.steps_per_epoch(manifest, cfg) == 0:
        raise data.ShardError(f"{split}: {manifest.total} samples, fewer than one global batch of "
                              f"{cfg.batch_size}; expected more samples or a smaller batch_size")
    if not cfg.is_byol:
        warn_queue_exceeds_dataset(cfg, manifest.total)


def check_weights(cfg: LCRConfig) -> None:
    """The initial weights load into the backbone; weights in object storage are fetched to a
    temporary file for it (every worker fetches its own copy later). With `init_from` they are not
    loaded, so not checked either."""
    weights = cfg.backbone_weights
    if weights is None or cfg.init_from is not None:
        return
    if not storage.is_s3(weights):
        load_weights(cfg.backbone, weights, weights)
        return
    with tempfile.TemporaryDirectory(prefix="lcr-preflight-") as tmp:
        local = storage.download(weights, Path(tmp) / storage.name_of(weights))
        load_weights(cfg.backbone, str(local), weights)


def load_weights(backbone: str, path: str, name: str) -> None:
    """`build_backbone`'s one-line errors naming `name` (the URI of a downloaded copy). A tensor of
    another shape makes torch raise a RuntimeError of one line per tensor; the first is named."""
    try:
        build_backbone(backbone, path)
    except LCRError as err:
        raise LCRError(str(err).replace(path, name)) from None
    except RuntimeError as err:
        mismatches = SIZE_MISMATCH.findall(str(err))
        if not mismatches:
            raise
        layer, saved, wanted = mismatches[0]
        raise LCRError(f"backbone weights {name}: do not fit backbone {backbone!r} (another shape for "
                       f"{len(mismatches)} tensor(s), e.g. {layer}: {saved} in the file, {wanted} in the model)"
                       ) from None


def check_storage(cfg: LCRConfig) -> None:
    """A local `storage_path` can be created and written (a probe file is written and removed). For
    S3 the bucket must exist, which `components.pretrain.checkpoint_storage` checks."""
    if storage.is_s3(cfg.storage_path):
        return
    folder = Path(cfg.storage_path)
    probe = folder / f".lcr-write-probe-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise LCRError(f"storage_path {folder}: cannot be written ({err.strerror or type(err).__name__}); "
                       "expected a folder this user can create and write") from None


def check_resume(cfg: LCRConfig) -> None:
    """A run folder that holds checkpoints is resumed: its newest intact checkpoint must have been
    written with the same model (`checkpoint.RESUME_FIXED_FIELDS`). Damaged ones are skipped here
    without a word; the workers warn about them when they skip them too."""
    run = storage.join(cfg.storage_path, cfg.run_name)
    names = run_checkpoints(cfg)
    if not names:
        return
    found = newest_readable(names, lambda name: tracking.read_checkpoint(storage.join(run, name))[1],
                            lambda message: None)
    if found is None:
        raise LCRError(f"run {cfg.run_name!r}: no checkpoint in {run} reads back whole; expected at least one "
                       "intact checkpoint (or a new run_name to start afresh)")
    check_resumable(found[1]["config"], cfg.to_dict(), storage.join(run, found[0]))


def run_checkpoints(cfg: LCRConfig) -> list[str]:
    """The checkpoint folders of the run, newest first; none for a new run."""
    try:
        return checkpoint_dirs(storage.list_dirs(storage.join(cfg.storage_path, cfg.run_name)))
    except storage.NotFound:
        return []


def warm_start_source(cfg: LCRConfig) -> warm_start.WarmStart | None:
    """`init_from`'s weights for a new run, read once and checked against the run's architecture;
    None without init_from, or when the run resumes from its own checkpoint (which wins, with a notice)."""
    if cfg.init_from is None:
        return None
    if run_checkpoints(cfg):
        print(f"init_from {cfg.init_from} ignored: run {cfg.run_name} resumes from its own checkpoint", flush=True)
        return None
    source = warm_start.read_source(cfg.init_from)
    warm_start.check_compatible(source, cfg)
    return source


# ---------------------------------------------------------------------------------------------
# Once connected

def check_resources(cfg: LCRConfig) -> None:
    """The workers fit the cluster's nodes, each on one node. Ray would otherwise wait for them for
    ever (and Ctrl-C would not end that wait). An autoscaler that may add nodes is not reliably
    visible from a driver in Ray 2.60, so `LCR_RESOURCE_WAIT_S` (default 0) says how long to wait
    for nodes to join before failing."""
    need = worker_resources(cfg)
    deadline = time.monotonic() + resource_wait_s()
    while (fit := workers_that_fit(ray.nodes(), need)) < cfg.num_workers and time.monotonic() < deadline:
        time.sleep(min(RESOURCE_POLL_S, max(deadline - time.monotonic(), 0.0)))
    if fit < cfg.num_workers:
        raise LCRError(f"num_workers={cfg.num_workers} with {format_resources(need)} each do not fit the Ray "
                       f"cluster ({describe_cluster(ray.nodes())}): {fit} fit; expected fewer workers or "
                       f"cpus_per_worker, or more nodes ({RESOURCE_WAIT_VARIABLE}=SECONDS waits for an autoscaler)")


def worker_resources(cfg: LCRConfig) -> dict[str, float]:
    """One worker's Ray resources, as `ScalingConfig` asks for them (one GPU each with use_gpu)."""
    return {"CPU": cfg.cpus_per_worker, **({"GPU": 1.0} if cfg.use_gpu else {})}


def resource_wait_s() -> float:
    text = os.environ.get(RESOURCE_WAIT_VARIABLE, "0")
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < math.inf:
        raise LCRError(f"{RESOURCE_WAIT_VARIABLE}={text!r}: expected a number of seconds >= 0")
    return seconds


def workers_that_fit(nodes: list[dict], need: dict[str, float]) -> int:
    """How many workers of `need` the live nodes hold in all (whatever else runs on them now)."""
    return sum(min(int(node["Resources"].get(name, 0.0) // amount) for name, amount in need.items())
               for node in nodes if node.get("Alive"))


def format_resources(resources: dict[str, float]) -> str:
    return " + ".join(f"{amount:g} {name}" for name, amount in resources.items())


def describe_cluster(nodes: list[dict]) -> str:
    alive = [node["Resources"] for node in nodes if node.get("Alive")]
    total = {name: sum(node.get(name, 0.0) for node in alive) for name in ("CPU", "GPU")}
    return f"{len(alive)} node{'s' * (len(alive) != 1)}, {format_resources(total)} in all"
