"""Optimisation (SGD, linear lr scaling, warmup + cosine), one training step, and feature extraction."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from lcr_core.config import LCRConfig


def build_optimizer(model: nn.Module, cfg: LCRConfig) -> torch.optim.SGD:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=cfg.scaled_lr, momentum=cfg.sgd_momentum, weight_decay=cfg.weight_decay)


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warmup, then a half-cosine from 1 to 0 over the remaining steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: LCRConfig, steps_per_epoch: int):
    total, warmup = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, warmup))


def train_step(model: nn.Module, images: tuple[torch.Tensor, torch.Tensor], optimizer: torch.optim.Optimizer,
               scheduler, autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
    """One SGD step on a pair of views; `autocast_dtype` (e.g. bfloat16) turns on mixed precision."""
    im_q, im_k = images
    lr = optimizer.param_groups[0]["lr"]
    with torch.autocast(im_q.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        out = model(im_q, im_k)
    optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    optimizer.step()
    scheduler.step()
    return {"loss": out["loss"].item(), "loss_cl": out["loss_cl"].item(), "loss_kl": out["loss_kl"].item(), "lr": lr}


@torch.no_grad()
def extract_embeddings(model, batches: Iterable, poolings: Iterable[str], device: str | torch.device = "cpu",
                       progress: str | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Embed every (images, labels, ...) batch with each pooling from one backbone pass per batch.

    Returns {pooling: N x D float32} and the N labels. The model is put in eval mode (BN statistics
    frozen) so an image's embedding does not depend on its batch.
    """
    model.eval()
    poolings = list(poolings)
    chunks: dict[str, list[torch.Tensor]] = {p: [] for p in poolings}
    labels = []
    for batch in tqdm(batches, desc=progress, disable=progress is None, unit="batch"):
        images = batch[0].to(device, non_blocking=True)
        for pooling, embedding in model.embeddings(images, poolings).items():
            chunks[pooling].append(embedding.float().cpu())
        labels.append(torch.as_tensor(batch[1]))
    return {p: torch.cat(c) for p, c in chunks.items()}, torch.cat(labels)
