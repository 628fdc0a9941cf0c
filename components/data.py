"""Streaming readers of WebDataset shards for training and evaluation (DESIGN §3).

A split lives in one folder or S3 prefix: `<split>-NNNNNN.tar` shards plus `manifest.json`, written
last by `components.shards`. The manifest gives every shard's sample count, which is what makes
exact epochs possible: the epoch's shard order (seeded by `seed + epoch`, the same on every rank)
lays all samples out in one sequence, and each (rank, DataLoader worker) reads one contiguous run of
it. Every rank gets exactly `steps_per_epoch` full batches and no sample is read twice (drop_last:
the fewer than `world_size * batch` samples left over differ from epoch to epoch). A run may start or
end inside a shard; the reader then skips the samples before it without decoding them.

Undecodable images are skipped and counted; to keep batch counts equal, the worker that met one
wraps around to the start of its run to fill the batch. Counts travel with the batches (DataLoader
workers cannot update the parent's objects), so `loader.skipped` is exact after the epoch.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import random
import tarfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_iterator

from components import storage
from lcr_core.augment import eval_transform, two_crop_transform
from lcr_core.config import LCRConfig
from lcr_core.errors import LCRError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
SHUFFLE_BUFFER = 256  # samples (encoded) held per worker to mix neighbours within a run
TAR_ERRORS = (tarfile.TarError, EOFError, OSError, ValueError, *storage.STREAM_ERRORS)

log = logging.getLogger("lcr.data")


class ShardError(LCRError):
    """A missing, malformed or empty manifest, or a truncated or corrupt shard."""


@dataclass(frozen=True)
class ShardEntry:
    name: str
    count: int
    sha256: str
    bytes: int


@dataclass
class Manifest:
    dataset: str
    split: str
    class_names: list[str]
    shards: list[ShardEntry]
    total: int
    tool_version: str
    format: int = MANIFEST_FORMAT
    options: dict[str, Any] = field(default_factory=dict)  # converter selection (level, spec, ...)
    unreadable: int = 0  # source images that could not be decoded and were left out at build time
    version: int = 1  # 1 for a fresh build, +1 per append (older manifests have none: 1)
    # per append: {"version", "options" (with the drop's root), "samples", "unreadable"}; where each
    # drop came from, while `options` stays the set's own (what a rebuild of version 1 would use)
    appends: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    def shard_uris(self, split_uri: str) -> list[str]:
        return [storage.join(split_uri, s.name) for s in self.shards]


def manifest_uri(split_uri: str) -> str:
    return storage.join(split_uri, MANIFEST_NAME)


def parse_manifest(text: str, uri: str) -> Manifest:
    """Validate a manifest's JSON; every problem is one line naming `uri` and the field."""
    try:
        raw = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ShardError(f"{uri}: not valid JSON ({err}); expected a manifest written by `lcr shards build`") from None
    if not isinstance(raw, dict):
        raise ShardError(f"{uri}: expected a JSON object")
    expected = {"dataset": str, "split": str, "class_names": list, "shards": list, "total": int,
                "tool_version": str}
    for name, kind in expected.items():
        if not isinstance(raw.get(name), kind):
            raise ShardError(f"{uri}: field {name!r} missing or not a {kind.__name__}")
    if raw.get("format", MANIFEST_FORMAT) != MANIFEST_FORMAT:
        raise ShardError(f"{uri}: format {raw['format']!r}; expected {MANIFEST_FORMAT} (rebuild the shards)")
    shards = []
    for index, entry in enumerate(raw["shards"]):
        try:
            shards.append(ShardEntry(str(entry["name"]), int(entry["count"]), str(entry["sha256"]),
                                     int(entry["bytes"])))
        except (KeyError, TypeError, ValueError):
            raise ShardError(f"{uri}: shards[{index}] = {entry!r}; expected name, count, sha256, bytes") from None
    version = raw.get("version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ShardError(f"{uri}: field 'version' = {version!r}; expected an integer >= 1")
    if not isinstance(raw.get("appends", []), list):
        raise ShardError(f"{uri}: field 'appends' = {raw['appends']!r}; expected a list")
    known = set(expected) | {"format", "options", "unreadable", "version", "appends"}
    manifest = Manifest(**{k: v for k, v in raw.items() if k in known} | {"shards": shards})
    if sum(s.count for s in shards) != manifest.total:
        raise ShardError(f"{uri}: total {manifest.total} != sum of shard counts {sum(s.count for s in shards)}")
    return manifest


def read_manifest(split_uri: str) -> Manifest:
    """The manifest of one split (a folder or s3:// prefix); errors if missing, malformed or empty."""
    uri = manifest_uri(split_uri)
    try:
        text = storage.read_bytes(uri)
    except storage.NotFound:
        raise ShardError(f"{split_uri}: no {MANIFEST_NAME}; expected a split built by `lcr shards build` "
                         "(or an interrupted build: run it again)") from None
    manifest = parse_manifest(text.decode("utf-8", errors="replace"), uri)
    if manifest.total == 0 or not manifest.shards:
        raise ShardError(f"{split_uri}: the {manifest.split!r} split is empty; expected at least one sample")
    return manifest


# ---------------------------------------------------------------------------------------------
# Reading shards

def tar_samples(stream, url: str) -> Iterator[dict[str, Any]]:
    """Samples ({"__key__", "jpg", "cls", ...}) of an open tar stream; a damaged tar is a ShardError."""
    files = ({**f, "__url__": url} for f in tar_file_iterator(stream))
    try:
        yield from group_by_keys(files)
    except TAR_ERRORS as err:
        reason = str(err).split(" @ ")[0] or type(err).__name__
        raise ShardError(f"shard {url}: truncated or corrupt tar ({reason}); expected a complete shard "
                         "(check with `lcr shards verify`)") from None


@dataclass(frozen=True)
class Piece:
    """Samples [start, stop) of one shard holding `count` samples."""

    url: str
    count: int
    start: int
    stop: int


def plan_pieces(urls: list[str], counts: list[int], begin: int, end: int) -> list[Piece]:
    """The shard pieces covering positions [begin, end) of the concatenation of the shards."""
    pieces, offset = [], 0
    for url, count in zip(urls, counts):
        lo, hi = max(begin, offset), min(end, offset + count)
        if lo < hi:
            pieces.append(Piece(url, count, lo - offset, hi - offset))
        offset += count
    return pieces


def read_pieces(pieces: list[Piece]) -> Iterator[dict[str, Any]]:
    """The samples of the pieces, in order. A shard read to its end must hold exactly the manifest's
    count: a tar cut at a member boundary is otherwise indistinguishable from a complete one."""
    for piece in pieces:
        with storage.open_read(piece.url) as stream, closing(tar_samples(stream, piece.url)) as samples:
            position = 0
            for sample in samples:
                if position >= piece.stop:
                    raise ShardError(f"shard {piece.url}: more samples than the manifest's {piece.count}; "
                                     "expected the shards the manifest was written for (rebuild)")
                if position >= piece.start:
                    yield sample
                position += 1
                if position == piece.stop and piece.stop < piece.count:
                    break
            if position < piece.stop:
                raise ShardError(f"shard {piece.url}: truncated, ended after {position} of {piece.count} samples; "
                                 "expected a complete shard (check with `lcr shards verify`)")


def shuffled(items: Iterable, size: int, rng: random.Random) -> Iterator:
    """A bounded-buffer shuffle: each item leaves at a random time within the next `size` arrivals."""
    buffer = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= size:
            index = rng.randrange(len(buffer))
            buffer[index], buffer[-1] = buffer[-1], buffer[index]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


def decode(sample: dict[str, Any]) -> tuple[Image.Image, int] | None:
    """(RGB image, label), or None when the image or label cannot be decoded."""
    try:
        image = Image.open(io.BytesIO(sample["jpg"]))
        image.load()
        # most JPEGs decode to RGB already; convert() would copy them for nothing
        return (image if image.mode == "RGB" else image.convert("RGB")), int(sample["cls"])
    except (KeyError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def split_evenly(total: int, parts: int) -> list[int]:
    """`total` as `parts` integers differing by at most one, larger first."""
    return [total // parts + (index < total % parts) for index in range(parts)]


class _TrainStream(IterableDataset):
    """One rank's training batches; each DataLoader worker reads its own run of the epoch's sequence."""

    def __init__(self, urls: list[str], counts: list[int], begin: int, steps: int, batch_size: int,
                 transform: Callable, seed: int, start_step: int = 0):
        self.urls, self.counts, self.begin, self.steps = urls, counts, begin, steps
        self.batch_size, self.transform, self.seed, self.start_step = batch_size, transform, seed, start_step

    def __iter__(self):
        loader_worker, workers = _worker()
        # The DataLoader takes batches from its workers in turn, starting with its worker 0, and the
        # larger shares come first: batch j of the epoch is share j % workers. A resumed epoch starts
        # at batch start_step, so the DataLoader's worker 0 takes the share that batch belongs to.
        worker = (loader_worker + self.start_step) % workers
        batches = split_evenly(self.steps, workers)
        begin = self.begin + sum(batches[:worker]) * self.batch_size
        quota = batches[worker] * self.batch_size
        pieces = plan_pieces(self.urls, self.counts, begin, begin + quota)
        rng = random.Random(f"{self.seed}/{begin}")
        passed = len(range(worker, self.start_step, workers)) * self.batch_size  # batches before start_step
        try:
            yield from self._batches(pieces, quota, rng, passed)
        except LCRError as err:  # sent as an item: re-raised by the loader as one line, not a traceback
            yield err

    def _batches(self, pieces: list[Piece], quota: int, rng: random.Random, passed: int):
        """Batches of the run until `quota` samples are produced; the first `passed` samples (of
        batches given before a resume) go through the shuffle buffer, which keeps the order the same
        as in an uninterrupted epoch, but are not decoded."""
        views_q, views_k, skipped, produced = [], [], 0, passed
        undecodable: set[str] = set()  # counted once, though a wrap-around meets them again
        while produced < quota:
            decoded_this_pass = 0
            for sample in shuffled(read_pieces(pieces), SHUFFLE_BUFFER, rng):
                if passed:
                    passed -= 1
                    continue
                decoded = decode(sample)
                if decoded is None:
                    skipped += sample["__key__"] not in undecodable
                    undecodable.add(sample["__key__"])
                    continue
                decoded_this_pass += 1
                view_q, view_k = self.transform(decoded[0])
                views_q.append(view_q)
                views_k.append(view_k)
                if len(views_q) == self.batch_size:
                    yield torch.stack(views_q), torch.stack(views_k), skipped
                    views_q, views_k, skipped = [], [], 0
                    produced += self.batch_size
                    if produced == quota:
                        return
            if decoded_this_pass == 0:
                raise ShardError(f"no decodable image in {len(pieces)} shard piece(s) starting with "
                                 f"{pieces[0].url}; expected JPEG images")


class _EvalStream(IterableDataset):
    """Every sample of a split once, in shard order, split into one contiguous run per worker."""

    def __init__(self, urls: list[str], counts: list[int], batch_size: int, transform: Callable):
        self.urls, self.counts, self.batch_size, self.transform = urls, counts, batch_size, transform

    def __iter__(self):
        worker, workers = _worker()
        sizes = split_evenly(sum(self.counts), workers)
        begin = sum(sizes[:worker])
        try:
            yield from self._batches(plan_pieces(self.urls, self.counts, begin, begin + sizes[worker]))
        except LCRError as err:
            yield err

    def _batches(self, pieces: list[Piece]):
        images, labels, keys, skipped = [], [], [], 0
        for sample in read_pieces(pieces):
            decoded = decode(sample)
            if decoded is None:
                skipped += 1
                continue
            images.append(self.transform(decoded[0]))
            labels.append(decoded[1])
            keys.append(sample["__key__"])
            if len(images) == self.batch_size:
                yield torch.stack(images), torch.tensor(labels), keys, skipped
                images, labels, keys, skipped = [], [], [], 0
        if images:
            yield torch.stack(images), torch.tensor(labels), keys, skipped
        elif skipped:
            yield torch.empty(0), torch.empty(0, dtype=torch.long), [], skipped


class ShardLoader:
    """Iterates a stream through a DataLoader; `skipped` counts undecodable images of the last pass."""

    def __init__(self, stream: IterableDataset, workers: int, length: int, split_uri: str,
                 manifest: Manifest, what: str):
        self.stream, self.workers, self.length = stream, workers, length
        self.split_uri, self.manifest, self.what = split_uri, manifest, what
        self.skipped = 0

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        loader = DataLoader(self.stream, batch_size=None, num_workers=self.workers,
                            pin_memory=torch.cuda.is_available())
        self.skipped = 0
        for item in loader:
            if isinstance(item, LCRError):
                raise item
            *batch, skipped = item
            self.skipped += skipped
            if len(batch[0]):
                yield tuple(batch)
        if self.skipped:
            log.warning("%s: skipped %d undecodable image(s) in %s", self.what, self.skipped, self.split_uri)


# ---------------------------------------------------------------------------------------------
# Public entry points

def resolve_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """Explicit values, else torch.distributed's, else the RANK / WORLD_SIZE variables, else (0, 1)."""
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            found = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            found = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        rank = found[0] if rank is None else rank
        world_size = found[1] if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise LCRError(f"rank {rank} with world size {world_size}: expected 0 <= rank < world size")
    return rank, world_size


def steps_per_epoch(manifest: Manifest, cfg: LCRConfig, world_size: int | None = None) -> int:
    """Batches every rank yields per epoch: whole global batches only (drop_last)."""
    world = cfg.num_workers if world_size is None else world_size
    return manifest.total // (world * cfg.per_worker_batch)


def epoch_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """The shard order of one epoch; every rank computes the same one."""
    return np.random.default_rng(seed + epoch).permutation(num_shards).tolist()


def train_loader(cfg: LCRConfig, epoch: int, rank: int | None = None, world_size: int | None = None,
                 transform: Callable[[Image.Image], tuple] | None = None, start_step: int = 0) -> ShardLoader:
    """This rank's (im_q, im_k) batches of `cfg.per_worker_batch` for one epoch of `cfg.shards`/train.
    `transform` (image -> two views) replaces MoCo v2's two crops, e.g. for BYOL's asymmetric views.
    `start_step` resumes mid-epoch: the same batches as from 0 without the first `start_step`, whose
    images are neither decoded nor augmented."""
    rank, world = resolve_rank(rank, world_size)
    if world != cfg.num_workers:
        raise LCRError(f"world size {world} but config num_workers = {cfg.num_workers}; expected them equal "
                       "(per_worker_batch is batch_size / num_workers)")
    split_uri = storage.join(cfg.shards, "train")
    manifest = read_manifest(split_uri)
    steps = steps_per_epoch(manifest, cfg, world)
    if steps == 0:
        raise ShardError(f"{split_uri}: {manifest.total} samples, fewer than one global batch of "
                         f"{world * cfg.per_worker_batch}; expected more samples or a smaller batch_size")
    if not 0 <= start_step <= steps:
        raise LCRError(f"start_step {start_step}: expected 0..{steps} (the steps of an epoch)")
    order = epoch_order(len(manifest.shards), cfg.seed, epoch)
    uris = manifest.shard_uris(split_uri)
    stream = _TrainStream([uris[i] for i in order], [manifest.shards[i].count for i in order],
                          begin=rank * steps * cfg.per_worker_batch, steps=steps,
                          batch_size=cfg.per_worker_batch,
                          transform=transform or two_crop_transform(cfg.image_size),
                          seed=cfg.seed + epoch, start_step=start_step)
    return ShardLoader(stream, cfg.loader_workers, steps - start_step, split_uri, manifest,
                       f"train epoch {epoch} rank {rank}")


def eval_loader(split_uri: str, image_size: int, resize: int, batch_size: int, workers: int = 0) -> ShardLoader:
    """(images, labels, keys) batches covering every sample of the split once (resize, center crop)."""
    manifest = read_manifest(split_uri)
    sizes = split_evenly(manifest.total, max(workers, 1))
    stream = _EvalStream(manifest.shard_uris(split_uri), [s.count for s in manifest.shards], batch_size,
                         eval_transform(image_size, resize))
    length = sum(math.ceil(size / batch_size) for size in sizes)
    return ShardLoader(stream, workers, length, split_uri, manifest, "evaluation")
