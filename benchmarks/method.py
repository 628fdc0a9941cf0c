"""Does LCR's attention find the object, and does it pay? The method benchmark of issue 9.

    .venv/bin/python benchmarks/method.py                                  # report family, 3 seeds (~25 min)
    .venv/bin/python benchmarks/method.py --family bird --seeds 0 --runs moco lcr   # the tuning family
    .venv/bin/python benchmarks/method.py --set epochs=10 --out results.json

From the ImageNet start (EfficientNet-Lite0, `backbone_weights: imagenet`) at 224 px, so that the
feature map is 7 x 7 as in the paper's ResNet-50. The first `freeze_stages` stages stay frozen, so
their output is the same for every run: it is computed once per augmented view (a pool of `--views`
MoCo v2 aug-plus views per training image and seed) and the trunk starts from it
(`StagedTrunk.start_stage`). Every run of a seed trains on the same view pool.

For each run: leave-one-out retrieval (rank-1, mAP) on the test split with attention and with GAP
pooling of the same weights, a linear probe's top-1 with 20 % of the training labels, how much of
the GradCAM target's and of A''s mass lies on the object (the generator's pixel mask, pooled to the
grid) against the object's area share, and how well the branch fits (the last epoch's KL relative
to a flat A). `random-gfb` pools LCR's trained trunk with an untrained branch: a gain that it
matches cannot be credited to LCR (DESIGN §1).

Tune on one family (`--family bird`), report on the other (the default, `beetle`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from components.converters import parse_options  # noqa: E402
from lcr_core.augment import eval_transform, train_transform  # noqa: E402
from lcr_core.config import LCRConfig, config_from_dict  # noqa: E402
from lcr_core.errors import LCRError  # noqa: E402
from lcr_core.losses import normalize_attention, normalize_gradcam  # noqa: E402
from lcr_core.metrics import chance_levels, retrieval_metrics  # noqa: E402
from lcr_core.model import GradCAMFittingBranch, LCRModel, build_model  # noqa: E402
from lcr_core.probe import stratified_subset, topk_accuracy, train_linear_probe  # noqa: E402
from lcr_core.synthetic import SyntheticSpec, generate  # noqa: E402
from lcr_core.train import build_optimizer, build_scheduler, train_step  # noqa: E402

BENCH_CONFIG = {
    "backbone": "efficientnet_lite0",
    "backbone_weights": "imagenet",
    "freeze_stages": 7,  # stem + the first six block groups: the last group and the head train
    "image_size": 224,  # a 7 x 7 map, as ResNet-50 at 224 px
    "eval_resize": 256,
    "epochs": 12,  # as the demo
    "batch_size": 32,
    "lr": 0.12,  # 0.03 at batch 32
    "lr_base_batch": 128,
    "momentum": 0.99,  # 0.999 leaves the key encoder near its init over ~450 steps
    "queue_size": 256,  # below the 480 training images
    "projector": "mocov2",
    "projector_hidden": 512,
    "embed_dim": 128,
    "warmup_epochs": 1,
}
# name -> LCRConfig fields on top of BENCH_CONFIG; runs with equal training share one model.
RUNS = {
    "moco": {"variant": "moco"},
    "lcr": {"variant": "lcr"},
    "lcr-multitask": {"variant": "lcr-multitask"},
    "lcr released-code": {"variant": "lcr", "fitting_preset": "released-code"},
    "lcr-dualpool": {"variant": "lcr-dualpool"},
    "lcr normalize=none": {"variant": "lcr", "gradcam_normalize": "none"},
    "lcr nu=1": {"variant": "lcr", "kl_weight": 1.0},
    "lcr gfb-lr x10": {"variant": "lcr", "gfb_lr_scale": 10.0},
    "lcr stop-gradient": {"variant": "lcr", "gfb_stop_gradient": True},
    "lcr nu=0.1": {"variant": "lcr", "kl_weight": 0.1},
}
SPEC = {"num_classes": 12, "train_per_class": 40, "test_per_class": 20, "image_size": 256}


# ---------------------------------------------------------------------------------------------
# Data: images rendered once, the frozen prefix's features cached.

@dataclasses.dataclass
class EvalSplit:
    features: torch.Tensor  # frozen-prefix features of the center crops
    labels: np.ndarray
    object_share: torch.Tensor | None  # N x h x w: share of each grid cell covered by the object


def prefix_features(trunk, images: list, transform, stop: int, batch: int = 64) -> torch.Tensor:
    chunks = []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            x = torch.stack([transform(image) for image in images[start:start + batch]])
            chunks.append(trunk.forward_stages(x, 0, stop))
    return torch.cat(chunks)


def eval_split(trunk, spec: SyntheticSpec, split: str, cfg: LCRConfig, grid: int) -> EvalSplit:
    samples = list(generate(spec, split, with_mask=True))
    features = prefix_features(trunk, [s.image for s in samples], eval_transform(cfg.image_size, cfg.eval_resize),
                               cfg.freeze_stages)
    # the mask through the same resize + center crop, then the share of each grid cell it covers
    to_mask = eval_transform(cfg.image_size, cfg.eval_resize).transforms[:2]
    masks = []
    for sample in samples:
        mask = np.asarray(to_mask[1](to_mask[0](_mask_image(sample.mask))), dtype=np.float32) / 255.0
        masks.append(torch.from_numpy(mask))
    share = F.adaptive_avg_pool2d(torch.stack(masks)[:, None], grid)[:, 0]
    return EvalSplit(features, np.array([s.label for s in samples]), share)


def _mask_image(mask: np.ndarray):
    from PIL import Image

    return Image.fromarray(mask.astype(np.uint8) * 255, "L")


def view_pool(trunk, spec: SyntheticSpec, cfg: LCRConfig, views: int, seed: int) -> torch.Tensor:
    """N x V x C x h x w: the frozen prefix's features of V aug-plus views of every training image."""
    torch.manual_seed(seed)
    import random

    random.seed(seed)
    transform = train_transform(cfg.image_size)
    images = [s.image for s in generate(spec, "train")]
    pool = []
    with torch.no_grad():
        for image in tqdm(images, desc=f"view pool (seed {seed})", unit="image", leave=False):
            pool.append(trunk.forward_stages(torch.stack([transform(image) for _ in range(views)]), 0,
                                             cfg.freeze_stages))
    return torch.stack(pool)


# ---------------------------------------------------------------------------------------------
# One run.

def start_from_prefix(model: LCRModel, stage: int) -> LCRModel:
    for encoder in (model.encoder_q, model.encoder_k):
        encoder.backbone.start_stage = stage
    return model


def pretrain(cfg: LCRConfig, pool: torch.Tensor, desc: str) -> tuple[LCRModel, dict[str, float]]:
    """Train on pairs of distinct views from the pool; returns the model and its last epoch's means."""
    torch.manual_seed(cfg.seed)
    model = start_from_prefix(build_model(cfg), cfg.freeze_stages)
    optimizer = build_optimizer(model, cfg)
    steps = len(pool) // cfg.batch_size
    scheduler = build_scheduler(optimizer, cfg, steps)
    generator = torch.Generator().manual_seed(cfg.seed)
    last: dict[str, float] = {}
    with tqdm(total=cfg.epochs * steps, desc=desc, unit="batch", leave=False) as bar:
        for _ in range(cfg.epochs):
            model.train()
            order = torch.randperm(len(pool), generator=generator)
            sums: dict[str, float] = {}
            for step in range(steps):
                index = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
                first = torch.randint(pool.shape[1], (len(index),), generator=generator)
                second = (first + torch.randint(1, pool.shape[1], (len(index),), generator=generator)) % pool.shape[1]
                stats = train_step(model, (pool[index, first], pool[index, second]), optimizer, scheduler)
                sums = {k: sums.get(k, 0.0) + v for k, v in stats.items()}
                bar.set_postfix(cl=f"{stats['loss_cl']:.2f}", kl=f"{stats['loss_kl']:.3f}")
                bar.update()
            last = {k: v / steps for k, v in sums.items()}
    return model.eval(), last


@torch.no_grad()
def embed(model: LCRModel, features: torch.Tensor, pooling: str) -> torch.Tensor:
    return torch.cat([model.embed(chunk, pooling) for chunk in features.split(128)])


def mass_on_object(maps: torch.Tensor, share: torch.Tensor) -> float:
    """The share of the maps' mass (N x h x w, non-negative) on the object, averaged over images."""
    weights = maps.flatten(1)
    on = (weights * share.flatten(1)).sum(1) / weights.sum(1).clamp_min(1e-12)
    return float(on.mean())


def evaluate(model: LCRModel, cfg: LCRConfig, train: EvalSplit, test: EvalSplit) -> dict[str, float]:
    poolings = ["gap", "attention"] if model.encoder_q.gfb is not None else ["gap"]
    result: dict[str, float] = {}
    for pooling in poolings:
        test_emb = embed(model, test.features, pooling)
        metrics = retrieval_metrics(test_emb, test.labels)
        result |= {f"{pooling}/rank1": metrics["rank1"], f"{pooling}/mAP": metrics["mAP"]}
        subset = stratified_subset(train.labels, 0.2, seed=cfg.seed)
        train_emb = embed(model, train.features, pooling)
        num_classes = int(train.labels.max()) + 1
        probe = train_linear_probe(train_emb[subset], torch.as_tensor(train.labels[subset]), num_classes)
        with torch.no_grad():
            logits = probe(test_emb)
        result[f"{pooling}/probe20_top1"] = topk_accuracy(logits, torch.as_tensor(test.labels), (1,))["top1"]
    gradcam = torch.cat([model.gradcam(chunk, chunk) for chunk in test.features.split(64)])
    result["gradcam_on_object"] = mass_on_object(normalize_gradcam(gradcam, cfg.gradcam_normalize), test.object_share)
    if model.encoder_q.gfb is not None:
        with torch.no_grad():
            attention = torch.cat([model.attention_map(chunk)[1] for chunk in test.features.split(128)])
        result["attention_on_object"] = mass_on_object(normalize_attention(attention), test.object_share)
    return result


def random_gfb_control(model: LCRModel, cfg: LCRConfig, test: EvalSplit) -> dict[str, float]:
    """Attention pooling of the same trained trunk through an untrained branch."""
    trained = model.encoder_q.gfb
    if not isinstance(trained, GradCAMFittingBranch):
        return {}
    control = GradCAMFittingBranch(model.encoder_q.backbone.out_channels, cfg.gfb_projections,
                                   bn_relu=not isinstance(trained.bn_relu, torch.nn.Identity))
    model.encoder_q.gfb = control.eval()
    try:
        metrics = retrieval_metrics(embed(model, test.features, "attention"), test.labels)
        with torch.no_grad():
            attention = torch.cat([model.attention_map(chunk)[1] for chunk in test.features.split(128)])
        return {"random_gfb/rank1": metrics["rank1"], "random_gfb/mAP": metrics["mAP"],
                "random_gfb/attention_on_object": mass_on_object(normalize_attention(attention), test.object_share)}
    finally:
        model.encoder_q.gfb = trained


# ---------------------------------------------------------------------------------------------
# Reporting.

def training_key(cfg: LCRConfig) -> str:
    """Runs equal in everything that shapes training (lcr and lcr-multitask) share one model."""
    values = cfg.to_dict() | {"variant": "lcr" if cfg.variant == "lcr-multitask" else cfg.variant}
    return json.dumps(values, sort_keys=True, default=str)


def tested_pooling(cfg: LCRConfig) -> str:
    return cfg.test_pooling


def mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * spread:.1f}"


def markdown(results: dict[str, list[dict]], chance: dict[str, float], area: float, seeds: list[int]) -> str:
    lines = ["| run | test pooling | rank-1 | mAP | probe top-1 @20 % | rank-1 (GAP, same weights) | "
             "GradCAM on object | A' on object | KL fit ratio |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| chance / object area | | {100 * chance['rank1']:.1f} | {100 * chance['mAP']:.1f} | "
             f"{100 * chance['top1']:.1f} | | {100 * area:.1f} | {100 * area:.1f} | |"]
    def cell(runs: list[dict], key: str) -> str:
        values = [r[key] for r in runs if key in r]
        return mean_std(values) if values else "–"

    for name, runs in results.items():
        pooling = runs[0]["pooling"]

        # a ratio to a flat target's KL means nothing (the released code's raw G is flat: KL ~1e-7)
        fit = [r["kl_fit_ratio"] for r in runs if r.get("gradcam_kl_uniform", 0.0) > 1e-3]
        fit_cell = f"{statistics.mean(fit):.2f}" if fit else "flat target" if "kl_fit_ratio" in runs[0] else "–"
        lines.append(f"| {name} | {pooling} | {cell(runs, pooling + '/rank1')} | {cell(runs, pooling + '/mAP')} | "
                     f"{cell(runs, pooling + '/probe20_top1')} | {cell(runs, 'gap/rank1')} | "
                     f"{cell(runs, 'gradcam_on_object')} | "
                     f"{cell(runs, 'attention_on_object')} | "
                     f"{fit_cell} |")
        if any("random_gfb/rank1" in r for r in runs):
            lines.append(f"| {name}, random-gfb control | attention | {cell(runs, 'random_gfb/rank1')} | "
                         f"{cell(runs, 'random_gfb/mAP')} | | | | {cell(runs, 'random_gfb/attention_on_object')} | |")
    lines.append(f"\nmean ± std over seeds {seeds}; in %; 'on object' = share of the map's mass on the object's "
                 "pixels (the object's area share in the chance row)")
    return "\n".join(lines)


def plot(results: dict[str, list[dict]], chance: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, metric, title in ((axes[0], "rank1", "retrieval rank-1 (%)"), (axes[1], "on_object", "mass on object (%)")):
        for offset, (label, key) in enumerate((("test pooling", None), ("GAP", "gap"))):
            if metric == "on_object":
                key = ("attention_on_object", "gradcam_on_object")[offset]
                label = ("A'", "GradCAM target")[offset]
            means, errors = [], []
            for name in names:
                runs = results[name]
                field = key if metric == "on_object" else f"{key or runs[0]['pooling']}/rank1"
                values = [100 * r[field] for r in runs if field in r] or [0.0]
                means.append(statistics.mean(values))
                errors.append(statistics.stdev(values) if len(values) > 1 else 0.0)
            ax.bar(np.arange(len(names)) + 0.4 * offset - 0.2, means, 0.4, yerr=errors, label=label, capsize=3)
        if metric == "rank1":
            ax.axhline(100 * chance["rank1"], color="grey", linestyle="--", label="chance")
        else:
            ax.axhline(100 * chance["area"], color="grey", linestyle="--", label="object area share")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="beetle", help="synthetic object family to report on")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--views", type=int, default=6, help="cached aug-plus views per training image")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="LCRConfig field")
    parser.add_argument("--spec", action="append", default=[], metavar="FIELD=VALUE", help="SyntheticSpec field")
    parser.add_argument("--out", type=Path, default=Path("benchmark_runs/method"))
    args = parser.parse_args()
    try:
        overrides = parse_options(args.set)
        spec = SyntheticSpec.from_options(SPEC | {"family": args.family} | parse_options(args.spec))
        return benchmark(args, overrides, spec)
    except LCRError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def benchmark(args: argparse.Namespace, overrides: dict, spec: SyntheticSpec) -> int:
    torch.set_num_threads(torch.get_num_threads())
    base = config_from_dict(BENCH_CONFIG | overrides | {"variant": "moco"}, "benchmark settings")
    trunk = build_model(base).encoder_q.backbone.eval()  # the frozen prefix is the same for every run
    grid = trunk(torch.zeros(1, 3, base.image_size, base.image_size)).shape[-1]
    started = time.perf_counter()
    train, test = (eval_split(trunk, spec, split, base, grid) for split in ("train", "test"))
    levels = chance_levels(test.labels)
    chance = {"rank1": levels["chance_rank1"], "mAP": levels["chance_mAP"], "top1": 1 / spec.num_classes,
              "area": float(test.object_share.mean())}
    print(f"data: {spec}\nconfig: {BENCH_CONFIG | overrides}; feature map {grid} x {grid}")
    print(f"chance: rank-1 {100 * chance['rank1']:.1f} %, mAP {100 * chance['mAP']:.1f} %; object area "
          f"{100 * chance['area']:.1f} % of the crop ({time.perf_counter() - started:.0f} s to prepare)")
    results: dict[str, list[dict]] = {name: [] for name in args.runs}
    args.out.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        pool = view_pool(trunk, dataclasses.replace(spec), base, args.views, seed)
        trained: dict[str, tuple[LCRModel, dict]] = {}
        for name in args.runs:
            cfg = config_from_dict(BENCH_CONFIG | overrides | RUNS[name] | {"seed": seed}, f"run {name}")
            begun = time.perf_counter()
            key = training_key(cfg)
            if key not in trained:
                trained[key] = pretrain(cfg, pool, f"{name} seed {seed}")
            model, last = trained[key]
            model.cfg = cfg  # lcr-multitask: the same weights, its own test pooling
            row = evaluate(model, cfg, train, test)
            row |= {"pooling": cfg.test_pooling, "seconds": time.perf_counter() - begun}
            if "kl_fit_ratio" in last:
                row["kl_fit_ratio"] = last["kl_fit_ratio"]
                row["gradcam_kl_uniform"] = last["gradcam_kl_uniform"]
            if cfg.test_pooling == "attention":
                row |= random_gfb_control(model, cfg, test)
            results[name].append(row)
            print(f"{name:>20} seed {seed}: " + ", ".join(
                f"{k} {100 * v:.1f}" if isinstance(v, float) and k != "seconds" and "kl_" not in k else f"{k} {v}"
                for k, v in row.items() if k != "pooling") + f" [{row['seconds']:.0f} s]", flush=True)
        (args.out / "results.json").write_text(json.dumps({"spec": spec.to_dict(), "config": BENCH_CONFIG | overrides,
                                                           "chance": chance, "results": results}, indent=1))
    table = markdown(results, chance, chance["area"], args.seeds)
    print("\n" + table)
    (args.out / "table.md").write_text(table + "\n")
    plot(results, chance, args.out / "method.png")
    print(f"\nwrote {args.out / 'results.json'}, {args.out / 'table.md'}, {args.out / 'method.png'} "
          f"in {(time.perf_counter() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
