"""Does LCR beat MoCo v2 on the synthetic fine-grained set? `lcr`, `moco`, `lcr-multitask` over seeds.

    .venv/bin/python benchmarks/variants.py                       # the calibrated 2-core setting (~12 min)
    .venv/bin/python benchmarks/variants.py --seeds 0 --epochs 5  # a quick look
    .venv/bin/python benchmarks/variants.py --init coarse         # start from the coarse-task init

Single process, plain torch, lcr_core only. Each run pretrains on the synthetic train split and
evaluates leave-one-out retrieval on the test split (DESIGN §2) with the variant's test pooling
(and, for diagnosis, the other pooling too). Every figure is printed with its chance level, the
exact expectation over random rankings (`lcr_core.metrics.chance_levels`).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision import transforms as T
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from components.converters import parse_options  # noqa: E402
from lcr_core.augment import IMAGENET_MEAN, IMAGENET_STD, eval_transform, two_crop_transform  # noqa: E402
from lcr_core.coarse_init import pretrain_coarse  # noqa: E402
from lcr_core.config import LCRConfig, config_from_dict  # noqa: E402
from lcr_core.errors import LCRError  # noqa: E402
from lcr_core.losses import normalize_attention  # noqa: E402
from lcr_core.metrics import chance_levels, retrieval_metrics  # noqa: E402
from lcr_core.model import build_model  # noqa: E402
from lcr_core.synthetic import SyntheticDataset, SyntheticSpec, generate, label_of  # noqa: E402
from lcr_core.train import build_optimizer, build_scheduler, extract_embeddings, train_step  # noqa: E402

VARIANTS = ("lcr", "moco", "lcr-multitask")
METRICS = ("rank1", "rank5", "mAP")
# The calibrated 2-core setting, two minutes per run on 2 CPU cores; `lcr_core/configs/demo.yaml` is
# the same recipe. Fields of LCRConfig; override with --set.
BENCH_CONFIG = {
    "backbone": "tiny",
    "image_size": 64,
    "eval_resize": 73,  # 64 * 256 / 224
    "epochs": 30,
    "batch_size": 32,  # more steps per epoch: the runs are only ~200 SGD steps long
    "lr": 0.12,  # 0.03 at batch 32
    "lr_base_batch": 128,
    "momentum": 0.99,  # 0.999 leaves the key encoder near its init over so few steps
    "queue_size": 256,  # well below the 480 training images (no stale copies of the query)
    "projector": "mocov2",  # the 3-layer BN head did not train at this budget (loss above uniform)
    "projector_hidden": 512,
    "embed_dim": 128,
    "warmup_epochs": 1,
    "loader_workers": 1,
}


# ---------------------------------------------------------------------------------------------
# One run.

def run_config(variant: str, seed: int, overrides: dict, weights: str | None) -> LCRConfig:
    values = BENCH_CONFIG | overrides | {"variant": variant, "seed": seed, "backbone_weights": weights}
    return config_from_dict(values, "benchmark settings")


def pretrain(cfg: LCRConfig, spec: SyntheticSpec, desc: str) -> torch.nn.Module:
    torch.manual_seed(cfg.seed)
    train = torch.utils.data.DataLoader(
        SyntheticDataset(spec, "train", two_crop_transform(cfg.image_size)), batch_size=cfg.batch_size,
        shuffle=True, drop_last=True, num_workers=cfg.loader_workers, persistent_workers=cfg.loader_workers > 0,
        generator=torch.Generator().manual_seed(cfg.seed))
    model = build_model(cfg)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, len(train))
    with tqdm(total=cfg.epochs * len(train), desc=desc, unit="batch", leave=False) as bar:
        for _ in range(cfg.epochs):
            model.train()
            for views, _labels in train:
                stats = train_step(model, views, optimizer, scheduler)
                bar.set_postfix(cl=f"{stats['loss_cl']:.2f}", kl=f"{stats['loss_kl']:.3f}")
                bar.update()
    return model


@torch.no_grad()
def attention_on_object(model, spec: SyntheticSpec) -> tuple[float, float]:
    """LCR's mechanism, measured: the share of the GFB map A' (eq. 8) that falls inside the object's
    box, next to the box's share of the image (what a flat map would give). Whole test images, no crop."""
    model.eval()
    to_tensor = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    samples = list(generate(spec, "test"))
    _, attention = model.attention_map(torch.stack([to_tensor(s.image) for s in samples]))
    weights = F.interpolate(normalize_attention(attention)[:, None], size=spec.image_size, mode="nearest")[:, 0]
    inside = torch.zeros_like(weights)
    for mask, sample in zip(inside, samples):
        x0, y0, x1, y1 = sample.meta["bbox"]
        mask[y0:y1, x0:x1] = 1.0
    share = (weights * inside).sum(dim=(1, 2)) / weights.sum(dim=(1, 2)).clamp_min(1e-12)
    return float(share.mean()), float(inside.mean())


def evaluate(model, cfg: LCRConfig, spec: SyntheticSpec) -> dict[str, dict[str, float]]:
    """Retrieval with every pooling the model offers: {pooling: {rank1, rank5, mAP}}."""
    test = torch.utils.data.DataLoader(
        SyntheticDataset(spec, "test", eval_transform(cfg.image_size, cfg.eval_resize)), batch_size=128)
    poolings = ["gap", "attention"] if cfg.uses_gfb else ["gap"]
    embeddings, labels = extract_embeddings(model, test, poolings)
    return {p: {m: retrieval_metrics(e, labels)[m] for m in METRICS} for p, e in embeddings.items()}


# ---------------------------------------------------------------------------------------------
# Reporting.

def with_chance(value: float, chance: float) -> str:
    return f"{100 * value:5.1f} ({value / chance:.1f}x chance {100 * chance:.1f})"


def mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * spread:.1f}"


def report(variant: str, seed: int, scores: dict[str, dict[str, float]], pooling: str, chance: dict[str, float],
           seconds: float) -> None:
    print(f"{variant:14s} seed {seed}: " + "  ".join(
        f"{m} {with_chance(scores[pooling][m], chance[m])}" for m in METRICS) + f"  [{pooling}; {seconds:.0f} s]")
    for other, values in scores.items():
        if other != pooling:
            print(f"{'':14s}   ({other}, diagnostic) " + "  ".join(
                f"{m} {with_chance(values[m], chance[m])}" for m in METRICS), flush=True)


def markdown_table(results: dict[str, list[dict]], chance: dict[str, float], n_seeds: int) -> str:
    lines = ["| variant (test pooling) | rank-1 % | rank-5 % | mAP % |", "|---|---|---|---|",
             f"| chance | {100 * chance['rank1']:.1f} | {100 * chance['rank5']:.1f} | {100 * chance['mAP']:.1f} |"]
    for variant, runs in results.items():
        for pooling in runs[0]:
            tested = pooling == tested_pooling(variant)
            name = f"{variant} ({pooling})" if tested else f"{variant} ({pooling}, diagnostic)"
            cells = [mean_std([r[pooling][m] for r in runs]) for m in METRICS]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append(f"\nmean ± std over {n_seeds} seed(s); chance from the class sizes of the test split")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------

def training_key(cfg: LCRConfig) -> tuple:
    """Everything that shapes training: variants equal in all of it differ only at test time."""
    return tuple(repr(value) for name, value in cfg.to_dict().items() if name != "variant") + (
        cfg.uses_gfb, cfg.fits_gradcam, cfg.train_pooling, cfg.gfb_projections, cfg.variant == "lcr-mlp",
        cfg.is_byol)


def tested_pooling(variant: str) -> str:
    return "gap" if variant == "init only" else LCRConfig(variant=variant).test_pooling


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, help="shortcut for --set epochs=N")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="LCRConfig field")
    parser.add_argument("--spec", action="append", default=[], metavar="FIELD=VALUE", help="SyntheticSpec field")
    parser.add_argument("--init", choices=("random", "coarse"), default="random")
    parser.add_argument("--coarse-epochs", type=int, default=10)
    parser.add_argument("--workdir", type=Path, default=Path("benchmark_runs"))
    args = parser.parse_args()
    try:
        overrides = parse_options(args.set)
        if args.epochs:
            overrides["epochs"] = args.epochs
        image_size = overrides.get("image_size", BENCH_CONFIG["image_size"])
        spec = SyntheticSpec.from_options({"image_size": image_size} | parse_options(args.spec))
        weights = None
        if args.init == "coarse":
            weights = coarse_weights(spec, overrides.get("backbone", BENCH_CONFIG["backbone"]), image_size,
                                     args.coarse_epochs, args.workdir)
        return benchmark(args.variants, args.seeds, overrides, weights, spec)
    except LCRError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def coarse_weights(spec: SyntheticSpec, backbone: str, image_size: int, epochs: int, workdir: Path) -> str:
    """Coarse-task init on *other* images of the same kind (another seed, 3x as many), made once."""
    coarse_spec = dataclasses.replace(spec, seed=spec.seed + 1000, train_per_class=3 * spec.train_per_class)
    path = workdir / f"coarse-{backbone}-{image_size}px-{epochs}ep.pt"
    if not path.is_file():
        accuracy = pretrain_coarse(coarse_spec, backbone, image_size, epochs, path)
        print(f"coarse init: orientation accuracy {100 * accuracy:.1f} % (chance {100 / 6:.1f} %) -> {path}")
    return str(path)


def benchmark(variants: list[str], seeds: list[int], overrides: dict, weights: str | None,
              spec: SyntheticSpec) -> int:
    labels = np.array([label_of(spec, i) for i in range(spec.split_size("test"))])
    levels = chance_levels(labels)
    chance = {m: levels[f"chance_{m}"] for m in METRICS}
    print(f"data: {spec}")
    print(f"config: {BENCH_CONFIG | overrides}; init: {weights or 'random'}")
    print("chance: " + ", ".join(f"{m} {100 * chance[m]:.1f} %" for m in METRICS))
    results: dict[str, list[dict]] = {"init only": []} | {v: [] for v in variants}
    for seed in seeds:
        init_cfg = run_config("moco", seed, overrides, weights)
        torch.manual_seed(seed)
        results["init only"].append(evaluate(build_model(init_cfg), init_cfg, spec))
        report("init only", seed, results["init only"][-1], "gap", chance, 0.0)
        trained: dict[tuple, torch.nn.Module] = {}
        for variant in variants:
            cfg = run_config(variant, seed, overrides, weights)
            start = time.perf_counter()
            if training_key(cfg) not in trained:  # lcr and lcr-multitask train the very same model
                trained[training_key(cfg)] = pretrain(cfg, spec, f"{variant} seed {seed}")
            model = trained[training_key(cfg)]
            results[variant].append(evaluate(model, cfg, spec))
            report(variant, seed, results[variant][-1], cfg.test_pooling, chance, time.perf_counter() - start)
            if cfg.uses_gfb:
                share, area = attention_on_object(model, spec)
                print(f"{'':14s}   attention A' inside the object box: {100 * share:.1f} % "
                      f"(box area {100 * area:.1f} % of the image)", flush=True)
    print()
    print(markdown_table(results, chance, len(seeds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
