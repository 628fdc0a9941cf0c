"""LCR on MoCo v2 (and BYOL): the model reads like the paper's figure 2 and algorithm A1.

`LCRModel(im_q, im_k)` is one training forward: contrastive loss (eq. 1), contrastive GradCAM
(eq. 3), GradCAM fitting branch (eq. 4), fitting loss (eq. 5-6), total loss (eq. 7); it also moves
the key encoder and the queue. `LCRModel.embed` is the inference embedding (eq. 8).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from lcr_core import distributed, losses
from lcr_core.backbones import build_backbone
from lcr_core.config import LCRConfig


class GradCAMFittingBranch(nn.Module):
    """Eq. 4: A[i,j] = max_k w_k . phi[i,j], K 1x1 projections (optionally BN+ReLU) and a max-out."""

    def __init__(self, in_channels: int, num_projections: int, bn_relu: bool = False):
        super().__init__()
        self.projections = nn.Conv2d(in_channels, num_projections, kernel_size=1, bias=False)
        self.bn_relu = (nn.Sequential(nn.BatchNorm2d(num_projections), nn.ReLU(inplace=True))
                        if bn_relu else nn.Identity())

    def projection_maps(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.bn_relu(self.projections(feature_map))

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.projection_maps(feature_map).amax(dim=1)


class MLPFittingBranch(nn.Module):
    """The §4.6 alternative: a two-layer per-location MLP (32 hidden units) instead of the max-out."""

    def __init__(self, in_channels: int, hidden: int):
        super().__init__()
        self.projections = nn.Conv2d(in_channels, hidden, kernel_size=1)
        self.output = nn.Conv2d(hidden, 1, kernel_size=1)

    def projection_maps(self, feature_map: torch.Tensor) -> torch.Tensor:
        return F.relu(self.projections(feature_map))

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.output(self.projection_maps(feature_map)).squeeze(1)


def build_projector(kind: str, in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    if kind == "bn3":  # paper §4.1
        return nn.Sequential(
            nn.Linear(in_dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, out_dim, bias=False), nn.BatchNorm1d(out_dim, affine=False),
        )
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))


class SplitBatchNorm(nn.BatchNorm2d):
    """BN whose training statistics come from `num_splits` groups of the batch, as if on that many
    devices: together with shuffled keys it keeps one process from leaking batch information."""

    def __init__(self, num_features: int, num_splits: int):
        super().__init__(num_features)
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.num_splits == 1:
            return super().forward(x)
        n, c, h, w = x.shape
        mean = self.running_mean.repeat(self.num_splits)
        var = self.running_var.repeat(self.num_splits)
        out = F.batch_norm(x.view(-1, c * self.num_splits, h, w), mean, var,
                           self.weight.repeat(self.num_splits), self.bias.repeat(self.num_splits),
                           True, self.momentum, self.eps).view(n, c, h, w)
        self.running_mean.copy_(mean.view(self.num_splits, c).mean(dim=0))
        self.running_var.copy_(var.view(self.num_splits, c).mean(dim=0))
        return out


def use_split_batchnorm(module: nn.Module, num_splits: int) -> nn.Module:
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            split = SplitBatchNorm(child.num_features, num_splits)
            split.load_state_dict(child.state_dict())
            setattr(module, name, split)
        else:
            use_split_batchnorm(child, num_splits)
    return module


class Encoder(nn.Module):
    """Backbone -> (GradCAM fitting branch) -> pooling -> projector."""

    def __init__(self, cfg: LCRConfig):
        super().__init__()
        self.backbone = build_backbone(cfg.backbone, cfg.backbone_weights)
        channels = self.backbone.out_channels
        self.gfb: nn.Module | None = None
        if cfg.variant == "lcr-mlp":
            self.gfb = MLPFittingBranch(channels, cfg.gfb_mlp_hidden)
        elif cfg.uses_gfb:
            self.gfb = GradCAMFittingBranch(channels, cfg.gfb_projections, cfg.gfb_bn_relu)
        pooled = channels * cfg.gfb_projections if cfg.train_pooling == "bilinear" else channels
        self.projector = build_projector(cfg.projector, pooled, cfg.projector_hidden, cfg.embed_dim)
        if cfg.bn_splits > 1:
            use_split_batchnorm(self.backbone, cfg.bn_splits)

    def pool(self, feature_map: torch.Tensor, attention: torch.Tensor | None, pooling: str) -> torch.Tensor:
        if pooling == "gap":
            return losses.global_average_pool(feature_map)
        if self.gfb is None:
            raise ValueError(f"pooling {pooling!r} needs a GradCAM fitting branch; this variant has none")
        if pooling == "attention":
            return losses.weighted_average_pool(feature_map, losses.normalize_attention(attention))
        if pooling == "bilinear":
            return losses.bilinear_pool(feature_map, self.gfb.projection_maps(feature_map))
        raise ValueError(f"pooling {pooling!r}: expected gap, attention or bilinear")

    def forward(self, images: torch.Tensor, pooling: str):
        """Returns the feature map phi, the branch's map A (or None) and the projection z."""
        feature_map = self.backbone(images)
        attention = self.gfb(feature_map) if self.gfb is not None else None
        return feature_map, attention, self.projector(self.pool(feature_map, attention, pooling))


class LCRModel(nn.Module):
    def __init__(self, cfg: LCRConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder_q = Encoder(cfg)
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for param in self.encoder_k.parameters():
            param.requires_grad = False
        if cfg.is_byol:
            self.predictor = nn.Sequential(  # BYOL's predictor q_theta
                nn.Linear(cfg.embed_dim, cfg.projector_hidden), nn.BatchNorm1d(cfg.projector_hidden),
                nn.ReLU(inplace=True), nn.Linear(cfg.projector_hidden, cfg.embed_dim))
        else:
            self.register_buffer("queue", F.normalize(torch.randn(cfg.embed_dim, cfg.queue_size), dim=0))
            self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    # --- momentum machinery (MoCo) -------------------------------------------------------------
    @torch.no_grad()
    def _momentum_update_key_encoder(self) -> None:
        m = self.cfg.momentum
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.mul_(m).add_(param_q.detach(), alpha=1 - m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys: torch.Tensor) -> None:
        keys = distributed.concat_all_gather(keys)
        ptr = int(self.queue_ptr)
        self.queue[:, ptr:ptr + keys.shape[0]] = keys.T  # the queue is a multiple of the global batch
        self.queue_ptr[0] = (ptr + keys.shape[0]) % self.queue.shape[1]

    @torch.no_grad()
    def _keys(self, images: torch.Tensor) -> torch.Tensor:
        """Key projections computed on a batch shuffled across ranks (shuffle-BN), then unshuffled."""
        shuffled, inverse = distributed.batch_shuffle(images)
        _, _, k = self.encoder_k(shuffled, self.cfg.train_pooling)
        return distributed.batch_unshuffle(F.normalize(k, dim=1), inverse)

    # --- the objective -------------------------------------------------------------------------
    def _gradcam_score(self, per_sample_objective: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
        """The score S whose GradCAM is fitted (DESIGN §1): the positive logit, log p(positive), or the loss."""
        source = self.cfg.gradcam_source
        if source == "positive_logit":
            return positive
        return per_sample_objective if source == "loss" else -per_sample_objective

    def _fitting_loss(self, feature_map, attention, per_sample_objective, positive) -> torch.Tensor:
        if not self.cfg.fits_gradcam:
            return feature_map.new_zeros(())
        gradcam = losses.contrastive_gradcam(feature_map, self._gradcam_score(per_sample_objective, positive))
        return losses.gradcam_fitting_loss(gradcam, attention, self.cfg.kl_temperature)

    def _moco_losses(self, im_q: torch.Tensor, k: torch.Tensor):
        feature_map, attention, q = self.encoder_q(im_q, self.cfg.train_pooling)
        logits = losses.info_nce_logits(F.normalize(q, dim=1), k, self.queue.clone().detach(), self.cfg.temperature)
        per_sample = losses.info_nce(logits)
        loss_kl = self._fitting_loss(feature_map, attention, per_sample, logits[:, 0])
        return per_sample.mean(), loss_kl

    def _byol_losses(self, im_online: torch.Tensor, target: torch.Tensor):
        feature_map, attention, z = self.encoder_q(im_online, self.cfg.train_pooling)
        prediction = self.predictor(z)
        per_sample = losses.byol_loss(prediction, target)
        cosine = 1 - per_sample / 2
        return per_sample.mean(), self._fitting_loss(feature_map, attention, per_sample, cosine)

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            self._momentum_update_key_encoder()
            k = self._keys(im_k)
        if self.cfg.is_byol:  # symmetric: each view predicts the other's target projection
            k_of_q = self._keys(im_q)
            cl_a, kl_a = self._byol_losses(im_q, k)
            cl_b, kl_b = self._byol_losses(im_k, k_of_q)
            loss_cl, loss_kl = cl_a + cl_b, (kl_a + kl_b) / 2
        else:
            loss_cl, loss_kl = self._moco_losses(im_q, k)
            self._dequeue_and_enqueue(k)
        loss = self.cfg.cl_weight * loss_cl + self.cfg.kl_weight * loss_kl  # eq. 7
        return {"loss": loss, "loss_cl": loss_cl.detach(), "loss_kl": loss_kl.detach()}

    # --- inference -----------------------------------------------------------------------------
    def attention_map(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        feature_map = self.encoder_q.backbone(images)
        gfb = self.encoder_q.gfb
        return feature_map, (gfb(feature_map) if gfb is not None else None)

    def embeddings(self, images: torch.Tensor, poolings: list[str]) -> dict[str, torch.Tensor]:
        """Eq. 8 (or GAP / bilinear) for each pooling from one backbone pass: features pooled and
        L2-normalised; the projector is not used. Call in eval mode, so that each image's embedding is
        independent of its batch."""
        feature_map, attention = self.attention_map(images)
        return {p: F.normalize(self.encoder_q.pool(feature_map, attention, p), dim=1) for p in poolings}

    def embed(self, images: torch.Tensor, pooling: str | None = None) -> torch.Tensor:
        pooling = pooling or self.cfg.test_pooling
        return self.embeddings(images, [pooling])[pooling]

    def gradcam(self, im_q: torch.Tensor, im_k: torch.Tensor) -> torch.Tensor:
        """The contrastive GradCAM G of eq. 3 for a pair of views, without moving the key encoder or
        the queue (for reports). Uses the configured `gradcam_source`."""
        with torch.enable_grad():
            feature_map, _, z = self.encoder_q(im_q, self.cfg.train_pooling)
            k = self._keys(im_k)
            if self.cfg.is_byol:
                per_sample = losses.byol_loss(self.predictor(z), k)
                positive = 1 - per_sample / 2
            else:
                logits = losses.info_nce_logits(F.normalize(z, dim=1), k, self.queue, self.cfg.temperature)
                per_sample = losses.info_nce(logits)
                positive = logits[:, 0]
            return losses.contrastive_gradcam(feature_map, self._gradcam_score(per_sample, positive))


def build_model(cfg: LCRConfig) -> LCRModel:
    return LCRModel(cfg)
