"""Write a PNG grid of synthetic samples, one row per class, and measure the rendering speed.

    .venv/bin/python benchmarks/synthetic_samples.py --out synthetic_samples.png
    .venv/bin/python benchmarks/synthetic_samples.py --set part_size=0.06 --set clutter_density=2
    .venv/bin/python benchmarks/synthetic_samples.py --set family=beetle --out beetle_samples.png

Each row is one class (its name on the left); the columns are training images of that class. The
last row renders one training image as every class in turn: only the part regions change.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from components.converters import parse_options  # noqa: E402
from lcr_core.errors import LCRError  # noqa: E402
from lcr_core.synthetic import SyntheticSpec, class_names, render  # noqa: E402

LABEL_WIDTH = 230


def sample_grid(spec: SyntheticSpec, per_class: int) -> Image.Image:
    side, names = spec.image_size, class_names(spec)
    columns = max(per_class, spec.num_classes)
    grid = Image.new("RGB", (LABEL_WIDTH + columns * side, (len(names) + 1) * side), "white")
    draw = ImageDraw.Draw(grid)
    for label, name in enumerate(names):
        draw.text((4, label * side + side // 2 - 6), f"{label}: {name}", fill="black")
        for column in range(min(per_class, spec.train_per_class)):
            index = column * spec.num_classes + label  # label_of(index) == label
            grid.paste(render(spec, "train", index).image, (LABEL_WIDTH + column * side, label * side))
    row = len(names) * side
    draw.text((4, row + side // 2 - 6), "train 0 as every class", fill="black")
    for label in range(spec.num_classes):
        grid.paste(render(spec, "train", 0, label=label).image, (LABEL_WIDTH + label * side, row))
    return grid


def images_per_second(spec: SyntheticSpec, count: int, with_mask: bool = False) -> float:
    count = min(count, spec.split_size("train"))
    start = time.perf_counter()
    for index in range(count):
        render(spec, "train", index, with_mask=with_mask)
    return count / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("synthetic_samples.png"))
    parser.add_argument("--per-class", type=int, default=8)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a SyntheticSpec field (repeatable)")
    parser.add_argument("--speed-images", type=int, default=400, help="images rendered to time the generator")
    args = parser.parse_args()
    try:
        spec = SyntheticSpec.from_options(parse_options(args.set))
    except LCRError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sample_grid(spec, args.per_class).save(args.out)
    print(f"wrote {args.out} ({spec.num_classes} classes x {args.per_class} samples, {spec.image_size} px)")
    print(f"rendering: {images_per_second(spec, args.speed_images):.0f} images/s on one core at "
          f"{spec.image_size} px ({spec.family}); with the object mask: "
          f"{images_per_second(spec, args.speed_images, with_mask=True):.0f} images/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
