"""A short single-process run on the synthetic set: both terms of eq. 7 go down."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader
from torchvision import transforms as T

from lcr_core.augment import IMAGENET_MEAN, IMAGENET_STD, TwoCrops
from lcr_core.config import LCRConfig
from lcr_core.model import build_model
from lcr_core.synthetic import SyntheticDataset, SyntheticSpec
from lcr_core.train import build_optimizer, build_scheduler, train_step


def test_short_run_lowers_contrastive_loss_and_kl():
    torch.manual_seed(0)
    cfg = LCRConfig(backbone="tiny", image_size=48, eval_resize=48, batch_size=16, queue_size=16, embed_dim=32,
                    projector_hidden=64, num_projections=8, epochs=6, momentum=0.99, lr=0.05,
                    lr_base_batch=16, kl_weight=0.1).validate()
    # Mild augmentation, so that a few dozen steps are enough to see instance discrimination being learnt.
    views = TwoCrops(T.Compose([T.RandomResizedCrop(48, scale=(0.7, 1.0)), T.RandomHorizontalFlip(),
                                T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]))
    dataset = SyntheticDataset(SyntheticSpec(num_classes=4, train_per_class=16, image_size=48), "train", views)
    loader = DataLoader(dataset, batch_size=16, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(0))
    model = build_model(cfg)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, len(loader))
    history = []
    for _ in range(cfg.epochs):
        model.train()
        steps = [train_step(model, views_pair, optimizer, scheduler) for views_pair, _ in loader]
        history.append({key: sum(s[key] for s in steps) / len(steps) for key in ("loss_cl", "loss_kl")})
    assert history[-1]["loss_cl"] < 0.8 * history[0]["loss_cl"], history
    assert history[-1]["loss_kl"] < 0.5 * history[0]["loss_kl"], history
    assert scheduler.get_last_lr()[0] < 0.01 * cfg.scaled_lr  # the cosine schedule reached its end
