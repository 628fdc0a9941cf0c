"""Backbones that return the last convolutional feature map phi(I) (N x C x H x W)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision import models

from lcr_core.errors import LCRError


class ResNetTrunk(nn.Module):
    """A torchvision ResNet without its pooling and classifier: conv1 ... layer4."""

    def __init__(self, arch: str):
        super().__init__()
        resnet = getattr(models, arch)(weights=None)
        self.stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4)
        self.out_channels = resnet.fc.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))


def _conv_bn_relu(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class TinyCNN(nn.Module):
    """Four strided conv stages (stride 16 overall): fast enough for tests and the 2-core demo."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128, 256)):
        super().__init__()
        stages, cin = [], 3
        for width in widths:
            stages += [_conv_bn_relu(cin, width, 2), _conv_bn_relu(width, width, 1)]
            cin = width
        self.features = nn.Sequential(*stages)
        self.out_channels = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


_BUILDERS = {
    "resnet50": lambda: ResNetTrunk("resnet50"),
    "resnet18": lambda: ResNetTrunk("resnet18"),
    "tiny": TinyCNN,
}


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Load a state_dict saved from a trunk or a full torchvision ResNet (its `fc.*` is ignored)."""
    path = Path(path)
    if not path.is_file():
        raise LCRError(f"backbone weights {path}: no such file (give a local path; s3:// URIs are fetched by the step)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a bad file
        raise LCRError(f"backbone weights {path}: not a torch state_dict ({type(err).__name__})") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    renamed = {_trunk_key(k): v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = backbone.load_state_dict(renamed, strict=False)
    if missing or unexpected:
        raise LCRError(
            f"backbone weights {path}: do not fit this backbone "
            f"({len(missing)} missing keys e.g. {missing[:1]}, {len(unexpected)} unexpected e.g. {unexpected[:1]})")


def _trunk_key(key: str) -> str:
    """torchvision ResNet names -> ResNetTrunk names (conv1/bn1 live in `stem`)."""
    key = key.removeprefix("module.")
    for index, name in ((0, "conv1."), (1, "bn1.")):
        if key.startswith(name):
            return f"stem.{index}.{key[len(name):]}"
    return key


def build_backbone(name: str, weights: str | Path | None = None) -> nn.Module:
    if name not in _BUILDERS:
        raise LCRError(f"backbone {name!r}: expected one of {', '.join(_BUILDERS)}")
    backbone = _BUILDERS[name]()
    if weights is not None:
        load_backbone_weights(backbone, weights)
    return backbone
