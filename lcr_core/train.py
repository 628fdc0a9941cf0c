"""Optimisation (SGD, linear lr scaling, warmup + cosine), one training step, and feature extraction."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from lcr_core import distributed
from lcr_core.config import LCRConfig
from lcr_core.errors import LCRError


class NonFiniteLossError(LCRError):
    """Training diverged: a NaN or infinite loss. The message names the step."""


def build_optimizer(model: nn.Module, cfg: LCRConfig) -> torch.optim.SGD:
    """SGD over the trainable parameters; the GradCAM fitting branch at `gfb_lr_scale` times the lr."""
    branch, rest = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (branch if ".gfb." in f".{name}" else rest).append(param)
    groups = [{"params": rest}]
    if branch:
        groups.append({"params": branch, "lr": cfg.scaled_lr * cfg.gfb_lr_scale})
    return torch.optim.SGD(groups, lr=cfg.scaled_lr, momentum=cfg.sgd_momentum, weight_decay=cfg.weight_decay)


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
    if not distributed.all_ranks_agree(bool(torch.isfinite(out["loss"])), im_q.device):  # before the update
        raise NonFiniteLossError(f"the loss is {out['loss'].item()} (on this rank) at step {scheduler.last_epoch + 1} "
                                 f"(lr {lr:.3g}); expected a finite loss: lower lr or check the data")
    optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    optimizer.step()
    scheduler.step()
    return {name: value.item() for name, value in out.items()} | {"lr": lr}


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
    # `with`: a bar left open by a failing loader would push every later bar of the process down a line
    with tqdm(batches, desc=progress, disable=progress is None, unit="batch") as bar:
        for batch in bar:
            images = batch[0].to(device, non_blocking=True)
            for pooling, embedding in model.embeddings(images, poolings).items():
                chunks[pooling].append(embedding.float().cpu())
            labels.append(torch.as_tensor(batch[1]))
    return {p: torch.cat(c) for p, c in chunks.items()}, torch.cat(labels)


@dataclass
class TrainingHealth:
    """Watches the signs that LCR's signal or the contrastive learning went wrong (DESIGN §1) and
    warns once for each: a flat GradCAM target for a whole epoch, a contrastive loss that climbs back
    above its first epoch's, an embedding that collapses (a queue of small effective rank)."""

    embed_dim: int
    flat_target_kl: float = 0.01
    min_rank_share: float = 0.1
    first_epoch_loss: float | None = None
    warned: set[str] = field(default_factory=set)

    def end_epoch(self, epoch_means: dict[str, float], effective_rank: float | None) -> dict[str, str]:
        """{kind: message} of the warnings this epoch raises for the first time."""
        found = {}
        target = epoch_means.get("gradcam_kl_uniform")
        if target is not None and target < self.flat_target_kl:
            found["flat_target"] = (f"the GradCAM target is flat (KL from uniform {target:.4f} < "
                                    f"{self.flat_target_kl} over an epoch): the fitting branch learns nothing; "
                                    "check gradcam_normalize (minmax) and kl_temperature")
        loss = epoch_means.get("loss_cl")
        if self.first_epoch_loss is None:
            self.first_epoch_loss = loss
        elif loss is not None and loss > self.first_epoch_loss:
            found["loss_rising"] = (f"the contrastive loss rose to {loss:.3f}, above its first epoch's "
                                    f"{self.first_epoch_loss:.3f}: lower lr, raise momentum, or shrink the queue")
        if effective_rank is not None and effective_rank < self.min_rank_share * self.embed_dim:
            found["collapse"] = (f"the embedding collapses: effective rank {effective_rank:.1f} of "
                                 f"{self.embed_dim} dimensions (< {self.min_rank_share:.0%})")
        new = {kind: message for kind, message in found.items() if kind not in self.warned}
        self.warned.update(new)
        return new
