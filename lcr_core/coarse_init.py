"""A stand-in for the paper's ImageNet initialisation (DESIGN §4): supervised pretraining of a backbone
on a COARSE attribute of the synthetic imagery — the object's orientation (facing left or right, pitched
down, level or up) — never on the
fine-grained class. The backbone's state_dict is saved where `LCRConfig.backbone_weights` can point.

    .venv/bin/python -m lcr_core.coarse_init --out weights/coarse-tiny.pt --backbone tiny --epochs 10

Use a spec with another `seed` than the data set you evaluate on, so the initialisation has seen
other images of the same kind (as ImageNet has seen other birds), not the evaluation images.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import torch
from torch import nn
from torchvision import transforms as T
from tqdm.auto import tqdm

from lcr_core.augment import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from lcr_core.backbones import build_backbone
from lcr_core.errors import LCRError
from lcr_core.synthetic import COARSE_CLASSES, SyntheticDataset, SyntheticSample, SyntheticSpec


def coarse_target(sample: SyntheticSample) -> int:
    return sample.meta["coarse_label"]


def coarse_train_transform(image_size: int) -> T.Compose:
    """Crops and colour changes keep the orientation; flips would not, so there are none."""
    return T.Compose([
        T.RandomResizedCrop(image_size, scale=(0.4, 1.0)),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class CoarseClassifier(nn.Module):
    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.out_channels, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images).mean(dim=(2, 3)))


@torch.no_grad()
def accuracy(model: nn.Module, loader: torch.utils.data.DataLoader) -> float:
    model.eval()
    correct = total = 0
    for images, labels in loader:
        correct += int((model(images).argmax(dim=1) == labels).sum())
        total += len(labels)
    return correct / total


def pretrain_coarse(spec: SyntheticSpec, backbone: str, image_size: int, epochs: int, out_path: str | Path,
                    batch_size: int = 64, lr: float = 0.05, seed: int = 0, loader_workers: int = 0) -> float:
    """Train `backbone` + a linear head to predict the orientation bucket on `spec`'s train split, save
    the backbone's state_dict to `out_path`, and return the orientation accuracy on `spec`'s test split."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise LCRError(f"coarse pretraining epochs = {epochs!r}: expected an integer >= 1")
    torch.manual_seed(seed)
    model = CoarseClassifier(build_backbone(backbone), COARSE_CLASSES)
    train = torch.utils.data.DataLoader(
        SyntheticDataset(spec, "train", coarse_train_transform(image_size), target=coarse_target),
        batch_size=batch_size, shuffle=True, drop_last=spec.split_size("train") > batch_size,
        num_workers=loader_workers, generator=torch.Generator().manual_seed(seed))
    test = torch.utils.data.DataLoader(
        SyntheticDataset(spec, "test", eval_transform(image_size, round(image_size * 256 / 224)),
                         target=coarse_target),
        batch_size=batch_size, num_workers=loader_workers)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * len(train))
    loss_fn = nn.CrossEntropyLoss()
    with tqdm(total=epochs * len(train), desc=f"coarse init ({backbone})", unit="batch") as bar:
        for epoch in range(epochs):
            model.train()
            for images, labels in train:
                loss = loss_fn(model(images), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
                bar.update()
    save_weights(model.backbone.state_dict(), Path(out_path))
    return accuracy(model, test)


def save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write through a temporary file, so a crash never leaves a truncated weights file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Coarse-task (orientation) pretraining on synthetic imagery.")
    parser.add_argument("--out", type=Path, required=True, help="where to write the backbone state_dict")
    parser.add_argument("--backbone", default="tiny")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--images", type=int, default=1200, help="training images")
    parser.add_argument("--seed", type=int, default=1000, help="data seed: keep it apart from the evaluation data")
    args = parser.parse_args(argv)
    try:
        classes = SyntheticSpec().num_classes
        spec = dataclasses.replace(SyntheticSpec(), seed=args.seed, image_size=args.image_size,
                                   train_per_class=max(1, args.images // classes))
        acc = pretrain_coarse(spec, args.backbone, args.image_size, args.epochs, args.out)
    except LCRError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}; orientation accuracy on held-out images {acc:.1%} (chance {1 / COARSE_CLASSES:.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
