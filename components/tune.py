"""`lcr tune`: Ray Tune over LCR's knobs, K and ν by default (the paper's figure F1 and table G1).

    lcr tune --config demo [field=value …] [--space SPACE.yaml] [--num-samples N] [--max-concurrent N]
             [--name NAME] [--register MODEL_NAME]

Every trial is one `lcr pretrain` run (the same TorchTrainer, workers, checkpoints and fault
tolerance), started from a Tune function trainable. The objective is leave-one-out retrieval rank-1
on a *validation* split held out from the training shards (class-stratified, seeded; never the test
split): the training split is divided once into `<storage_path>/<name>/holdout/{train,test}`, which
the trials train and validate on. Trials report it every `eval_every_epochs` epochs so that ASHA can
stop bad ones early; mAP goes beside it.

The space file maps LCRConfig fields to a grid (`{grid: [4, 8]}`) or a distribution (`{loguniform:
[0.001, 1]}`, `uniform`, `choice`, `randint`). The default is the paper's grid, K ∈ {4, 8, 16, 32, 64}
× ν ∈ {1, 0.1, 0.01, 0.001}.

MLflow: one parent run for the sweep and one child run per trial (its pretraining run). The parent
gets the best config, the best trial's run id and checkpoint, the results as CSV and a K × ν heat map
of the objective. A failed trial is recorded as failed and the sweep goes on; running the same
`--name` again continues an interrupted sweep (Ctrl-C marks the parent run KILLED, a killed driver leaves
it RUNNING): a trial cut short resumes from its last checkpoint, in its MLflow run.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from components import storage, tracking
from components.converters import Sample, Source
from components.data import plan_pieces, read_manifest, read_pieces
from components.shards import build_shards
from lcr_core.config import LCRConfig, config_from_dict, load_config
from lcr_core.errors import LCRError
from lcr_core.probe import stratified_subset

DEFAULT_SPACE = {"num_projections": {"grid": [4, 8, 16, 32, 64]}, "kl_weight": {"grid": [1.0, 0.1, 0.01, 0.001]}}
DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
OBJECTIVE = "val_rank1"
SWEEP_TAG = "lcr.sweep"
PARENT_TAG = "mlflow.parentRunId"


class TuneError(LCRError):
    """A bad search space or sweep setting."""


# ---------------------------------------------------------------------------------------------
# The search space

def read_space(path: str | Path | None) -> dict[str, dict[str, list]]:
    """{field: {kind: values}} from a YAML file (or the default), each field and kind checked."""
    if path is None:
        return DEFAULT_SPACE
    try:
        space = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise TuneError(f"--space {path}: cannot be read ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise TuneError(f"--space {path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(space, dict) or not space:
        raise TuneError(f"--space {path}: expected a mapping of config field: {{grid: [...]}}")
    known = set(LCRConfig.__dataclass_fields__)
    for name, spec in space.items():
        if name not in known:
            raise TuneError(f"--space {path}: unknown config field {name!r}")
        if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS
                and isinstance(next(iter(spec.values())), list)):
            raise TuneError(f"--space {path}: field {name!r} = {spec!r}; expected one of "
                            f"{', '.join(f'{{{kind}: [...]}}' for kind in DISTRIBUTIONS)}")
    return space


def tune_space(space: dict[str, dict[str, list]]) -> dict[str, Any]:
    from ray import tune

    def sampler(kind: str, values: list):
        if kind == "grid":
            return tune.grid_search(values)
        if kind == "choice":
            return tune.choice(values)
        return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[kind](*values)

    return {name: sampler(*next(iter(spec.items()))) for name, spec in space.items()}


# ---------------------------------------------------------------------------------------------
# The validation split, held out from the training shards

def holdout_source(shards: str, fraction: float, seed: int) -> Source:
    """The training split of `shards` as a Source of two splits: `train` (what is left) and `test`
    (a class-stratified `fraction`, at least one image per class, chosen by `seed`)."""
    split_uri = storage.join(shards, "train")
    manifest = read_manifest(split_uri)
    pieces = plan_pieces(manifest.shard_uris(split_uri), [s.count for s in manifest.shards], 0, manifest.total)
    keys, labels = zip(*((sample["__key__"], int(sample["cls"])) for sample in read_pieces(pieces)))
    held = {keys[i] for i in stratified_subset(np.array(labels), fraction, seed)}

    def samples(keep_held: bool) -> Iterator[Sample]:
        for sample in read_pieces(pieces):
            if (sample["__key__"] in held) == keep_held:
                meta = json.loads(sample.get("json", b"{}"))
                yield Sample(sample["__key__"], sample["jpg"], int(sample["cls"]), meta)

    return Source(dataset=manifest.dataset, class_names=manifest.class_names,
                  splits={"train": lambda: samples(False), "test": lambda: samples(True)},
                  sizes={"train": manifest.total - len(held), "test": len(held)},
                  options={"holdout_of": manifest.to_json(), "fraction": fraction, "seed": seed})


def ensure_holdout(shards: str, out: str, fraction: float, seed: int) -> str:
    """`out` holding the hold-out split of `shards` (built once; rebuilt when the shards change)."""
    wanted = {"holdout_of": read_manifest(storage.join(shards, "train")).to_json(), "fraction": fraction,
              "seed": seed}
    try:
        if all(read_manifest(storage.join(out, split)).options == wanted for split in ("train", "test")):
            return out
    except LCRError:
        pass
    build_shards(holdout_source(shards, fraction, seed), out, overwrite=True)
    return out


# ---------------------------------------------------------------------------------------------
# One trial

@dataclass(frozen=True)
class Sweep:
    name: str
    base: dict[str, Any]  # the config every trial starts from, as a dict
    holdout: str  # shards root of the hold-out split
    tracking_uri: str
    parent_run_id: str


def run_trial(params: dict[str, Any], sweep: Sweep) -> None:
    """One pretraining run with the trial's values; its results reach Tune through Ray Train."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from components.pretrain import pretrain

    trial = ray.tune.get_context().get_trial_id()
    cfg = config_from_dict(sweep.base | params | {"run_name": f"{sweep.name}-{trial}", "shards": sweep.holdout},
                           f"trial {trial}")
    os.environ["MLFLOW_TRACKING_URI"] = sweep.tracking_uri
    reopen_trial_run(sweep, trial)
    pretrain(cfg, tags={PARENT_TAG: sweep.parent_run_id, SWEEP_TAG: sweep.name, "lcr.trial": trial},
             callbacks=[TuneReportCallback()])


def reopen_trial_run(sweep: Sweep, trial: str) -> None:
    """A trial that an interrupted sweep left unfinished starts again when the sweep is continued, and
    its Ray Train run resumes from its checkpoint; so that it keeps one MLflow run, the run an earlier
    driver created for it is set RUNNING again, and `pretrain` continues a RUNNING run of its run_name."""
    import mlflow

    client = mlflow.MlflowClient(sweep.tracking_uri)
    experiment = client.get_run(sweep.parent_run_id).info.experiment_id
    for run in client.search_runs([experiment], f"tags.`{PARENT_TAG}` = '{sweep.parent_run_id}' "
                                                f"and tags.`lcr.trial` = '{trial}'"):
        if run.info.status != "RUNNING":
            client.update_run(run.info.run_id, status="RUNNING")


# ---------------------------------------------------------------------------------------------
# The sweep

@dataclass
class SweepResult:
    parent_run_id: str
    best_config: dict[str, Any]
    best: dict[str, Any]  # the best trial's last reported metrics, its checkpoint and MLflow run
    table: list[dict[str, Any]]  # one row per trial


def sweep(cfg: LCRConfig, space: dict, name: str, num_samples: int = 1, max_concurrent: int | None = None,
          val_fraction: float = 0.2) -> SweepResult:
    import mlflow
    import ray
    from ray import tune

    from components.pretrain import checkpoint_storage, connect_ray

    if not 0 < val_fraction < 1:
        raise TuneError(f"--val-fraction {val_fraction}: expected a number in (0, 1)")
    if cfg.eval_every_epochs < 1:
        cfg = replace(cfg, eval_every_epochs=1)
    storage_path, filesystem = checkpoint_storage(cfg.storage_path)
    holdout = ensure_holdout(cfg.shards, storage.join(cfg.storage_path, name, "holdout"), val_fraction, cfg.seed)
    uri = tracking.tracking_uri()
    parent = parent_run(uri, cfg, name, space)
    connect_ray()
    per_trial = cfg.num_workers * cfg.cpus_per_worker
    fits = max(1, int(ray.cluster_resources().get("CPU", 1) // per_trial))
    concurrent = min(max_concurrent or fits, fits)
    trainable = tune.with_parameters(run_trial, sweep=Sweep(name, cfg.to_dict(), holdout, uri, parent))
    # The trial's workers ask for their own CPUs. Its driver holds a token of memory instead of a CPU share:
    # 0.01 CPU a trial left 2 x 1.01 CPUs for 2 trials on 2 cores, and the second trial's worker waited.
    trainable = tune.with_resources(trainable, {"cpu": 0, "memory": 2**20})
    path = f"{storage_path}/{name}/tune"
    if tune.Tuner.can_restore(path, storage_filesystem=filesystem):
        tuner = tune.Tuner.restore(path, trainable, resume_errored=False, restart_errored=False,
                                   storage_filesystem=filesystem)
    else:
        scheduler = FinishingASHA(time_attr="epoch", max_t=cfg.epochs, grace_period=cfg.eval_every_epochs,
                                  reduction_factor=2, stop_last_trials=False)
        tuner = tune.Tuner(trainable, param_space=tune_space(space),
                           tune_config=tune.TuneConfig(metric=OBJECTIVE, mode="max", scheduler=scheduler,
                                                       num_samples=num_samples, max_concurrent_trials=concurrent),
                           run_config=tune.RunConfig(name="tune", storage_path=f"{storage_path}/{name}",
                                                     storage_filesystem=filesystem))
    # Tune's own Ctrl-C handler stops the trials and returns from `fit` as if the sweep had ended (it
    # would be summarised as done); without it, Ctrl-C raises here and the trials end with the driver.
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    try:
        grid = tuner.fit()
    except KeyboardInterrupt:
        mlflow.MlflowClient(uri).set_terminated(parent, "KILLED")
        print(f"sweep {name!r} interrupted: `lcr tune` with --name {name} continues it", file=sys.stderr, flush=True)
        raise
    return summarise(uri, parent, grid, space)


class FinishingASHA(ASHAScheduler):
    """ASHA that never stops a trial at its last epoch. ASHA puts a rung at `max_t` when it is
    `grace_period` times a power of the reduction factor (2 epochs: rungs at 1 and 2), and
    `stop_last_trials=False` does not keep it from cutting a trial there. Such a stop saves no
    training, only the model logging that follows the last report, and it races with it: the trial's
    MLflow run ended KILLED or FAILED instead of FINISHED, without a model, depending on which won."""

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if result.get(self._time_attr, 0) >= self._max_t:
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)


def parent_run(uri: str, cfg: LCRConfig, name: str, space: dict) -> str:
    """The sweep's MLflow run: the one a previous, interrupted `lcr tune --name NAME` created, or a new one."""
    import mlflow

    experiment = tracking.prepare_experiment(uri, cfg.mlflow_experiment)
    client = mlflow.MlflowClient(uri)
    found = client.search_runs([experiment], f"tags.`{SWEEP_TAG}` = '{name}' and tags.`lcr.role` = 'sweep'",
                               max_results=1)
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")  # ended KILLED or FINISHED by its last driver
        return found[0].info.run_id
    run_id = tracking.start_run(uri, replace(cfg, run_name=name), {SWEEP_TAG: name, "lcr.role": "sweep"})
    logger = tracking.MetricLogger(uri, run_id)
    logger.log_params(tracking.config_params(cfg.to_dict()) | {"tune.space": json.dumps(space)})
    return run_id


def trial_rows(grid, space: dict) -> list[dict[str, Any]]:
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        row = {"trial": metrics.get("trial_id") or (result.path or "").rstrip("/").rsplit("_", 1)[0],
               "status": "failed" if result.error else "done"}
        row |= {name: (result.config or {}).get(name) for name in space}
        row |= {key: metrics.get(key) for key in (OBJECTIVE, "val_mAP", "epoch", "checkpoint_path")}
        rows.append(row)
    return sorted(rows, key=lambda r: -(r[OBJECTIVE] if r[OBJECTIVE] is not None else -math.inf))


def summarise(uri: str, parent: str, grid, space: dict) -> SweepResult:
    """The parent run gets the ranked table (CSV), the heat map, the best config and checkpoint."""
    import mlflow

    rows = trial_rows(grid, space)
    done = [r for r in rows if r[OBJECTIVE] is not None]
    if not done:
        tracking.end_run(uri, parent, succeeded=False)
        raise TuneError(f"no trial reported {OBJECTIVE}: {len(rows)} trial(s), "
                        f"{sum(r['status'] == 'failed' for r in rows)} failed (see the MLflow child runs)")
    best = done[0]
    client = mlflow.MlflowClient(uri)
    children = client.search_runs([client.get_run(parent).info.experiment_id], f"tags.`{PARENT_TAG}` = '{parent}'")
    stopped = {r["trial"] for r in rows if r["status"] == "done"}
    for child in children:  # a trial the scheduler stopped ended mid-run (FAILED or RUNNING): KILLED says why
        if child.data.tags.get("lcr.trial") in stopped and child.info.status in ("RUNNING", "FAILED"):
            client.set_terminated(child.info.run_id, "KILLED")
    best_run = next((r.info.run_id for r in children if r.data.tags.get("lcr.trial") == best["trial"]), "")
    best |= {"mlflow_run_id": best_run}
    logger = tracking.MetricLogger(uri, parent)
    logger.log({f"best/{OBJECTIVE}": best[OBJECTIVE], "best/val_mAP": best["val_mAP"] or 0.0,
                "trials": len(rows), "trials_failed": sum(r["status"] == "failed" for r in rows)}, step=0)
    # tags, not params: a continued sweep may find a better trial, and MLflow params never change
    best_tags = {f"lcr.best.{name}": str(best[name]) for name in space}
    for tag, value in best_tags.items() | {("lcr.best_run_id", best_run),
                                           ("lcr.best_checkpoint", best["checkpoint_path"] or "")}:
        logger.set_tag(tag, value)
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp, "trials.csv")
        with table.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        logger.log_artifact(table, "tune")
        if {"num_projections", "kl_weight"} <= set(space):
            heat = Path(tmp, "heatmap.png")
            heat_map(done, heat)
            logger.log_artifact(heat, "tune")
    logger.flush()
    tracking.end_run(uri, parent, succeeded=True)
    return SweepResult(parent, {name: best[name] for name in space}, best, rows)


def heat_map(rows: list[dict[str, Any]], path: Path) -> None:
    """K (rows) x ν (columns) of the objective, the value written in each cell (the best over samples)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted({r["num_projections"] for r in rows})
    nus = sorted({r["kl_weight"] for r in rows})
    values = np.full((len(ks), len(nus)), np.nan)
    for r in rows:
        i, j = ks.index(r["num_projections"]), nus.index(r["kl_weight"])
        values[i, j] = np.nanmax([values[i, j], 100 * r[OBJECTIVE]])
    fig, ax = plt.subplots(figsize=(1.2 * len(nus) + 2.5, 0.8 * len(ks) + 1.8))
    image = ax.imshow(values, cmap="viridis", aspect="auto")
    for i in range(len(ks)):
        for j in range(len(nus)):
            text = "–" if np.isnan(values[i, j]) else f"{values[i, j]:.1f}"
            ax.text(j, i, text, ha="center", va="center", color="white")
    ax.set_xticks(range(len(nus)), [f"{nu:g}" for nu in nus])
    ax.set_yticks(range(len(ks)), [str(k) for k in ks])
    ax.set_xlabel("ν (kl_weight)")
    ax.set_ylabel("K (num_projections)")
    ax.set_title(f"validation rank-1 (%), {OBJECTIVE}")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(rows: list[dict[str, Any]], space: dict) -> str:
    names = list(space)
    lines = ["rank  " + "".join(f"{n:>17}" for n in names) + f"{'val rank-1':>12}{'val mAP':>10}{'epochs':>8}  status"]
    for rank, r in enumerate(rows, start=1):
        cells = "".join(f"{r[n]!s:>17}" for n in names)
        score = "–" if r[OBJECTIVE] is None else f"{100 * r[OBJECTIVE]:.2f}"
        m_ap = "–" if r["val_mAP"] is None else f"{100 * r['val_mAP']:.2f}"
        lines.append(f"{rank:>4}  {cells}{score:>12}{m_ap:>10}{r['epoch']!s:>8}  {r['status']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a YAML file or the name of a shipped config (lcr_core/configs)")
    parser.add_argument("overrides", nargs="*", metavar="FIELD=VALUE", help="config overrides for every trial")
    parser.add_argument("--space", help="YAML: field: {grid: [...]} or {loguniform: [lo, hi]} … "
                                        "(default: K in 4..64 x nu in 1..0.001)")
    parser.add_argument("--num-samples", type=int, default=1, help="samples of the space (grids: repeats)")
    parser.add_argument("--max-concurrent", type=int, help="trials at once (default: as many as the cluster holds)")
    parser.add_argument("--name", default="sweep", help="the sweep's name; the same name continues it")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="share of the training split held out")
    parser.add_argument("--register", metavar="MODEL_NAME", help="register and gate the best trial's model")


def run(args: argparse.Namespace) -> int:
    if args.num_samples < 1:
        raise TuneError(f"--num-samples {args.num_samples}: expected an integer >= 1")
    if not args.name or "/" in args.name:
        raise TuneError(f"--name {args.name!r}: expected a non-empty name without '/'")
    cfg = load_config(args.config, args.overrides)
    space = read_space(args.space)
    result = sweep(cfg, space, args.name, args.num_samples, args.max_concurrent, args.val_fraction)
    print(format_table(result.table, space))
    print(f"best: {result.best_config} (validation rank-1 {100 * result.best[OBJECTIVE]:.2f} %)")
    print(f"MLflow: sweep run {result.parent_run_id}, best trial run {result.best['mlflow_run_id']}")
    if args.register:
        from components.register import register

        registration = register(result.best["checkpoint_path"], args.register, cfg.shards)
        print(f"registered: {registration}")
    return 0
