"""Leave-one-out retrieval metrics (DESIGN §2): rank-k and mAP by cosine similarity, exact and blocked.

Every item is a query against all the others. For a query with R same-class items ("relevant"),
sorted by score s_1 >= ... >= s_R, the k-th relevant item has rank
    r_k = k + #(other-class items scoring >= s_k)
so ties count against the query (a collapsed embedding scores worst, never best). Then
    AP = (1/R) sum_k k / r_k,        rank-k hit  <=>  r_1 <= k.
A query whose class has no other member has no defined AP: it is excluded and counted.

How it scales: queries are processed in blocks of B rows, S = Q X^T (B x N), never N x N. Queries
are visited in class order so the rows of a block share few classes. Per row, the relevant scores
are sorted (R values, not N); `searchsorted` places every other-class score among them, and a
histogram of those positions, summed from the top, gives #(other-class items >= s_k) for every k
at once. No row is ever fully sorted; the matrix product dominates the time.

Exactness: the result is exact for the similarities computed in the embeddings' dtype. Different
block sizes can change a similarity in its last bit (BLAS picks other kernels for thin matrices),
which matters only for near-ties closer than the float rounding; pass float64 embeddings to make
that vanishingly unlikely. Exact ties (duplicates, quantised embeddings) are exact in any block size.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from lcr_core.errors import LCRError

# Scores are rounded to this many decimals before ranking: a matrix product's last bits depend on the
# block's shape, and would otherwise turn near-ties into a block_size-dependent rank order.
SCORE_DECIMALS = 6
DEFAULT_BLOCK_BYTES = 1 << 30  # working memory of one block: scores + int64 positions, 12-16 bytes per entry


class MetricsError(LCRError):
    """Embeddings or labels that retrieval metrics cannot be computed on."""


@dataclass(frozen=True)
class PerQuery:
    """Per-query results in the input order; excluded (singleton-class) queries hold NaN / 0."""

    average_precision: np.ndarray  # (N,) float64, NaN where excluded
    first_rank: np.ndarray  # (N,) int64, rank of the best-scoring relevant item, 0 where excluded
    included: np.ndarray  # (N,) bool


def _as_tensors(embeddings, labels) -> tuple[torch.Tensor, torch.Tensor]:
    with warnings.catch_warnings():  # read-only numpy arrays (e.g. from Parquet) are fine: never written
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        x = torch.as_tensor(embeddings)
        y = torch.as_tensor(labels)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise MetricsError(f"embeddings of shape {tuple(x.shape)}: expected a non-empty (N, D) array")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise MetricsError(f"labels of shape {tuple(y.shape)}: expected ({x.shape[0]},), one per embedding")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise MetricsError(f"labels of dtype {y.dtype}: expected integers")
    if not x.is_floating_point():
        x = x.float()
    if not torch.isfinite(x).all():
        raise MetricsError("embeddings contain NaN or infinite values")
    return x, y.to(device=x.device, dtype=torch.int64)


def auto_block_size(num_items: int, dtype: torch.dtype, budget_bytes: int = DEFAULT_BLOCK_BYTES) -> int:
    """Rows per block so that the scores and their int64 positions fit in `budget_bytes`."""
    bytes_per_entry = torch.finfo(dtype).bits // 8 + 8
    return max(1, min(num_items, budget_bytes // (bytes_per_entry * num_items)))


def _block_ranks(scores: torch.Tensor, rows: torch.Tensor, member_cols: torch.Tensor,
                 num_relevant: torch.Tensor) -> torch.Tensor:
    """Rank r_k of every relevant item, for a block of queries.

    scores: (B, N) similarities of the block's queries to all items; modified in place.
    rows: (B,) the queries' own item indices. member_cols: (B, M) item indices of each query's class
    (itself included), padded by repeating a member. num_relevant: (B,) R per query (class size - 1).
    Returns (B, M - 1) ranks in descending score order (column k-1 holds r_k); entries >= R are padding.
    """
    block = torch.arange(scores.shape[0], device=scores.device)
    scores[block, rows] = -torch.inf  # leave-one-out: the query is not in its own gallery
    width = member_cols.shape[1]
    slot = torch.arange(width, device=scores.device)
    is_member = slot < (num_relevant + 1)[:, None]
    relevant = scores.gather(1, member_cols).masked_fill_(~is_member, torch.inf)
    # ascending: the query itself (-inf) first, then its R relevant scores, then +inf padding
    relevant = relevant.sort(dim=1).values[:, 1:].contiguous()
    scores.scatter_(1, member_cols, -torch.inf)  # what is left are the other-class items
    # position = how many relevant scores are <= the other-class score; -inf entries land at 0
    # int64 positions: scatter_add_ converts int32 indices first, which costs more than it saves
    position = torch.searchsorted(relevant, scores, right=True)
    histogram = torch.zeros(scores.shape[0], width, dtype=torch.int64, device=scores.device)
    histogram.scatter_add_(1, position, torch.ones((), dtype=torch.int64, device=scores.device)
                           .expand_as(position))
    # others_at_or_above[:, p] = #(other-class items >= p-th smallest relevant score)
    others_at_or_above = histogram.flip(1).cumsum(1).flip(1)[:, 1:]
    # p-th smallest of R relevant is the k-th largest with k = R - p; flip to descending order
    ascending_rank = (num_relevant[:, None] - slot[None, :-1]) + others_at_or_above
    descending_index = (num_relevant[:, None] - 1 - slot[None, :-1]).clamp(min=0)
    return ascending_rank.gather(1, descending_index)


@torch.no_grad()  # embeddings straight from a model may require grad: no graph of N x N products
def retrieval_per_query(embeddings, labels, block_size: int | None = None,
                        progress: bool = False) -> PerQuery:
    """AP and the rank of the first relevant item for every query (leave-one-out, cosine similarity)."""
    x, y = _as_tensors(embeddings, labels)
    n = x.shape[0]
    x = torch.nn.functional.normalize(x, dim=1)  # a zero vector stays zero: all its scores tie
    block_size = block_size or auto_block_size(n, x.dtype)
    if block_size < 1:
        raise MetricsError(f"block_size = {block_size}: expected an integer >= 1")

    order = torch.argsort(y, stable=True)  # items grouped by class
    _, class_of_item, class_sizes = torch.unique(y, return_inverse=True, return_counts=True)
    class_start = torch.cumsum(class_sizes, 0) - class_sizes
    size_of_item = class_sizes[class_of_item]
    queries = order[size_of_item[order] > 1]  # singleton classes are excluded

    average_precision = torch.full((n,), torch.nan, dtype=torch.float64)
    first_rank = torch.zeros(n, dtype=torch.int64)
    starts = range(0, queries.numel(), block_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="retrieval", unit="block")
    for start in starts:
        rows = queries[start:start + block_size]
        sizes = size_of_item[rows]
        slot = torch.arange(int(sizes.max()), device=x.device)
        within_class = torch.minimum(slot[None, :], (sizes - 1)[:, None])  # pad by repeating the last member
        member_cols = order[class_start[class_of_item[rows]][:, None] + within_class]
        num_relevant = sizes - 1
        ranks = _block_ranks((x[rows] @ x.T).round_(decimals=SCORE_DECIMALS), rows, member_cols, num_relevant)
        k = torch.arange(1, ranks.shape[1] + 1, device=x.device, dtype=torch.float64)
        valid = k[None, :] <= num_relevant[:, None]
        precision_at_hits = torch.where(valid, k[None, :] / ranks.to(torch.float64), 0.0)
        average_precision[rows.cpu()] = (precision_at_hits.sum(1) / num_relevant.to(torch.float64)).cpu()
        first_rank[rows.cpu()] = ranks[:, 0].cpu()
    included = (size_of_item > 1).cpu().numpy()
    return PerQuery(average_precision.numpy(), first_rank.numpy(), included)


def _check_ks(ks: tuple[int, ...]) -> None:
    if not ks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise MetricsError(f"ks = {tuple(ks)}: expected one or more integers >= 1")


def summarize(per_query: PerQuery, ks: tuple[int, ...] = (1, 5)) -> dict[str, float | int]:
    """rank{k} and mAP as fractions over the included queries, plus the counts."""
    _check_ks(ks)
    count = int(per_query.included.sum())
    if count == 0:
        raise MetricsError("no query has another item of its class: every class is a singleton")
    first = per_query.first_rank[per_query.included]
    result: dict[str, float | int] = {f"rank{k}": float(np.mean(first <= k)) for k in ks}
    result["mAP"] = float(np.mean(per_query.average_precision[per_query.included]))
    result["queries"] = count
    result["excluded"] = int(per_query.included.size - count)
    return result


def retrieval_metrics(embeddings, labels, ks: tuple[int, ...] = (1, 5), block_size: int | None = None,
                      progress: bool = False) -> dict[str, float | int]:
    """Leave-one-out retrieval by cosine similarity: `rank{k}` for each k, `mAP`, `queries`, `excluded`.

    embeddings: (N, D) numpy array or torch tensor (any device; not modified); labels: (N,) integers.
    block_size: query rows per block (default: as many as fit in ~1 GiB of working memory).
    """
    _check_ks(ks)  # before the expensive part
    return summarize(retrieval_per_query(embeddings, labels, block_size, progress), ks)


def reference_per_query(embeddings, labels, query_indices=None) -> PerQuery:
    """The definition, one query at a time: sort all other items, ties placed before the relevant ones.

    Slow (a full sort per query, float64); the yardstick for the tests and the benchmark, which may
    ask for some `query_indices` only (the others are then reported as excluded).
    """
    x = np.asarray(embeddings, dtype=np.float64)
    y = np.asarray(labels)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    n = len(y)
    average_precision = np.full(n, np.nan)
    first_rank = np.zeros(n, dtype=np.int64)
    for query in range(n) if query_indices is None else query_indices:
        others = np.arange(n) != query
        scores = np.round((x @ x[query])[others], SCORE_DECIMALS)
        relevant = y[others] == y[query]
        if not relevant.any():
            continue
        # descending score; among equal scores other-class items first (ties count against the query)
        ranked_relevant = relevant[np.lexsort((relevant, -scores))]
        positions = np.flatnonzero(ranked_relevant) + 1
        average_precision[query] = np.mean(np.arange(1, len(positions) + 1) / positions)
        first_rank[query] = positions[0]
    return PerQuery(average_precision, first_rank, ~np.isnan(average_precision))


def chance_levels(labels, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """`chance_rank{k}` and `chance_mAP`: expected metrics of a uniformly random ranking (no ties).

    For a query with R relevant items among n = N - 1: P(a relevant one in the top k) =
    1 - prod_{i<k} (n - R - i) / (n - i), and E[AP] = (H_n + (n - H_n)(R - 1)/(n - 1)) / n with H_n the
    n-th harmonic number (E[1{relevant at r} * precision@r] summed over r). Same exclusions as above.
    """
    _check_ks(ks)
    y = np.asarray(labels)
    _, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    relevant = (counts[inverse] - 1).astype(np.float64)
    relevant = relevant[relevant > 0]
    if relevant.size == 0:
        raise MetricsError("no query has another item of its class: every class is a singleton")
    n = float(len(y) - 1)
    result = {}
    for k in ks:
        miss = np.ones_like(relevant)
        for i in range(k):
            miss *= np.clip(n - relevant - i, 0, None) / max(n - i, 1.0)
        result[f"chance_rank{k}"] = float(np.mean(1.0 - miss))
    harmonic = float(np.sum(1.0 / np.arange(1, n + 1)))
    expected_ap = (harmonic + (n - harmonic) * (relevant - 1) / max(n - 1, 1.0)) / n
    result["chance_mAP"] = float(np.mean(expected_ap))
    return result
