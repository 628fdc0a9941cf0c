"""Wall time of a 2 x 2 `lcr tune` sweep against the same 4 trials run one after the other with
`lcr pretrain`, on the same machine in one run (issue 11's goal: <= 0.75x with 2 trials at once).

    .venv/bin/python benchmarks/tune.py                 # tiny CNN, synthetic set, 3 epochs per trial
    .venv/bin/python benchmarks/tune.py --epochs 6

Both arms train the same configurations on the same hold-out split (the sweep's ASHA may stop a
trial early: that is part of what is measured). MLflow goes to a SQLite store in a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from components.pretrain import pretrain  # noqa: E402
from components.shards import build_shards  # noqa: E402
from components.tune import ensure_holdout, sweep  # noqa: E402
from lcr_core.config import load_config  # noqa: E402

SPACE = {"num_projections": {"grid": [8, 32]}, "kl_weight": {"grid": [0.1, 1.0]}}
BASE = ["backbone=tiny", "image_size=64", "eval_resize=73", "batch_size=32", "num_workers=1", "queue_size=256",
        "embed_dim=128", "projector=mocov2", "projector_hidden=512", "momentum=0.99", "lr=0.12",
        "loader_workers=0", "cpus_per_worker=1", "eval_every_epochs=1", "max_failures=0"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    import ray

    with tempfile.TemporaryDirectory(prefix="lcr-tune-bench-") as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        build_shards("synthetic", f"{tmp}/shards", options={"image_size": 73}, progress=False)
        cfg = load_config(None, [*BASE, f"epochs={args.epochs}", f"shards={tmp}/shards",
                                 f"storage_path={tmp}/runs"])
        ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False)
        holdout = ensure_holdout(cfg.shards, f"{tmp}/runs/seq/holdout", 0.2, cfg.seed)
        started = time.perf_counter()
        for k in SPACE["num_projections"]["grid"]:
            for nu in SPACE["kl_weight"]["grid"]:
                pretrain(replace(cfg, run_name=f"seq-k{k}-nu{nu}", shards=holdout, num_projections=k, kl_weight=nu))
        sequential = time.perf_counter() - started
        started = time.perf_counter()
        result = sweep(cfg, SPACE, "bench")
        swept = time.perf_counter() - started
        ray.shutdown()
    stopped = sum(r["epoch"] is not None and r["epoch"] < args.epochs for r in result.table)
    print(f"4 sequential lcr pretrain runs: {sequential:.0f} s; 2 x 2 lcr tune sweep: {swept:.0f} s "
          f"({stopped} trial(s) stopped early by ASHA); ratio {swept / sequential:.2f} (goal <= 0.75)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
