"""Retrieval metrics against the definition (a full sort per query), with ties and singleton classes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from lcr_core.errors import LCRError
from lcr_core.metrics import (
    DEFAULT_BLOCK_BYTES,
    auto_block_size,
    chance_levels,
    reference_per_query,
    retrieval_metrics,
    retrieval_per_query,
    summarize,
)


def random_labels(rng, n, num_classes, singletons=3):
    """Class labels with a few classes of exactly one member (queries that must be excluded)."""
    labels = rng.integers(0, num_classes, n - singletons)
    return np.concatenate([labels, num_classes + np.arange(singletons)])


def clustered(rng, labels, dim, spread):
    centres = rng.standard_normal((labels.max() + 1, dim))
    return centres[labels] + spread * rng.standard_normal((len(labels), dim))


def quantised(rng, n, dim):
    """Unit vectors with four entries of +-1/2: all arithmetic is exact, so scores tie exactly and often."""
    x = np.zeros((n, dim), dtype=np.float32)
    for row in x:
        row[rng.choice(dim, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
    return x


def assert_same(fast, reference):
    np.testing.assert_array_equal(fast.included, reference.included)
    np.testing.assert_array_equal(fast.first_rank, reference.first_rank)
    np.testing.assert_allclose(fast.average_precision, reference.average_precision, atol=1e-6, rtol=0)


def test_hand_computed_tie_counts_against_the_query():
    # query 0 (class 0) scores: item 1 (class 0) = 1, item 2 (class 1) = 1 (a tie), item 3 (class 0) = 0
    x = np.array([[1.0, 0.0], [1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    y = np.array([0, 0, 1, 0])
    per_query = retrieval_per_query(x, y)
    # relevant ranks: r_1 = 1 + 1 (the tied other-class item), r_2 = 2 + 1  ->  AP = (1/2 + 2/3) / 2
    assert per_query.first_rank[0] == 2
    assert per_query.average_precision[0] == pytest.approx(7 / 12, abs=1e-12)
    assert not per_query.included[2]  # the only member of class 1


@pytest.mark.parametrize("seed", range(4))
def test_random_data_equals_reference(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(40, 160))
    labels = random_labels(rng, n, num_classes=int(rng.integers(2, 12)))
    x = rng.standard_normal((n, int(rng.integers(2, 24))))
    fast = retrieval_per_query(x, labels, block_size=int(rng.integers(1, n)))
    assert_same(fast, reference_per_query(x, labels))


@pytest.mark.parametrize("spread", [0.3, 1.0, 3.0])
def test_clustered_data_equals_reference(spread):
    rng = np.random.default_rng(7)
    labels = random_labels(rng, 150, num_classes=8)
    x = clustered(rng, labels, dim=16, spread=spread)
    assert_same(retrieval_per_query(x, labels, block_size=32), reference_per_query(x, labels))


@pytest.mark.parametrize("seed", range(3))
def test_exact_ties_equal_reference(seed):
    rng = np.random.default_rng(100 + seed)
    labels = random_labels(rng, 120, num_classes=6)
    x = quantised(rng, 120, dim=6)  # 6 dims, 4 non-zeros: every score is a multiple of 1/4
    x[10:20] = x[0]  # exact duplicates across classes too
    fast = retrieval_per_query(x, labels, block_size=int(rng.integers(1, 40)))
    reference = reference_per_query(x, labels)
    assert_same(fast, reference)
    expected = summarize(reference, ks=(1, 3, 5))
    got = retrieval_metrics(x, labels, ks=(1, 3, 5))
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == pytest.approx(expected[key], abs=1e-6)


def test_collapsed_embedding_scores_worst():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    x = np.ones((len(labels), 5), dtype=np.float32)
    per_query = retrieval_per_query(x, labels)
    for query, label in enumerate(labels):
        relevant = int((labels == label).sum()) - 1
        others = len(labels) - 1 - relevant  # all of them tie with every relevant item
        assert per_query.first_rank[query] == 1 + others
        expected_ap = np.mean([k / (k + others) for k in range(1, relevant + 1)])
        assert per_query.average_precision[query] == pytest.approx(expected_ap, abs=1e-12)
    assert retrieval_metrics(x, labels)["rank1"] == 0.0


@pytest.mark.parametrize("make", ["quantised", "float64"])
def test_block_size_does_not_change_the_result(make):
    rng = np.random.default_rng(3)
    labels = random_labels(rng, 97, num_classes=5)
    x = quantised(rng, 97, dim=7) if make == "quantised" else clustered(rng, labels, dim=12, spread=1.0)
    results = [retrieval_per_query(x, labels, block_size=size) for size in (1, 2, 13, 96, 97, 500, None)]
    for other in results[1:]:
        np.testing.assert_array_equal(other.first_rank, results[0].first_rank)
        # ranks are integers and equal; AP sums them in a block-dependent order, hence the last bit
        np.testing.assert_allclose(other.average_precision, results[0].average_precision, atol=1e-12, rtol=0)


def test_scores_equal_to_1e_6_are_ties_counted_against_the_query():
    """Scores are rounded before ranking, so that the last bits of a matrix product (which depend on
    the block's shape) cannot order near-ties differently from one block_size to the next."""
    angle = 0.5
    below = np.arccos(np.cos(angle) - 1e-9)  # an other-class item scoring 1e-9 below the relevant one
    x = np.array([[1.0, 0.0], [np.cos(angle), np.sin(angle)], [np.cos(below), -np.sin(below)]])
    labels = np.array([0, 0, 1])
    for size in (1, 3):
        assert retrieval_per_query(x, labels, block_size=size).first_rank[0] == 2
    assert reference_per_query(x, labels).first_rank[0] == 2


def test_summary_counts_and_fractions():
    rng = np.random.default_rng(11)
    labels = random_labels(rng, 60, num_classes=4, singletons=5)
    x = clustered(rng, labels, dim=8, spread=1.0)
    metrics = retrieval_metrics(x, labels, ks=(1, 2, 10))
    reference = reference_per_query(x, labels)
    assert metrics["excluded"] == 5 and metrics["queries"] == 55
    first = reference.first_rank[reference.included]
    for k in (1, 2, 10):
        assert metrics[f"rank{k}"] == pytest.approx(np.mean(first <= k), abs=1e-12)
    assert metrics["mAP"] == pytest.approx(np.nanmean(reference.average_precision), abs=1e-6)
    assert 0.0 <= metrics["rank1"] <= metrics["rank2"] <= metrics["rank10"] <= 1.0


def test_torch_input_matches_numpy_and_is_not_modified():
    rng = np.random.default_rng(5)
    labels = random_labels(rng, 50, num_classes=3)
    x = clustered(rng, labels, dim=6, spread=1.0).astype(np.float32)
    tensor = torch.from_numpy(x.copy())
    assert retrieval_metrics(tensor, torch.from_numpy(labels)) == retrieval_metrics(x, labels)
    assert torch.equal(tensor, torch.from_numpy(x))
    from_a_model = tensor.clone().requires_grad_()  # e.g. embeddings computed outside no_grad
    assert retrieval_metrics(from_a_model, labels) == retrieval_metrics(x, labels)


def test_auto_block_size_keeps_a_block_within_the_budget():
    rows = auto_block_size(100_000, torch.float32)
    assert 1 <= rows < 100_000
    assert rows * 100_000 * (4 + 8) <= DEFAULT_BLOCK_BYTES
    assert auto_block_size(50, torch.float32) == 50


@pytest.mark.parametrize("embeddings, labels, ks, message", [
    (np.ones((4, 3)), np.zeros(5, dtype=int), (1,), "labels of shape (5,)"),
    (np.ones(4), np.zeros(4, dtype=int), (1,), "expected a non-empty (N, D) array"),
    (np.full((4, 3), np.nan), np.zeros(4, dtype=int), (1,), "NaN"),
    (np.ones((4, 3)), np.zeros(4), (1,), "expected integers"),
    (np.ones((4, 3)), np.zeros(4, dtype=int), (0,), "ks = (0,)"),
    (np.ones((3, 3)), np.arange(3), (1,), "every class is a singleton"),
])
def test_bad_input_is_a_one_line_error(embeddings, labels, ks, message):
    with pytest.raises(LCRError) as err:
        retrieval_metrics(embeddings, labels, ks=ks)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_chance_levels_equal_the_average_over_all_rankings():
    labels = np.array([0, 0, 0, 1, 1, 2, 0])  # class 2 is a singleton: excluded
    n = len(labels) - 1
    hits = {1: [], 3: []}
    aps = []
    for query in np.flatnonzero(labels != 2):
        relevant = np.delete(labels == labels[query], query)
        for order in itertools.permutations(range(n)):  # every ranking of the 6 others, equally likely
            positions = np.flatnonzero(relevant[list(order)]) + 1
            aps.append(np.mean(np.arange(1, len(positions) + 1) / positions))
            for k, found in hits.items():
                found.append(positions[0] <= k)
    chance = chance_levels(labels, ks=(1, 3))
    assert chance["chance_rank1"] == pytest.approx(np.mean(hits[1]), abs=1e-12)
    assert chance["chance_rank3"] == pytest.approx(np.mean(hits[3]), abs=1e-12)
    assert chance["chance_mAP"] == pytest.approx(np.mean(aps), abs=1e-12)
