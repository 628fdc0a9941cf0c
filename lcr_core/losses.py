"""Losses and the maps they act on, as small pure functions (equations numbered as in the paper)."""

from __future__ import annotations

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

    `score` holds one value per image; the gradient of its sum w.r.t. phi only runs back through the
    pooling and projector (phi is where the graph is cut), never through the backbone.
    """
    (grad,) = torch.autograd.grad(score.sum(), feature_map, retain_graph=True)
    return F.relu((grad * feature_map).sum(dim=1)).detach()


def gradcam_fitting_loss(gradcam: torch.Tensor, attention: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 5-6: both maps softmax-normalised over the grid at temperature tau, then KL.

    Direction as in algorithm A1 (`kl_div(log A_bar, G_bar)`, i.e. KL(G_bar || A_bar)): the GradCAM
    is the target distribution, the branch's map the model.
    """
    log_a = F.log_softmax(attention.flatten(1) / tau, dim=1)
    g = F.softmax(gradcam.flatten(1) / tau, dim=1)
    return F.kl_div(log_a, g, reduction="batchmean")


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
