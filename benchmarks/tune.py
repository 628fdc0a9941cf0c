"""Wall time of a 2 x 2 `lcr tune` sweep against the same 4 trials run one after the other with
`lcr pretrain`, on the same machine in one run (issue 11's goal: <= 0.75x with 2 trials at once).

    .venv/bin/python benchmarks/tune.py                 # tiny CNN, synthetic set, 3 epochs per trial
    .venv/bin/python benchmarks/tune.py --epochs 6 --out /tmp/tune.json

Both arms train the same configurations on the same hold-out split, built once beforehand where the
sweep looks for it, and validate it every epoch; the sweep's ASHA may stop a trial early: that is
part of what is measured. Every trial is 1 worker on 1 CPU (the issue's setting for 2 cores), so the
sequential arm keeps one core busy and the sweep both: about 0.5 is the best to expect before ASHA's
savings. Both arms run on one local Ray instance started beforehand (its start is timed on its own).
MLflow goes to a SQLite store in a temporary folder. The load average before and after each arm is
recorded: on a shared machine other processes' CPU use slows both arms, the sweep's second core most.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from components.pretrain import pretrain  # noqa: E402
from components.shards import build_shards  # noqa: E402
from components.tune import OBJECTIVE, ensure_holdout, sweep  # noqa: E402
from lcr_core.config import LCRConfig, load_config  # noqa: E402

SPACE = {"num_projections": {"grid": [8, 32]}, "kl_weight": {"grid": [0.1, 1.0]}}
BASE = ["backbone=tiny", "image_size=64", "eval_resize=73", "batch_size=32", "num_workers=1", "queue_size=256",
        "embed_dim=128", "projector=mocov2", "projector_hidden=512", "momentum=0.99", "lr=0.12",
        "loader_workers=0", "cpus_per_worker=1", "eval_every_epochs=1", "max_failures=0"]
SWEEP_NAME = "bench"
GOAL = 0.75


def timed(function, *args, **kwargs) -> tuple[float, object]:
    started = time.perf_counter()
    value = function(*args, **kwargs)
    return time.perf_counter() - started, value


def sequential_arm(cfg: LCRConfig, holdout: str) -> list[dict]:
    """Every point of the grid as its own `lcr pretrain` run, one after the other."""
    runs = []
    for k in SPACE["num_projections"]["grid"]:
        for nu in SPACE["kl_weight"]["grid"]:
            trial = replace(cfg, run_name=f"seq-k{k}-nu{nu}", shards=holdout, num_projections=k, kl_weight=nu)
            seconds, result = timed(pretrain, trial)
            runs.append({"num_projections": k, "kl_weight": nu, "seconds": round(seconds, 1),
                         OBJECTIVE: result.metrics.get(OBJECTIVE), "epochs": result.metrics.get("epoch")})
    return runs


def sweep_arm(cfg: LCRConfig) -> tuple[float, list[dict]]:
    seconds, result = timed(sweep, cfg, SPACE, SWEEP_NAME)
    rows = [{name: row[name] for name in (*SPACE, OBJECTIVE, "epoch", "status")} for row in result.table]
    return seconds, rows


def measure(epochs: int, tmp: str) -> dict:
    import ray

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
    build_shards("synthetic", f"{tmp}/shards", options={"image_size": 73}, progress=False)
    cfg = load_config(None, [*BASE, f"epochs={epochs}", f"shards={tmp}/shards", f"storage_path={tmp}/runs"])
    holdout = ensure_holdout(cfg.shards, f"{tmp}/runs/{SWEEP_NAME}/holdout", 0.2, cfg.seed)
    ray_start, _ = timed(ray.init, num_cpus=2, include_dashboard=True, log_to_driver=False)
    try:
        load = [os.getloadavg()[0]]
        runs = sequential_arm(cfg, holdout)
        load.append(os.getloadavg()[0])
        swept, trials = sweep_arm(cfg)
        load.append(os.getloadavg()[0])
    finally:
        ray.shutdown()
    sequential = sum(run["seconds"] for run in runs)
    return {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                        "ray": ray.__version__},
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "epochs": epochs, "space": SPACE,
            "config": BASE, "ray_start_s": round(ray_start, 1),
            "load_avg_1min": {"before": load[0], "after_sequential": load[1], "after_sweep": load[2]},
            "sequential": {"seconds": round(sequential, 1), "runs": runs},
            "sweep": {"seconds": round(swept, 1), "trials": trials},
            "ratio": round(swept / sequential, 3), "goal": GOAL}


def table(report: dict) -> str:
    epochs = report["epochs"]
    lines = [f"{'arm':<34}{'wall s':>8}  trials (K, nu: epochs run, val rank-1 %)"]
    runs = "; ".join(f"{r['num_projections']},{r['kl_weight']}: {r['seconds']:.0f} s"
                     for r in report["sequential"]["runs"])
    lines.append(f"{'4 x lcr pretrain, one at a time':<34}{report['sequential']['seconds']:>8.0f}  {runs}")
    trials = "; ".join(f"{t['num_projections']},{t['kl_weight']}: {t['epoch']}/{epochs} ep, "
                       f"{100 * (t[OBJECTIVE] or 0):.1f}" for t in report["sweep"]["trials"])
    lines.append(f"{'lcr tune 2 x 2 (2 at once, ASHA)':<34}{report['sweep']['seconds']:>8.0f}  {trials}")
    verdict = "meets" if report["ratio"] <= GOAL else "misses"
    load = report["load_avg_1min"]
    lines.append(f"ratio sweep / sequential: {report['ratio']:.2f} ({verdict} the goal <= {GOAL}); "
                 f"{report['machine']['cpus']} CPUs, 1-min load {load['before']:.1f} / {load['after_sequential']:.1f}"
                 f" / {load['after_sweep']:.1f} (before / after sequential / after sweep)")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "tune-benchmark.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lcr-tune-bench-") as tmp:
        report = measure(args.epochs, tmp)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(table(report))
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
