"""Benchmark of the shard training pipeline (`components.data.train_loader`) against torchvision's
ImageFolder with the same augmentation on the same images (issue 3).

    .venv/bin/python benchmarks/loader.py                  # 2,000 images, ~2-3 min on 2 cores
    .venv/bin/python benchmarks/loader.py --images 4000 --measure 960 --workers 1
    .venv/bin/python benchmarks/loader.py --s3                                    # from object storage

Writes a few thousand synthetic JPEGs at a CUB-like size (500x375, ~70 KB: a smooth random colour
field plus grain) as an ImageFolder tree, converts that tree to shards with `lcr shards build`'s
`build_shards`, then times, in alternation, for each pipeline:
  - `train`: MoCo v2 two-crop augmentation (`two_crop_transform(224)`), the goal figure;
  - `load`: reading and decoding only (the transform returns nothing), which isolates the format.
Everything runs with one intra-op thread; with `--workers 0` (the default) the pipeline runs in the
main process, i.e. on one core, so images/s is images/s per core. With W workers, images/s is
divided by W. The first batch of each run is not timed; the best of `--repeats` runs is reported.
Goal: shards >= 1.2x ImageFolder on `train`.

`--s3` puts both into a bucket of moto's S3-protocol server started on 127.0.0.1 (a stand-in for
object storage, with loopback instead of network latency): the JPEGs as one object each, read with
one GET per image as an ImageFolder in a bucket would be, against the shards streamed through
`train_loader`. Times there are wall clock: waiting on the store is part of the cost.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.services

from components import storage  # noqa: E402
from components.data import train_loader  # noqa: E402
from components.shards import build_shards  # noqa: E402
from lcr_core.augment import two_crop_transform  # noqa: E402
from lcr_core.config import LCRConfig  # noqa: E402
from tests.services import free_port, stop, wait_http  # noqa: E402

WIDTH, HEIGHT = 500, 375
CLASSES = 20
IMAGE_SIZE = 224


class PhotoLike:
    """Low-frequency colour variation plus grain: JPEG sizes near real photographs of this size. The
    grain comes from a few precomputed fields, shifted at random (drawing it fresh dominated the time)."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.grains = [self.rng.normal(0.0, 12.0, (HEIGHT, WIDTH, 3)).astype(np.int16) for _ in range(4)]

    def __call__(self) -> Image.Image:
        grid = self.rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)
        smooth = np.asarray(Image.fromarray(grid).resize((WIDTH, HEIGHT), Image.BICUBIC), dtype=np.int16)
        grain = np.roll(self.grains[self.rng.integers(len(self.grains))], self.rng.integers(WIDTH), axis=1)
        return Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8))


def write_image_folder(root: Path, count: int, seed: int) -> int:
    """`count` JPEGs in CLASSES class folders; returns their total size in bytes."""
    photo = PhotoLike(seed)
    total = 0
    for index in tqdm(range(count), desc="writing JPEGs", unit="img", mininterval=5):
        path = root / f"class{index % CLASSES:02d}" / f"img{index:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        photo().save(path, "JPEG", quality=90)
        total += path.stat().st_size
    return total


def decoded_only(image: Image.Image):
    return torch.zeros(()), torch.zeros(())


def imagefolder_batches(root: str, batch_size: int, workers: int, transform):
    dataset = ObjectPerImage(root, transform) if storage.is_s3(root) else ImageFolder(root, transform=transform)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True)
    return (views for views, _ in loader)


def shard_batches(shards: Path, batch_size: int, workers: int, transform, epoch: int):
    cfg = LCRConfig(shards=str(shards), batch_size=batch_size, num_workers=1, queue_size=batch_size,
                    loader_workers=workers, image_size=IMAGE_SIZE).validate()
    return iter(train_loader(cfg, epoch, rank=0, world_size=1, transform=transform))


class ObjectPerImage(Dataset):
    """ImageFolder's layout in a bucket (`<prefix>/<class>/<file>.jpg`), read with one GET per image."""

    def __init__(self, prefix: str, transform):
        bucket, key_prefix = storage.split_s3(prefix)
        pages = storage.s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key_prefix)
        self.uris = sorted(f"s3://{bucket}/{item['Key']}" for page in pages for item in page.get("Contents", []))
        classes = sorted({uri.rsplit("/", 2)[1] for uri in self.uris})
        self.labels = [classes.index(uri.rsplit("/", 2)[1]) for uri in self.uris]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.uris)

    def __getitem__(self, index: int):
        image = Image.open(io.BytesIO(storage.read_bytes(self.uris[index]))).convert("RGB")
        return self.transform(image), self.labels[index]


@contextlib.contextmanager
def s3_server():
    """moto's S3-protocol server on a free loopback port, for the duration; stopped by process group."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_http(endpoint + "/moto-api/", 60, proc)
        os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                          AWS_DEFAULT_REGION="us-east-1")
        yield endpoint
    finally:
        stop(proc)


def upload_tree(root: Path, prefix: str) -> None:
    for path in tqdm(sorted(root.rglob("*.jpg")), desc="uploading JPEGs", unit="img", mininterval=5):
        storage.write_bytes(storage.join(prefix, str(path.relative_to(root))), path.read_bytes())


def images_per_core_second(batches, batch_size: int, measure: int, workers: int, wall: bool = False) -> float:
    """Throughput over `measure` images after one untimed batch (worker start-up, first calls). In
    process (workers = 0) it is images per CPU-second of this process, which other programs on the
    machine barely disturb; with workers, or with `wall`, it is wall-clock images/s per worker."""
    next(batches)
    clock = time.process_time if workers == 0 and not wall else time.perf_counter
    start = clock()
    steps = measure // batch_size
    for _ in itertools.islice(batches, steps):
        pass
    return steps * batch_size / (clock() - start) / max(workers, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="JPEGs in the data set")
    parser.add_argument("--measure", type=int, default=192, help="images timed per `train` run")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (0: one core, in-process)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--s3", action="store_true", help="both from a bucket of a local S3-protocol server")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="lcr-loader-bench-") as tmp, \
            (s3_server() if args.s3 else contextlib.nullcontext()):
        folder = Path(tmp) / "folder"
        size = write_image_folder(folder / "train", args.images, args.seed)
        if args.s3:
            storage.s3_client().create_bucket(Bucket="bench")
            images, shards = "s3://bench/folder/train", "s3://bench/shards"
            upload_tree(folder / "train", images)
        else:
            images, shards = str(folder / "train"), str(Path(tmp) / "shards")
        start = time.perf_counter()
        built = build_shards("imagefolder", shards, folder, progress=False)["train"]
        print(f"{args.images} JPEGs of {WIDTH}x{HEIGHT}, {size / args.images / 1024:.0f} KB each; "
              f"build_shards: {len(built.manifest.shards)} shards in {time.perf_counter() - start:.1f} s")

        modes = {"train": (two_crop_transform(IMAGE_SIZE), args.measure),
                 "load": (decoded_only, args.images - 2 * args.batch_size)}
        results: dict[tuple[str, str], list[float]] = {}
        for repeat in range(args.repeats):
            for mode, (transform, measure) in modes.items():
                for name in ("imagefolder", "shards"):
                    batches = (imagefolder_batches(images, args.batch_size, args.workers, transform)
                               if name == "imagefolder" else
                               shard_batches(shards, args.batch_size, args.workers, transform, epoch=repeat))
                    rate = images_per_core_second(batches, args.batch_size, measure, args.workers, wall=args.s3)
                    results.setdefault((mode, name), []).append(rate)
                    print(f"  run {repeat + 1} {mode:5s} {name:11s} {rate:7.1f} images/s per core", flush=True)

    clock = ("CPU time, in process" if args.workers == 0 and not args.s3 else
             f"wall clock / {max(args.workers, 1)} worker(s)")
    where = "a bucket on a local S3-protocol server" if args.s3 else "a local folder"
    print(f"\nbest of {args.repeats}, from {where} (images/s per core by {clock}, batch {args.batch_size}, "
          f"{IMAGE_SIZE} px views):")
    for mode in modes:
        folder_rate, shard_rate = max(results[(mode, "imagefolder")]), max(results[(mode, "shards")])
        print(f"  {mode:5s}  ImageFolder {folder_rate:7.1f}   shards {shard_rate:7.1f}   "
              f"shards / ImageFolder = {shard_rate / folder_rate:.2f}x")


if __name__ == "__main__":
    main()
