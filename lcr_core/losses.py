"""Losses and the maps they act on, as small pure functions (equations numbered as in the paper)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def info_nce_logits(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """Eq. 1 logits: column 0 is the positive q.k/t, the rest q.queue/t. q, k: N x D; queue: D x Q."""
    positive = (q * k).sum(dim=1, keepdim=True)
    negatives = q @ queue
    return torch.cat([positive, negatives], dim=1) / temperature


def info_nce(logits: torch.Tensor) -> torch.Tensor:
    """Eq. 1 per sample: -log softmax(logits)[0], the positive being column 0."""
    return -F.log_softmax(logits, dim=1)[:, 0]


def byol_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample BYOL regression loss 2 - 2 cos(p, z')."""
    return 2 - 2 * F.cosine_similarity(prediction, target.detach(), dim=1)


def contrastive_gradcam(feature_map: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """Eq. 3: G[i,j] = ReLU(<dS/dphi[i,j], phi[i,j]>), detached: it is a fitting target.

    `score` holds one value per image (or one for the batch); the gradient of its sum w.r.t. phi only
    runs back through the pooling and projector (phi is where the graph is cut), never through the
    backbone. It is per image only if nothing couples the images on the way from phi to the score:
    the caller sees to that (see `model.with_constant_batch_statistics`).
    """
    (grad,) = torch.autograd.grad(score.sum(), feature_map, retain_graph=True)
    return F.relu((grad * feature_map).sum(dim=1)).detach()


def normalize_gradcam(gradcam: torch.Tensor, mode: str, eps: float = 1e-12) -> torch.Tensor:
    """The target's scale, per image, before the softmax of eq. 5 (DESIGN §1 "Scale"): raw G is a tiny
    gradient times a feature map, on which softmax(G / tau) is uniform to within KL 0.001.
    minmax: to [0, 1]; max: divided by its maximum; none: as it is."""
    if mode == "none":
        return gradcam
    flat = gradcam.flatten(1)
    high = flat.max(dim=1, keepdim=True).values
    if mode == "max":
        return (flat / (high + eps)).view_as(gradcam)
    if mode == "minmax":
        low = flat.min(dim=1, keepdim=True).values
        return ((flat - low) / (high - low + eps)).view_as(gradcam)
    raise ValueError(f"gradcam normalisation {mode!r}: expected minmax, max or none")


def grid_log_softmax(maps: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 5 in log space: each N x H x W map as one distribution over its H*W cells (N x HW)."""
    return F.log_softmax(maps.flatten(1) / tau, dim=1)


def kl_per_image(log_target: torch.Tensor, log_model: torch.Tensor) -> torch.Tensor:
    """KL(target || model) of each image (the sum over every axis but the first).

    Direction as in algorithm A1 (`kl_div(log A_bar, G_bar)`): the GradCAM is the target
    distribution, the branch's map the model."""
    return F.kl_div(log_model, log_target, reduction="none", log_target=True).flatten(1).sum(dim=1)


def kl_from_uniform(log_p: torch.Tensor) -> torch.Tensor:
    """Per image, how far its distribution(s) over the last axis are from uniform: 0 = flat."""
    uniform = torch.full_like(log_p, -math.log(log_p.shape[-1]))
    return kl_per_image(log_p, uniform)


def reduce_over_batch(per_image: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_image.mean()
    if reduction == "sum":  # the authors' code: per image, batch-size times the weight of a mean
        return per_image.sum()
    raise ValueError(f"kl reduction {reduction!r}: expected mean or sum")


def gradcam_fitting_loss(gradcam: torch.Tensor, attention: torch.Tensor, tau: float,
                         reduction: str = "mean") -> torch.Tensor:
    """Eq. 5-6: both maps softmax-normalised over the grid at temperature tau, then KL."""
    return reduce_over_batch(kl_per_image(grid_log_softmax(gradcam, tau), grid_log_softmax(attention, tau)),
                             reduction)


def released_code_distributions(gradcam: torch.Tensor, attention: torch.Tensor,
                                eps: float = 1e-7) -> tuple[torch.Tensor, torch.Tensor]:
    """What the authors' released code fits (DESIGN §1), as (log target, log model), N x H x W: raw G
    and A min-max normalised over the whole batch, each softmaxed along the last axis only (one
    distribution per row of the grid), with no temperature."""
    scaled = (attention - attention.min()) / (attention.max() - attention.min() + eps)
    return F.log_softmax(gradcam, dim=-1), F.log_softmax(scaled, dim=-1)


def normalize_attention(attention: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Eq. 8's A' = (A - min A) / (max A - min A + eps), min and max taken per image (never per batch)."""
    flat = attention.flatten(1)
    low = flat.min(dim=1, keepdim=True).values
    high = flat.max(dim=1, keepdim=True).values
    return ((flat - low) / (high - low + eps)).view_as(attention)


def weighted_average_pool(feature_map: torch.Tensor, weights: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Eq. 8: f = sum_ij A'[i,j] phi[i,j] / sum_ij A'[i,j]. feature_map N x C x H x W, weights N x H x W."""
    weighted = torch.einsum("nchw,nhw->nc", feature_map, weights)
    return weighted / (weights.flatten(1).sum(dim=1, keepdim=True) + eps)


def global_average_pool(feature_map: torch.Tensor) -> torch.Tensor:
    return feature_map.mean(dim=(2, 3))


def bilinear_pool(feature_map: torch.Tensor, part_maps: torch.Tensor) -> torch.Tensor:
    """SAM-bilinear pooling: one C-vector per part map (N x K x H x W), flattened to C*K, signed sqrt."""
    pooled = torch.einsum("nchw,nkhw->nkc", feature_map, part_maps) / feature_map[0, 0].numel()
    pooled = pooled.flatten(1)
    return torch.sign(pooled) * torch.sqrt(pooled.abs() + 1e-8)


def effective_rank(matrix: torch.Tensor) -> float:
    """exp(entropy) of the normalised singular values of an N x D matrix: about D for well-spread
    rows, 1 for rows that all point one way (a collapsed embedding)."""
    singular = torch.linalg.svdvals(matrix.float())
    p = singular / singular.sum().clamp_min(1e-12)
    return float(torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum()))
