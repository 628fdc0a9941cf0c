"""Linear probe on cached features: stratified subsets, separable data, top-k accuracy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from components.features import EvaluationError, EvaluationSetup
from components.probe import probe_features
from components.shards import build_shards
from lcr_core.config import LCRConfig
from lcr_core.errors import LCRError
from lcr_core.model import build_model
from lcr_core.probe import per_class_count, stratified_subset, topk_accuracy, train_linear_probe
from tests.shard_samples import colour_source


def teacher_data(rng, n, dim, num_classes, teacher):
    """Gaussian features labelled by a fixed linear teacher: linearly separable by construction."""
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x, np.argmax(x @ teacher, axis=1)


@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.2, 0.01])
def test_subset_is_stratified_with_the_right_sizes(fraction):
    rng = np.random.default_rng(0)
    labels = np.concatenate([np.full(size, c) for c, size in enumerate([1, 2, 3, 7, 10, 25, 40])])
    labels = rng.permutation(labels)
    chosen = stratified_subset(labels, fraction, seed=3)
    assert np.array_equal(chosen, np.unique(chosen))  # sorted, no repeats
    assert chosen.min() >= 0 and chosen.max() < len(labels)
    for label in np.unique(labels):
        size = int((labels == label).sum())
        kept = int((labels[chosen] == label).sum())
        rounded_half_up = int(np.floor(fraction * size + 0.5))
        assert kept == per_class_count(size, fraction) == min(size, max(1, rounded_half_up))
        assert kept >= 1
    if fraction == 1.0:
        assert np.array_equal(chosen, np.arange(len(labels)))


def test_subset_is_reproducible_from_the_seed():
    labels = np.repeat(np.arange(20), 30)
    first = stratified_subset(labels, 0.2, seed=7)
    assert np.array_equal(first, stratified_subset(labels, 0.2, seed=7))
    assert not np.array_equal(first, stratified_subset(labels, 0.2, seed=8))
    assert len(first) == 20 * 6


@pytest.mark.parametrize("fraction", [0, -0.5, 1.01, float("nan"), "half", True])
def test_fraction_outside_the_unit_interval_is_a_one_line_error(fraction):
    with pytest.raises(LCRError) as err:
        stratified_subset(np.arange(10) % 2, fraction, seed=0)
    assert "expected a number in (0, 1]" in str(err.value) and "\n" not in str(err.value)


def test_separable_features_reach_about_100_percent():
    rng = np.random.default_rng(1)
    teacher = rng.standard_normal((24, 6))
    train_x, train_y = teacher_data(rng, 1200, 24, 6, teacher)
    test_x, test_y = teacher_data(rng, 600, 24, 6, teacher)
    # an extra feature, constant on the training set, must not break the standardisation
    train_x = np.hstack([train_x, np.full((len(train_x), 1), 3.0, dtype=np.float32)])
    test_x = np.hstack([test_x, rng.standard_normal((len(test_x), 1)).astype(np.float32)])
    before = train_x.copy()
    probe = train_linear_probe(train_x, train_y, num_classes=6, weight_decay=1e-6)
    with torch.no_grad():
        train_acc = topk_accuracy(probe(torch.from_numpy(train_x)), train_y)["top1"]
        test_acc = topk_accuracy(probe(torch.from_numpy(test_x)), test_y)["top1"]
    assert train_acc >= 0.99
    assert test_acc >= 0.95
    assert np.array_equal(train_x, before)  # the cached features are not modified
    assert not any(p.requires_grad for p in probe.parameters())


def test_well_separated_clusters_on_a_20_percent_subset():
    rng = np.random.default_rng(2)
    centres = 4.0 * rng.standard_normal((10, 32))
    labels = np.repeat(np.arange(10), 50)
    x = (centres[labels] + rng.standard_normal((500, 32))).astype(np.float32)
    subset = stratified_subset(labels, 0.2, seed=0)
    held_out = np.setdiff1d(np.arange(500), subset)
    probe = train_linear_probe(x[subset], labels[subset], num_classes=10)
    with torch.no_grad():
        assert topk_accuracy(probe(torch.from_numpy(x[held_out])), labels[held_out])["top1"] >= 0.99


def test_topk_accuracy_against_brute_force():
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((200, 9))
    targets = rng.integers(0, 9, 200)
    got = topk_accuracy(logits, targets, ks=(1, 3, 5))
    for k in (1, 3, 5):
        expected = np.mean([targets[i] in np.argsort(-logits[i])[:k] for i in range(200)])
        assert got[f"top{k}"] == pytest.approx(expected)
    assert topk_accuracy(logits[:, :3], targets % 3, ks=(5,))["top5"] == 1.0  # k above the class count


def test_labels_outside_the_classes_are_a_one_line_error():
    with pytest.raises(LCRError, match=r"labels span 0\.\.4: expected 0\.\.2"):
        train_linear_probe(np.zeros((5, 3), dtype=np.float32), np.arange(5), num_classes=3)


def test_train_and_test_splits_with_different_class_lists_are_refused_before_embedding(tmp_path):
    shards, elsewhere, cache = tmp_path / "shards", tmp_path / "elsewhere", tmp_path / "cache"
    build_shards(colour_source({"train": 6}, num_classes=3), str(shards), progress=False)
    build_shards(colour_source({"test": 4}, num_classes=4), str(elsewhere), progress=False)
    (elsewhere / "test").rename(shards / "test")  # e.g. copied in by hand, or built before builds checked
    cfg = LCRConfig(backbone="tiny", image_size=16, eval_resize=16, batch_size=4, queue_size=8, embed_dim=16,
                    projector_hidden=32, num_projections=4, shards=str(shards), loader_workers=0).validate()
    setup = EvaluationSetup(build_model(cfg).eval(), str(shards), ["gap"], batch_size=4, workers=0,
                            cache_dir=str(cache))
    with pytest.raises(EvaluationError, match=r"different class lists \(3 and 4 classes\)") as err:
        probe_features(setup)
    assert "\n" not in str(err.value)
    assert not cache.exists()  # refused before the encoder ran
