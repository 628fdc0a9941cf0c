"""The synthetic fine-grained generator (DESIGN §4) and the coarse-task initialisation."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from lcr_core.backbones import build_backbone
from lcr_core.coarse_init import pretrain_coarse
from lcr_core.errors import LCRError
from lcr_core.synthetic import (
    COARSE_CLASSES,
    PART_SLOTS,
    SyntheticDataset,
    SyntheticSpec,
    class_names,
    class_parts,
    generate,
    render,
)

SMALL = SyntheticSpec(num_classes=5, train_per_class=4, test_per_class=2, image_size=48, seed=3)


def pixels(sample) -> np.ndarray:
    return np.asarray(sample.image, dtype=np.int16)


def test_same_seed_split_and_index_give_identical_bytes():
    for split, index in (("train", 0), ("train", 7), ("test", 3)):
        first, second = render(SMALL, split, index), render(SMALL, split, index)
        assert first.image.tobytes() == second.image.tobytes()
        assert (first.key, first.label, first.meta) == (second.key, second.label, second.meta)


def test_sample_depends_only_on_seed_split_and_index():
    # a bigger data set with the same seed renders the same image for the same index
    bigger = dataclasses.replace(SMALL, train_per_class=40, num_classes=5)
    assert render(SMALL, "train", 6).image.tobytes() == render(bigger, "train", 6).image.tobytes()
    base = render(SMALL, "train", 1).image.tobytes()
    assert render(SMALL, "train", 2).image.tobytes() != base
    assert render(SMALL, "test", 1).image.tobytes() != base
    assert render(dataclasses.replace(SMALL, seed=4), "train", 1).image.tobytes() != base


def test_split_sizes_labels_and_keys():
    for split, per_class in (("train", SMALL.train_per_class), ("test", SMALL.test_per_class)):
        samples = list(generate(SMALL, split))
        assert len(samples) == SMALL.split_size(split) == SMALL.num_classes * per_class
        assert len(SyntheticDataset(SMALL, split)) == len(samples)
        labels = [s.label for s in samples]
        assert all(isinstance(label, int) and 0 <= label < SMALL.num_classes for label in labels)
        assert np.bincount(labels).tolist() == [per_class] * SMALL.num_classes
        keys = [s.key for s in samples]
        assert len(set(keys)) == len(keys)
        assert all("." not in key and key.startswith(f"syn-{split}-") for key in keys)
        for sample in samples:
            assert sample.image.mode == "RGB" and sample.image.size == (48, 48)
            assert sample.meta["class_name"] == class_names(SMALL)[sample.label]
            assert 0 <= sample.meta["coarse_label"] < COARSE_CLASSES


def test_class_names_are_distinct_part_combinations():
    spec = SyntheticSpec(num_classes=20, num_differing_parts=3)
    names = class_names(spec)
    assert len(names) == len(set(names)) == 20
    differing = list(PART_SLOTS)[:3]
    combos = {tuple(parts[slot] for slot in differing) for parts in class_parts(spec)}
    assert len(combos) == 20
    for parts in class_parts(spec):  # slots beyond the differing ones are the same for every class
        assert all(parts[slot] == PART_SLOTS[slot]["variants"][0] for slot in list(PART_SLOTS)[3:])


@pytest.mark.parametrize("index", [0, 5, 11])
def test_classes_differ_only_inside_the_part_regions(index):
    spec = SyntheticSpec(num_classes=12, num_differing_parts=3, image_size=64, seed=1, part_size=0.1,
                         object_scale=(0.5, 0.7))
    differing = list(PART_SLOTS)[: spec.num_differing_parts]
    reference = render(spec, "train", index, label=0)
    allowed = np.zeros((64, 64), dtype=bool)
    for slot in differing:
        x0, y0, x1, y1 = reference.meta["part_boxes"][slot]
        allowed[y0:y1, x0:x1] = True
    assert allowed.mean() < 0.25  # the parts are small next to the image
    x0, y0, x1, y1 = reference.meta["bbox"]
    inside_object = np.zeros_like(allowed)
    inside_object[y0:y1, x0:x1] = True
    for label in range(1, spec.num_classes):
        other = render(spec, "train", index, label=label)
        assert {k: v for k, v in other.meta.items() if k != "class_name"} == \
               {k: v for k, v in reference.meta.items() if k != "class_name"}
        changed = (pixels(other) != pixels(reference)).any(axis=2)
        assert changed.any(), f"class {label} renders exactly like class 0"
        assert not (changed & ~allowed).any(), f"class {label} changes pixels outside the part regions"
        assert not (changed & ~inside_object).any()


def test_object_box_and_orientation_metadata():
    spec = SyntheticSpec(num_classes=4, train_per_class=30, image_size=64, seed=2)
    buckets = set()
    for sample in generate(spec, "train"):
        meta = sample.meta
        x0, y0, x1, y1 = meta["bbox"]
        assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
        # the test center crop (resize 64 * 256/224, crop 64) keeps the whole object
        crop = (73 - 64) / 2 * 64 / 73
        assert x0 >= crop - 1 and y0 >= crop - 1 and x1 <= 64 - crop + 1 and y1 <= 64 - crop + 1
        heading = math.radians(meta["heading_degrees"])
        beak = np.array(meta["part_boxes"]["eye"][:2]) + np.array(meta["part_boxes"]["eye"][2:])
        tail = np.array(meta["part_boxes"]["tail"][:2]) + np.array(meta["part_boxes"]["tail"][2:])
        direction = (beak - tail) / np.linalg.norm(beak - tail)  # tail -> head, from the box centres
        assert direction @ (math.cos(heading), math.sin(heading)) > 0.9
        facing_left = meta["facing"] == "left"
        assert (meta["coarse_label"] >= 3) == facing_left
        buckets.add(meta["coarse_label"])
    assert buckets == set(range(COARSE_CLASSES))


def test_dataset_feeds_a_torch_dataloader():
    from torchvision import transforms as T

    dataset = SyntheticDataset(SMALL, "test", T.ToTensor())
    images, labels = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert images.shape == (4, 3, 48, 48) and labels.tolist() == [0, 1, 2, 3]
    coarse = SyntheticDataset(SMALL, "test", target=lambda s: s.meta["coarse_label"])
    assert coarse[1][1] == render(SMALL, "test", 1).meta["coarse_label"]


@pytest.mark.parametrize("field, value, expected", [
    ("num_classes", 1, "at least 2"),
    ("num_classes", 30, "at most 20 with num_differing_parts=2"),
    ("train_per_class", 0, "an integer >= 1"),
    ("image_size", 8, "at least 16"),
    ("seed", -1, "an integer >= 0"),
    ("num_differing_parts", 9, "at most 5"),
    ("part_size", 0.5, "[0.03, 0.2]"),
    ("clutter_density", -1.0, "[0, 5]"),
    ("clutter_contrast", 1.5, "[0, 1]"),
    ("background_variety", -0.1, "[0, 1]"),
    ("object_scale", (0.7, 0.3), "low <= high"),
    ("max_tilt", 90.0, "[0, 60]"),
    ("part_size", "big", "a number"),
    ("object_scale", 0.5, "a pair"),
])
def test_spec_validation_names_field_and_expectation(field, value, expected):
    values = {"num_differing_parts": 2, "num_classes": 12} | {field: value}
    with pytest.raises(LCRError) as info:
        SyntheticSpec(**values)
    message = str(info.value)
    assert "\n" not in message and f"'{field}'" in message and expected in message


def test_bad_split_index_and_label_are_one_line_errors():
    for call in (lambda: render(SMALL, "val", 0), lambda: render(SMALL, "train", 20),
                 lambda: render(SMALL, "train", 0, label=5), lambda: SyntheticDataset(SMALL, "dev")):
        with pytest.raises(LCRError) as info:
            call()
        assert "\n" not in str(info.value)


def test_coarse_init_writes_loadable_backbone_weights(tmp_path):
    spec = SyntheticSpec(num_classes=4, train_per_class=8, test_per_class=4, image_size=32)
    out = tmp_path / "weights" / "coarse.pt"
    accuracy = pretrain_coarse(spec, "tiny", image_size=32, epochs=1, out_path=out, batch_size=16)
    assert 0.0 <= accuracy <= 1.0
    state = torch.load(out, weights_only=True)
    reference = build_backbone("tiny").state_dict()
    assert state.keys() == reference.keys()
    loaded = build_backbone("tiny", weights=out)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, state[name])
    assert not all(torch.equal(state[k], reference[k]) for k in reference if k.endswith("weight"))
    assert not list(tmp_path.glob("weights/*.partial"))
