"""Sources for the shard tests whose images carry their own identity: sample i is a solid colour that
survives JPEG, so a reader's output can be traced back to the sample without trusting its keys."""

from __future__ import annotations

import io
from collections.abc import Iterator

import torch
from PIL import Image

from components.converters import Sample, Source

LEVELS = 16  # per channel: 4096 distinguishable colours
STEP = 256 // LEVELS
BAD_JPEG = b"\xff\xd8\xff\xe0" + b"not really a jpeg" * 4  # passes the writer's JPEG check, fails decoding


def colour_of(index: int) -> tuple[int, int, int]:
    r, g, b = index % LEVELS, index // LEVELS % LEVELS, index // LEVELS**2
    return r * STEP + STEP // 2, g * STEP + STEP // 2, b * STEP + STEP // 2


def index_of(rgb) -> int:
    r, g, b = (int(v) // STEP for v in rgb)
    return r + LEVELS * g + LEVELS**2 * b


def colour_jpeg(index: int, size: int = 16) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (size, size), colour_of(index)).save(out, "JPEG", quality=95)
    return out.getvalue()


def key_of(index: int) -> str:
    return f"img-{index:05d}"


def colour_source(sizes: dict[str, int], num_classes: int = 3, bad: set[int] = frozenset(),
                  unreadable: set[int] = frozenset()) -> Source:
    """Samples 0..n-1 per split with label i % num_classes; `bad` indices get bytes that look like a
    JPEG but do not decode (caught at reading), `unreadable` ones bytes that are no image at all
    (caught when the shards are written). Test splits number their samples from 1000."""
    offsets = {"train": 0, "test": 1000}

    def samples(split: str) -> Iterator[Sample]:
        for i in range(offsets[split], offsets[split] + sizes[split]):
            image = BAD_JPEG if i in bad else b"no image" if i in unreadable else colour_jpeg(i)
            yield Sample(key_of(i), image, i % num_classes, {"index": i})

    return Source("colours", [f"class{c}" for c in range(num_classes)],
                  {split: (lambda split=split: samples(split)) for split in sizes}, dict(sizes))


def interrupted(source: Source, split: str, after: int) -> Source:
    """The same source, but reading `split` stops with KeyboardInterrupt after `after` samples."""
    def samples() -> Iterator[Sample]:
        for n, sample in enumerate(source.splits[split]()):
            if n == after:
                raise KeyboardInterrupt
            yield sample

    return Source(source.dataset, source.class_names, {**source.splits, split: samples}, source.sizes)


def identity_views(image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
    """A training 'augmentation' that returns the sample's index twice."""
    index = torch.tensor(index_of(image.getpixel((image.width // 2, image.height // 2))))
    return index, index
