"""`lcr report`: what the encoder looks at, and what it retrieves (the paper's figures 1 and B1).

    lcr report --model runs/lcr-demo/checkpoint_00000120 --shards data/shards --out reports/demo

For a seeded sample of test images: the image, its contrastive GradCAM (eq. 3, the score being the
configured `gradcam_source` of the image paired with itself), the GFB attention A' (eq. 8), and the
GFB projections of highest and lowest variance over the sample (appendix B); then retrieval
examples: each image as a query with its top 5 among all other test images (green = same class,
red = not). PNG figures (matplotlib's Agg renderer) and one `index.html` that shows them next to the retrieval
metrics; all of it logged to MLflow under `report/`.
"""

from __future__ import annotations

import argparse
import html
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from components import storage
from components.data import eval_loader
from components.features import (
    EvaluationError,
    EvaluationSetup,
    Features,
    add_common_arguments,
    evaluation_run,
    setup_from_args,
    split_features,
)
from components.probe import FractionResult, percent
from components.retrieve import KS, evaluate_retrieval
from lcr_core.augment import IMAGENET_MEAN, IMAGENET_STD
from lcr_core.losses import normalize_attention
from lcr_core.model import LCRModel

TOP = 5  # retrieved images shown per query
DEFAULT_OUT = "reports"


@dataclass
class Report:
    html: Path
    figures: list[Path]
    mlflow_run_id: str


@dataclass
class Maps:
    """Per sample image (N of them) at feature-map resolution (h x w)."""

    gradcam: torch.Tensor  # N x h x w
    attention: torch.Tensor | None  # N x h x w, A' in [0, 1]; None without a GFB
    high_variance: list[tuple[int, torch.Tensor]]  # (projection index, N x h x w), highest variance first
    low_variance: list[tuple[int, torch.Tensor]]


# ---------------------------------------------------------------------------------------------
# What goes into the figures (plain tensors; no files)

def sample_indices(count: int, total: int, seed: int) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(total, min(count, total), replace=False))


def top_matches(embeddings: np.ndarray, queries: np.ndarray, k: int = TOP) -> np.ndarray:
    """(len(queries), k) indices of the most similar other items, best first (embeddings L2-normalised)."""
    scores = embeddings[queries] @ embeddings.T
    scores[np.arange(len(queries)), queries] = -np.inf
    return np.argsort(-scores, axis=1, kind="stable")[:, :min(k, len(embeddings) - 1)]


def attention_maps(model: LCRModel, images: torch.Tensor, num_projections: int) -> Maps:
    """GradCAM, A' and the extreme-variance projections of a batch of normalised images (eval mode);
    computed where the model is, returned on the CPU."""
    model.eval()
    images = images.to(next(model.parameters()).device)
    gradcam = model.gradcam(images, images).cpu()
    with torch.no_grad():
        feature_map, attention = model.attention_map(images)
        gfb = model.encoder_q.gfb
        if gfb is None:
            return Maps(gradcam, None, [], [])
        projections = gfb.projection_maps(feature_map).cpu()  # N x K x h x w
        order = projections.transpose(0, 1).flatten(1).var(dim=1).argsort(descending=True).tolist()
        count = min(num_projections, len(order) // 2)
        high, low = order[:count], order[::-1][:count]
        return Maps(gradcam, normalize_attention(attention).cpu(), [(i, projections[:, i]) for i in high],
                    [(i, projections[:, i]) for i in low])


def collect_images(split_uri: str, keys: set[str], image_size: int, resize: int, workers: int) -> dict:
    """{key: normalised image tensor} for the wanted keys, in one pass over the split."""
    found = {}
    for images, _, batch_keys in eval_loader(split_uri, image_size, resize, batch_size=64, workers=workers):
        found.update({k: img for k, img in zip(batch_keys, images) if k in keys})
    return found


# ---------------------------------------------------------------------------------------------
# Figures

def displayable(image: torch.Tensor) -> np.ndarray:
    """A normalised C x H x W tensor back to H x W x 3 in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return (image * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def upsampled(heat: torch.Tensor, size: int) -> np.ndarray:
    """An h x w map at image resolution, scaled to [0, 1] within the image (only relative strength shows)."""
    heat = F.interpolate(heat[None, None].float(), size=(size, size), mode="bilinear", align_corners=False)
    heat = heat[0, 0]
    heat = heat - heat.min()
    return (heat / (heat.max() + 1e-12)).numpy()


def grid(rows: int, cols: int, cell: float = 1.6):
    """A Figure of the object API: rendered by Agg on savefig, no pyplot state, no display needed."""
    fig = Figure(figsize=(cell * cols, cell * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return fig, axes


def save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def map_rows(images: list[np.ndarray], rows: list[tuple[str, torch.Tensor]], path: Path,
             titles: list[str]) -> Path:
    """First row the images, then one row per (name, N x h x w maps) as heat-map overlays."""
    fig, axes = grid(1 + len(rows), len(images))
    size = images[0].shape[0]
    for col, image in enumerate(images):
        axes[0, col].imshow(image)
        axes[0, col].set_title(caption(titles[col]), fontsize=7)
        for row, (_, maps) in enumerate(rows, start=1):
            axes[row, col].imshow(image)
            axes[row, col].imshow(upsampled(maps[col], size), cmap="jet", alpha=0.5)
    for row, (name, _) in enumerate([("image", None), *rows]):
        axes[row, 0].set_ylabel(name, fontsize=8)
    return save(fig, path)


def caption(name: str, width: int = 22) -> str:
    """A class name wrapped onto short lines (names like CUB's use '_' for spaces), never cut."""
    return textwrap.fill(name.replace("_", " "), width)


def retrieval_figure(queries: np.ndarray, matches: np.ndarray, features: Features, images: dict,
                     path: Path) -> Path:
    fig, axes = grid(len(queries), 1 + matches.shape[1])
    names = features.class_names
    for row, (query, found) in enumerate(zip(queries, matches)):
        axes[row, 0].imshow(displayable(images[features.keys[query]]))
        axes[row, 0].set_title(caption(f"query: {names[features.labels[query]]}"), fontsize=7)
        for col, match in enumerate(found, start=1):
            right = features.labels[match] == features.labels[query]
            ax = axes[row, col]
            ax.imshow(displayable(images[features.keys[match]]))
            ax.set_title(f"#{col} {'right' if right else 'wrong'}", fontsize=7,
                         color="green" if right else "red")
            for spine in ax.spines.values():
                spine.set_edgecolor("green" if right else "red")
                spine.set_linewidth(3)
    return save(fig, path)


def html_page(title: str, facts: dict[str, str], metrics: dict[str, dict],
              figures: list[tuple[str, Path]]) -> str:
    esc = html.escape
    names = [f"rank{k}" for k in KS] + ["mAP"]
    fact_rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in facts.items())
    header = "<tr><th>pooling</th>" + "".join(f"<th>{n}</th>" for n in names) + "</tr>"
    metric_rows = "".join(
        f"<tr><th>{esc(p)}</th>"
        + "".join(f"<td>{100 * m[n]:.2f} (chance {100 * m['chance_' + n]:.2f})</td>" for n in names) + "</tr>"
        for p, m in metrics.items())
    sections = "".join(f'<h2>{esc(caption)}</h2>\n<img src="{esc(path.name)}" alt="{esc(caption)}">\n'
                       for caption, path in figures)
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{esc(title)}</title></head><body>\n"
            f"<h1>{esc(title)}</h1>\n<table>{fact_rows}</table>\n"
            f"<h2>Retrieval on the test split (percent)</h2>\n<table>{header}{metric_rows}</table>\n"
            f"{sections}</body></html>\n")


# ---------------------------------------------------------------------------------------------
# The step

def build_report(setup: EvaluationSetup, model_ref: str, out_dir: str | Path, num_images: int = 6,
                 num_projections: int = 3, seed: int = 0) -> tuple[Path, list[Path]]:
    """Write the figures and index.html into `out_dir`; returns (html, figures)."""
    model, out = setup.model.eval(), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    test_uri = storage.join(setup.shards, "test")
    features = split_features(model, test_uri, setup.poolings, batch_size=setup.batch_size,
                              workers=setup.workers, cache_dir=setup.cache_dir)
    shown = features[setup.poolings[0]]  # retrieval examples use the first pooling (the variant's own)
    queries = sample_indices(num_images, len(shown.keys), seed)
    matches = top_matches(shown.embeddings, queries)
    wanted = {shown.keys[i] for i in np.concatenate([queries, matches.ravel()])}
    images = collect_images(test_uri, wanted, model.cfg.image_size, model.cfg.eval_resize, setup.workers)
    batch = torch.stack([images[shown.keys[i]] for i in queries])
    maps = attention_maps(model, batch, num_projections)
    pictures = [displayable(image) for image in batch]
    titles = [shown.class_names[shown.labels[i]] for i in queries]

    rows = [("GradCAM", maps.gradcam)] + ([("GFB A'", maps.attention)] if maps.attention is not None else [])
    figures = [("Images, contrastive GradCAM and the GFB attention A' (paper fig. 1)",
                map_rows(pictures, rows, out / "attention.png", titles))]
    if maps.high_variance:
        rows = ([(f"high var #{i}", m) for i, m in maps.high_variance]
                + [(f"low var #{i}", m) for i, m in maps.low_variance])
        figures.append(("GFB projections of highest and lowest variance (paper fig. B1)",
                        map_rows(pictures, rows, out / "projections.png", titles)))
    figures.append((f"Retrieval with {shown.pooling} pooling: each query's top {matches.shape[1]}",
                    retrieval_figure(queries, matches, shown, images, out / "retrieval.png")))
    metrics = {p: evaluate_retrieval(f) for p, f in features.items()}
    facts = {"model": model_ref, "variant": model.cfg.variant, "backbone": model.cfg.backbone,
             "test split": test_uri, "test images": str(len(shown.keys)), "sample seed": str(seed)}
    page = out / "index.html"
    page.write_text(html_page(f"LCR report: {model.cfg.run_name}", facts, metrics, figures))
    return page, [path for _, path in figures]


def report(setup: EvaluationSetup, model_ref: str, out_dir: str | Path, num_images: int = 6,
           num_projections: int = 3, seed: int = 0, run_id: str | None = None,
           experiment: str | None = None) -> Report:
    page, figures = build_report(setup, model_ref, out_dir, num_images, num_projections, seed)
    with evaluation_run(setup.model, "report", model_ref, run_id, experiment) as logger:
        for path in [page, *figures]:
            logger.log_artifact(path, "report")
        return Report(page, figures, logger.run_id)


# ---------------------------------------------------------------------------------------------
# The summary table (what `lcr demo` ends with)

def summary_row(name: str, retrieval: dict, accuracies: list[dict], prefix: str = "") -> str:
    """rank-1, rank-5, mAP, then top-1 / top-5 per label fraction, in percent."""
    cells = [f"{100 * retrieval[prefix + key]:>8.2f}" for key in ("rank1", "rank5", "mAP")]
    cells += [f"{100 * a[prefix + 'top1']:>11.2f} /{100 * a[prefix + 'top5']:>5.1f}" for a in accuracies]
    return f"{name:<10}" + "".join(cells)


def summary_table(retrieval: dict[str, dict], probes: list[FractionResult]) -> str:
    """One row per pooling (the variant's own next to GAP) and a last row of chance levels."""
    fractions = list(dict.fromkeys(r.fraction for r in probes))
    accuracy = {(r.pooling, r.fraction): r.accuracy for r in probes}
    lines = [f"{'pooling':<10}{'rank-1':>8}{'rank-5':>8}{'mAP':>8}"
             + "".join(f"{'top-1/5 @' + percent(f) + '%':>18}" for f in fractions)]
    lines += [summary_row(p, m, [accuracy[p, f] for f in fractions]) for p, m in retrieval.items()]
    first = next(iter(retrieval))
    lines.append(summary_row("chance", retrieval[first], [accuracy[first, f] for f in fractions], "chance_"))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--out", default=DEFAULT_OUT, help="folder for index.html and the PNG figures")
    parser.add_argument("--images", type=int, default=6, help="test images in the sample")
    parser.add_argument("--projections", type=int, default=3,
                        help="GFB projections shown of highest (and of lowest) variance")
    parser.add_argument("--seed", type=int, default=0, help="seed of the image sample")


def run(args: argparse.Namespace) -> int:
    if args.images < 1 or args.projections < 1:
        raise EvaluationError(f"--images {args.images}, --projections {args.projections}: expected both >= 1")
    result = report(setup_from_args(args), args.model, args.out, args.images, args.projections, args.seed,
                    args.run_id, args.experiment)
    print(f"report: {result.html.resolve()}")
    print(f"MLflow run {result.mlflow_run_id} (artifacts under report/)")
    return 0
