"""Linear probing on frozen, precomputed features (DESIGN §2).

The encoder is never touched here: features are extracted once, then a linear classifier is fitted
on them for each label fraction. The problem is convex, so a full-batch L-BFGS from zero weights on
standardised features converges in seconds and is reproducible without a seed.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from lcr_core.errors import LCRError


class ProbeError(LCRError):
    """Bad input to the linear probe."""


def check_fraction(fraction: float) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
        raise ProbeError(f"label fraction {fraction!r}: expected a number in (0, 1]")
    return float(fraction)


def per_class_count(class_size: int, fraction: float) -> int:
    """Images kept from a class of `class_size`: the fraction rounded half up, at least one."""
    return min(class_size, max(1, math.floor(fraction * class_size + 0.5)))


def stratified_subset(labels, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a class-stratified subset: `per_class_count` random images of every class.

    The same labels, fraction and seed give the same subset.
    """
    fraction = check_fraction(fraction)
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise ProbeError(f"labels of shape {labels.shape} and dtype {labels.dtype}: expected a non-empty 1-D "
                         "integer array")
    rng = np.random.default_rng(seed)
    order = np.argsort(labels, kind="stable")
    boundaries = np.flatnonzero(np.diff(labels[order])) + 1
    chosen = [rng.choice(members, per_class_count(len(members), fraction), replace=False)
              for members in np.split(order, boundaries)]
    return np.sort(np.concatenate(chosen))


class LinearProbe(nn.Module):
    """Standardisation (fixed from the training features) followed by one linear layer."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, num_classes: int):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.linear = nn.Linear(mean.numel(), num_classes)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear((features - self.mean) / self.std)


def _check_features(x: torch.Tensor, y: torch.Tensor, num_classes: int) -> None:
    if x.ndim != 2 or x.shape[0] == 0:
        raise ProbeError(f"features of shape {tuple(x.shape)}: expected a non-empty (N, D) array")
    if y.shape != (x.shape[0],):
        raise ProbeError(f"labels of shape {tuple(y.shape)}: expected ({x.shape[0]},), one per feature row")
    if y.min() < 0 or y.max() >= num_classes:
        raise ProbeError(f"labels span {int(y.min())}..{int(y.max())}: expected 0..{num_classes - 1}")
    if not torch.isfinite(x).all():
        raise ProbeError("features contain NaN or infinite values")


def train_linear_probe(train_x, train_y, num_classes: int, weight_decay: float = 1e-4,
                       max_iter: int = 300) -> LinearProbe:
    """Multinomial logistic regression, cross-entropy + weight_decay/2 * |W|^2, by full-batch L-BFGS.

    train_x: (N, D) features; train_y: (N,) class indices in [0, num_classes). Returns the fitted
    probe in eval mode with gradients off.
    """
    x = torch.as_tensor(train_x, dtype=torch.float32)
    y = torch.as_tensor(train_y, dtype=torch.int64)
    _check_features(x, y, num_classes)
    std = x.std(0, unbiased=False)
    # a feature constant over the training set is 0 after centring and its weight keeps its zero start;
    # dividing it by 1 instead of ~0 keeps test features that do vary from exploding
    probe = LinearProbe(x.mean(0), torch.where(std > 1e-6, std, torch.ones_like(std)), num_classes)
    optimizer = torch.optim.LBFGS(probe.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        penalty = 0.5 * weight_decay * probe.linear.weight.square().sum()
        loss = nn.functional.cross_entropy(probe(x), y) + penalty
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return probe.eval().requires_grad_(False)


def topk_accuracy(logits, targets, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """`top{k}`: share of rows whose target is among the k highest logits (k capped at the class count)."""
    logits = torch.as_tensor(logits)
    targets = torch.as_tensor(targets, dtype=torch.int64)
    if logits.ndim != 2 or targets.shape != (logits.shape[0],) or logits.shape[0] == 0:
        raise ProbeError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)}: "
                         "expected (N, C) and (N,)")
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == targets[:, None]
    return {f"top{k}": float(hits[:, :k].any(1).float().mean()) for k in ks}
