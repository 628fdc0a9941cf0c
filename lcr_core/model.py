"""LCR on MoCo v2 (and BYOL): the model reads like the paper's figure 2 and algorithm A1.

`LCRModel(im_q, im_k)` is one training forward: contrastive loss (eq. 1), contrastive GradCAM
(eq. 3), GradCAM fitting branch (eq. 4), fitting loss (eq. 5-6), total loss (eq. 7); it also moves
the key encoder and the queue. `LCRModel.embed` is the inference embedding (eq. 8).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

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
    if kind == "mocov2":
        return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))
    raise ValueError(f"projector {kind!r}: expected bn3 or mocov2")


def with_constant_batch_statistics(head: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """`head(x)` with the same values, but every train-mode BatchNorm normalises with this batch's
    statistics held constant, so that each output row is a function of its own input row alone.

    Eq. 3 is a per-image gradient. Through the batch statistics of a train-mode BN each image's score
    depends on every other image's features, which changed GradCAM by 21-80 % at batch 64-8."""
    for layer in head:
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.training:
            dims = [0, *range(2, x.dim())]
            mean = x.mean(dim=dims).detach()
            var = x.var(dim=dims, unbiased=False).detach()
            x = F.batch_norm(x, mean, var, layer.weight, layer.bias, False, 0.0, layer.eps)
        else:
            x = layer(x)
    return x


def as_is(head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return head(x)


class SplitBatchNorm(nn.BatchNorm2d):
    """BN whose training statistics come from `num_splits` groups of the batch, as if on that many
    devices: together with shuffled keys it keeps one process from leaking batch information."""

    def __init__(self, num_features: int, num_splits: int, eps: float = 1e-5, momentum: float | None = 0.1):
        super().__init__(num_features, eps=eps, momentum=momentum)
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
            split = SplitBatchNorm(child.num_features, num_splits, child.eps, child.momentum)
            split.load_state_dict(child.state_dict())
            split.requires_grad_(child.weight.requires_grad)  # a frozen stage stays frozen
            setattr(module, name, split)
        else:
            use_split_batchnorm(child, num_splits)
    return module


@dataclass
class EncoderOutput:
    feature_map: torch.Tensor  # phi(I), N x C x H x W
    attention: torch.Tensor | None  # the branch's map A (eq. 4), N x H x W, or None without a branch
    pooled: torch.Tensor  # N x C (C*K bilinear)
    projection: torch.Tensor  # z, N x embed_dim


class Encoder(nn.Module):
    """Backbone -> (GradCAM fitting branch) -> pooling -> projector."""

    def __init__(self, cfg: LCRConfig):
        super().__init__()
        self.backbone = build_backbone(cfg.backbone, cfg.backbone_weights, cfg.freeze_stages)
        channels = self.backbone.out_channels
        self.gfb: nn.Module | None = None
        if cfg.variant == "lcr-mlp":
            self.gfb = MLPFittingBranch(channels, cfg.gfb_mlp_hidden)
        elif cfg.uses_gfb:  # the authors' bilinear pooling takes BN+ReLU'd part maps
            bn_relu = cfg.gfb_bn_relu or cfg.train_pooling == "bilinear"
            self.gfb = GradCAMFittingBranch(channels, cfg.gfb_projections, bn_relu)
        self.stop_gradient = cfg.gfb_stop_gradient
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

    def forward(self, images: torch.Tensor, pooling: str) -> EncoderOutput:
        feature_map = self.backbone(images)
        attention = None
        if self.gfb is not None:
            attention = self.gfb(feature_map.detach() if self.stop_gradient else feature_map)
        pooled = self.pool(feature_map, attention, pooling)
        return EncoderOutput(feature_map, attention, pooled, self.projector(pooled))


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
        k = self.encoder_k(shuffled, self.cfg.train_pooling).projection
        return distributed.batch_unshuffle(F.normalize(k, dim=1), inverse)

    # --- the objective -------------------------------------------------------------------------
    def _per_sample_objective(self, projection: torch.Tensor, target: torch.Tensor, queue: torch.Tensor | None,
                              head=as_is) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, positive score) of each image: InfoNCE (eq. 1) and q.k, or BYOL's regression loss and
        cos(p, z'). `head` runs BYOL's predictor (as it is, or with constant batch statistics)."""
        if self.cfg.is_byol:
            loss = losses.byol_loss(head(self.predictor, projection), target)
            return loss, 1 - loss / 2
        q = F.normalize(projection, dim=1)
        logits = losses.info_nce_logits(q, target, queue, self.cfg.temperature)
        return losses.info_nce(logits), (q * target).sum(dim=1)  # A1 differentiates q.k, not q.k / t

    def _gradcam_score(self, loss: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
        """The score S whose GradCAM is fitted (DESIGN §1): the positive logit, log p(positive), or the loss."""
        source = self.cfg.gradcam_source
        if source == "positive_logit":
            return positive
        if source == "log_prob":
            return -loss
        if source == "loss":
            return loss
        raise ValueError(f"gradcam_source {source!r}: expected positive_logit, log_prob or loss")

    def _contrastive_gradcam(self, out: EncoderOutput, target: torch.Tensor, queue: torch.Tensor | None,
                             loss: torch.Tensor) -> torch.Tensor:
        """Eq. 3 per image, through the projector with its batch statistics held constant. The
        released-code preset takes it of the batch-mean loss, through the coupled BN, as that code does."""
        if self.cfg.fitting_preset == "released-code":
            return losses.contrastive_gradcam(out.feature_map, loss.mean())
        projection = with_constant_batch_statistics(self.encoder_q.projector, out.pooled)
        per_image = self._per_sample_objective(projection, target, queue, head=with_constant_batch_statistics)
        return losses.contrastive_gradcam(out.feature_map, self._gradcam_score(*per_image))

    def _fitting_terms(self, out: EncoderOutput, target: torch.Tensor, queue: torch.Tensor | None,
                       loss: torch.Tensor) -> dict[str, torch.Tensor]:
        """The fitting loss (eq. 5-6) and how the fit stands: the target's and A's distance from a
        flat map, and the KL left relative to what a flat A would score (1 = no fit at all)."""
        cfg = self.cfg
        gradcam = self._contrastive_gradcam(out, target, queue, loss)
        if cfg.fitting_preset == "released-code":
            log_g, log_a = losses.released_code_distributions(gradcam, out.attention)
        else:
            log_g = losses.grid_log_softmax(losses.normalize_gradcam(gradcam, cfg.gradcam_normalize),
                                            cfg.kl_temperature)
            log_a = losses.grid_log_softmax(out.attention, cfg.kl_temperature)
        kl = losses.kl_per_image(log_g, log_a)
        with torch.no_grad():
            target_spread = losses.kl_from_uniform(log_g).mean()
            diagnostics = {"gradcam_kl_uniform": target_spread,
                           "attention_kl_uniform": losses.kl_from_uniform(log_a).mean(),
                           "kl_fit_ratio": kl.mean() / target_spread.clamp_min(1e-12)}
        return {"loss_kl": losses.reduce_over_batch(kl, cfg.kl_reduction), **diagnostics}

    def _terms(self, images: torch.Tensor, target: torch.Tensor, queue: torch.Tensor | None) -> dict[str, torch.Tensor]:
        out = self.encoder_q(images, self.cfg.train_pooling)
        loss, _ = self._per_sample_objective(out.projection, target, queue)
        terms = {"loss_cl": loss.mean()}
        if self.cfg.fits_gradcam:
            return terms | self._fitting_terms(out, target, queue, loss)
        return terms | {"loss_kl": loss.new_zeros(())}

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            self._momentum_update_key_encoder()
            k = self._keys(im_k)
        if self.cfg.is_byol:  # symmetric: each view predicts the other's target projection
            first, second = self._terms(im_q, k, None), self._terms(im_k, self._keys(im_q), None)
            terms = {name: (first[name] + second[name]) / 2 for name in first}
            terms["loss_cl"] = first["loss_cl"] + second["loss_cl"]
        else:
            terms = self._terms(im_q, k, self.queue.clone().detach())
            self._dequeue_and_enqueue(k)
        loss = self.cfg.cl_weight * terms["loss_cl"] + self.cfg.kl_weight * terms["loss_kl"]  # eq. 7
        return {"loss": loss} | {name: value.detach() for name, value in terms.items()}

    @torch.no_grad()
    def embedding_effective_rank(self) -> float | None:
        """The queue's effective rank (keys of the last Q images): a collapse shows as a small one.
        None for BYOL, which keeps no queue."""
        return None if self.cfg.is_byol else losses.effective_rank(self.queue.T)

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
        """The contrastive GradCAM G of eq. 3 for a pair of views, as training computes it, without
        moving the key encoder or the queue (for reports and diagnostics)."""
        with torch.enable_grad():
            out = self.encoder_q(im_q, self.cfg.train_pooling)
            k = self._keys(im_k)
            queue = None if self.cfg.is_byol else self.queue
            loss, _ = self._per_sample_objective(out.projection, k, queue)
            return self._contrastive_gradcam(out, k, queue, loss)


def build_model(cfg: LCRConfig) -> LCRModel:
    return LCRModel(cfg)
