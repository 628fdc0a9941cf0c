"""Benchmark of `lcr_core.metrics.retrieval_metrics` (issue 5).

    .venv/bin/python benchmarks/retrieval.py --size cub     # N = 5,794, d = 2,048 (CUB's test set)
    .venv/bin/python benchmarks/retrieval.py --size large   # N = 100,000 in blocks, with peak memory

`cub` times the blocked metrics against (a) the definition, one full sort per query
(`reference_per_query`), run on a random subset of queries and extrapolated to all N, with the
per-query results compared; and (b) the bare N x N matrix product of the normalised embeddings,
the least any exact method must do. `large` times N = 100,000 and reports the process's peak
resident memory (embeddings included). Embeddings are clustered Gaussians in float32.
Each time is given as wall-clock seconds and as the process's CPU seconds: on a shared machine the
CPU seconds divided by the threads used estimate what an idle machine's wall clock would show.
Goals: >= 50x faster than the reference with identical metrics, <= 1.5x the bare product,
N = 100k in <= 20 min and <= 4 GB.
"""

from __future__ import annotations

import argparse
import resource
import time
from dataclasses import dataclass

import numpy as np
import torch

from lcr_core.metrics import reference_per_query, retrieval_metrics, retrieval_per_query

GIB = 1 << 30
NOISE = 5.0  # relative to the class centres: rank-1 / mAP land near the paper's CUB figures (~0.5 / ~0.2)


def clustered_embeddings(n: int, dim: int, num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 class centres plus noise, written in chunks so that nothing bigger than N x d is allocated."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    centres = rng.standard_normal((num_classes, dim), dtype=np.float32)
    x = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 10_000):
        stop = min(n, start + 10_000)
        x[start:stop] = centres[labels[start:stop]] + NOISE * rng.standard_normal((stop - start, dim),
                                                                                    dtype=np.float32)
    return x, labels


@dataclass
class Timing:
    wall: float  # seconds
    cpu: float  # CPU seconds of all threads: on a busy shared machine, cpu / threads estimates idle wall time

    def __str__(self) -> str:
        return f"{self.wall:8.2f} s wall, {self.cpu:8.2f} s CPU"


def timed(fn) -> tuple[Timing, object]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return Timing(time.perf_counter() - wall, time.process_time() - cpu), result


def best_of(timings: list[Timing]) -> Timing:
    return Timing(min(t.wall for t in timings), min(t.cpu for t in timings))


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # ru_maxrss is in KiB on Linux


def bare_product(x: torch.Tensor) -> torch.Tensor:
    x = torch.nn.functional.normalize(x, dim=1)
    return x @ x.T


def compare(fast, reference, queries: np.ndarray) -> str:
    same = np.array_equal(fast.first_rank[queries], reference.first_rank[queries])
    ap_diff = np.abs(fast.average_precision[queries] - reference.average_precision[queries]).max()
    return f"first ranks identical = {same}, max |AP difference| = {ap_diff:.1e}"


def bench_cub(args) -> None:
    n = 5_794
    x, labels = clustered_embeddings(n, args.dim, num_classes=200, seed=args.seed)
    tensor = torch.from_numpy(x)
    print(f"N = {n}, d = {args.dim}, 200 classes, float32, torch threads = {torch.get_num_threads()}")

    bare_product(tensor[:512])  # warm the BLAS threads up
    bare, fast = [], []
    for _ in range(args.repeats):  # interleaved, so that a burst of load on a shared machine hits both
        bare.append(timed(lambda: bare_product(tensor))[0])
        timing, per_query = timed(lambda: retrieval_per_query(tensor, labels, args.block_size))
        fast.append(timing)
    bare, fast = best_of(bare), best_of(fast)

    queries = np.random.default_rng(args.seed).choice(n, args.naive_queries, replace=False)
    naive, reference = timed(lambda: reference_per_query(x, labels, query_indices=queries))
    naive = Timing(naive.wall * n / len(queries), naive.cpu * n / len(queries))

    print(f"metrics: {retrieval_metrics(tensor, labels, block_size=args.block_size)}")
    print(f"bare N x N product (normalise + X X^T), best of {args.repeats}: {bare}")
    print(f"blocked retrieval_metrics, best of {args.repeats}:            {fast}"
          f"   = {fast.wall / bare.wall:.2f} x (wall), {fast.cpu / bare.cpu:.2f} x (CPU) the bare product"
          " (goal <= 1.5)")
    print(f"reference (a full sort per query, float64), {len(queries)} queries extrapolated to {n}: {naive}"
          f"   speed-up {naive.wall / fast.wall:.0f} x (wall), {naive.cpu / fast.cpu:.0f} x (CPU)"
          " (goal >= 50)")
    print(f"on those {len(queries)} queries, float32 input: {compare(per_query, reference, queries)}")
    in_float64 = retrieval_per_query(tensor.double(), labels, args.block_size)
    print(f"on those {len(queries)} queries, float64 input: {compare(in_float64, reference, queries)}")


def bench_large(args) -> None:
    n = args.large_n
    x, labels = clustered_embeddings(n, args.dim, num_classes=args.large_classes, seed=args.seed)
    print(f"N = {n}, d = {args.dim}, {args.large_classes} classes, float32, "
          f"torch threads = {torch.get_num_threads()}; embeddings alone {x.nbytes / GIB:.2f} GiB")
    before = peak_rss_gib()
    timing, metrics = timed(lambda: retrieval_metrics(x, labels, block_size=args.block_size, progress=True))
    print(f"metrics: {metrics}")
    print(f"time: {timing} (goal <= 1200 s); peak RSS {peak_rss_gib():.2f} GiB "
          f"(before the call {before:.2f} GiB; goal <= 4)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("cub", "large", "all"), default="cub")
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--large-n", type=int, default=100_000)
    parser.add_argument("--large-classes", type=int, default=1_010, help="iNaturalist 2019 has 1,010")
    parser.add_argument("--naive-queries", type=int, default=300, help="queries the reference is timed on")
    parser.add_argument("--block-size", type=int, default=None, help="default: fit ~1 GiB per block")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.size in ("cub", "all"):
        bench_cub(args)
    if args.size in ("large", "all"):
        bench_large(args)


if __name__ == "__main__":
    main()
