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
    FAMILIES,
    PART_EXTENT,
    PART_SLOTS,
    SyntheticDataset,
    SyntheticSpec,
    class_names,
    class_parts,
    generate,
    max_classes,
    render,
)

SMALL = SyntheticSpec(num_classes=5, train_per_class=4, test_per_class=2, image_size=48, seed=3)
# the slot nearest the head and the one nearest the rear end, per family
FRONT_AND_BACK = {"bird": ("eye", "tail"), "beetle": ("horn", "tip")}


def pixels(sample) -> np.ndarray:
    return np.asarray(sample.image, dtype=np.int16)


def test_families_are_known_and_bird_is_the_default():
    assert set(FAMILIES) == set(FRONT_AND_BACK) == {"bird", "beetle"}
    assert SyntheticSpec().family == "bird" and FAMILIES["bird"].slots is PART_SLOTS
    bird = dataclasses.replace(SMALL, family="bird")
    for split, index in (("train", 0), ("test", 3)):
        implicit, explicit = render(SMALL, split, index), render(bird, split, index)
        assert implicit.image.tobytes() == explicit.image.tobytes() and implicit.meta == explicit.meta
    beetle = dataclasses.replace(SMALL, family="beetle")
    assert render(beetle, "train", 0).image.tobytes() != render(SMALL, "train", 0).image.tobytes()
    assert set(render(beetle, "train", 0).meta["part_boxes"]) == set(FAMILIES["beetle"].slots)


def test_spec_round_trips_through_a_dict_with_its_family():
    for family in FAMILIES:
        spec = dataclasses.replace(SMALL, family=family, object_scale=(0.5, 0.6))
        options = spec.to_dict()
        assert options["family"] == family
        assert SyntheticSpec.from_options(options) == spec
    assert SyntheticSpec.from_options({"num_classes": 3}).family == "bird"  # manifests written before families


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_same_seed_split_and_index_give_identical_bytes(family):
    spec = dataclasses.replace(SMALL, family=family)
    for split, index in (("train", 0), ("train", 7), ("test", 3)):
        first, second = render(spec, split, index), render(spec, split, index, with_mask=True)
        assert first.image.tobytes() == second.image.tobytes()  # drawing the mask changes nothing else
        assert (first.key, first.label, first.meta) == (second.key, second.label, second.meta)
        assert np.array_equal(second.mask, render(spec, split, index, with_mask=True).mask)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sample_depends_only_on_seed_split_and_index(family):
    spec = dataclasses.replace(SMALL, family=family)
    # a bigger data set with the same seed renders the same image for the same index
    bigger = dataclasses.replace(spec, train_per_class=40, num_classes=5)
    assert render(spec, "train", 6).image.tobytes() == render(bigger, "train", 6).image.tobytes()
    base = render(spec, "train", 1).image.tobytes()
    assert render(spec, "train", 2).image.tobytes() != base
    assert render(spec, "test", 1).image.tobytes() != base
    assert render(dataclasses.replace(spec, seed=4), "train", 1).image.tobytes() != base


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


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_class_names_are_distinct_part_combinations(family):
    slots = FAMILIES[family].slots
    spec = SyntheticSpec(num_classes=20, num_differing_parts=3, family=family)
    names = class_names(spec)
    assert len(names) == len(set(names)) == 20
    differing = list(slots)[:3]
    assert all(name.startswith(f"{differing[0]}-") for name in names)
    combos = {tuple(parts[slot] for slot in differing) for parts in class_parts(spec)}
    assert len(combos) == 20
    for parts in class_parts(spec):  # slots beyond the differing ones are the same for every class
        assert set(parts) == set(slots)
        assert all(parts[slot] == slots[slot]["variants"][0] for slot in list(slots)[3:])
    # both families offer as many classes for each number of differing parts
    assert [max_classes(n, family) for n in range(1, 6)] == [max_classes(n) for n in range(1, 6)]


@pytest.mark.parametrize("family", [
    pytest.param("bird", marks=pytest.mark.xfail(strict=True, reason=(
        "known: the bird's crest 'fork' and breast 'bars' reach 1.35 and 1.31 part sizes from their anchors; "
        "fixing either changes the bird's images"))),
    "beetle",
])
def test_part_variants_stay_within_the_part_extent(family):
    kind = FAMILIES[family]
    for slot, table in kind.slots.items():
        for variant in table["variants"]:
            for shape, _colour in kind.part_shapes(slot, variant, 1.0):
                assert np.linalg.norm(shape, axis=1).max() <= PART_EXTENT, (slot, variant)


@pytest.mark.parametrize("family, index", [("bird", 0), ("bird", 5), ("bird", 11),
                                           ("beetle", 0), ("beetle", 5), ("beetle", 11)])
def test_classes_differ_only_inside_the_part_regions(family, index):
    spec = SyntheticSpec(num_classes=12, num_differing_parts=3, image_size=64, seed=1, part_size=0.1,
                         object_scale=(0.5, 0.7), family=family)
    differing = list(FAMILIES[family].slots)[: spec.num_differing_parts]
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


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_object_box_and_orientation_metadata(family):
    spec = SyntheticSpec(num_classes=4, train_per_class=30, image_size=64, seed=2, family=family)
    front, back = FRONT_AND_BACK[family]
    buckets = set()
    for sample in generate(spec, "train"):
        meta = sample.meta
        x0, y0, x1, y1 = meta["bbox"]
        assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
        # the test center crop (resize 64 * 256/224, crop 64) keeps the whole object
        crop = (73 - 64) / 2 * 64 / 73
        assert x0 >= crop - 1 and y0 >= crop - 1 and x1 <= 64 - crop + 1 and y1 <= 64 - crop + 1
        heading = math.radians(meta["heading_degrees"])
        head = np.array(meta["part_boxes"][front][:2]) + np.array(meta["part_boxes"][front][2:])
        tail = np.array(meta["part_boxes"][back][:2]) + np.array(meta["part_boxes"][back][2:])
        direction = (head - tail) / np.linalg.norm(head - tail)  # tail -> head, from the box centres
        assert direction @ (math.cos(heading), math.sin(heading)) > 0.9
        facing_left = meta["facing"] == "left"
        assert (meta["coarse_label"] >= 3) == facing_left
        buckets.add(meta["coarse_label"])
    assert buckets == set(range(COARSE_CLASSES))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_object_mask_covers_the_object(family):
    spec = SyntheticSpec(num_classes=12, train_per_class=2, image_size=64, seed=5, family=family)
    assert render(spec, "train", 0).mask is None  # drawn only when asked for
    shares = []
    for index in range(spec.split_size("train")):
        sample = render(spec, "train", index, with_mask=True)
        mask = sample.mask
        assert mask.dtype == bool and mask.shape == (64, 64)
        assert "mask" not in sample.meta
        x0, y0, x1, y1 = sample.meta["bbox"]
        inside = np.zeros_like(mask)
        inside[y0:y1, x0:x1] = True
        assert mask.any() and not (mask & ~inside).any()
        assert 0.15 < mask.sum() / inside.sum() < 0.6  # the object fills a fair part of its box, not all
        shares.append(mask.mean())
        # the mask is on the object: at the default contrast its pixels differ from the mean colour of
        # the box's unmasked pixels (background) far more than those pixels do (measured: 2.6x at least)
        image = pixels(sample).astype(float)
        ring = inside & ~mask
        background = image[ring].mean(axis=0)
        assert np.abs(image[mask] - background).mean() > 1.5 * np.abs(image[ring] - background).mean()
    assert 0.05 < np.mean(shares) < 0.15  # about a tenth of the image at the default object scale
    # larger images give the same object share
    big = render(dataclasses.replace(spec, image_size=192), "train", 3, with_mask=True)
    assert abs(big.mask.mean() - shares[3]) < 0.02


def test_families_have_comparable_object_shares():
    shares = {}
    for family in FAMILIES:
        spec = SyntheticSpec(num_classes=12, train_per_class=2, family=family)
        shares[family] = np.mean([render(spec, "train", i, with_mask=True).mask.mean() for i in range(24)])
    assert abs(shares["beetle"] - shares["bird"]) < 0.15 * shares["bird"], shares


def test_dataset_feeds_a_torch_dataloader():
    from torchvision import transforms as T

    dataset = SyntheticDataset(SMALL, "test", T.ToTensor())
    images, labels = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert images.shape == (4, 3, 48, 48) and labels.tolist() == [0, 1, 2, 3]
    coarse = SyntheticDataset(SMALL, "test", target=lambda s: s.meta["coarse_label"])
    assert coarse[1][1] == render(SMALL, "test", 1).meta["coarse_label"]
    beetles = SyntheticDataset(dataclasses.replace(SMALL, family="beetle"), "test", T.ToTensor())
    assert len(beetles) == len(dataset) and beetles[2][0].shape == (3, 48, 48) and beetles[2][1] == 2


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
    ("family", "fish", "one of bird, beetle"),
    ("family", 3, "one of bird, beetle"),
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
