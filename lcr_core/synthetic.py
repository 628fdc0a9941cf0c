"""A synthetic fine-grained data set: one kind of object (a stylised bird) whose classes differ only
in small parts, over cluttered backgrounds that are distinctive per image (DESIGN §4).

Instance discrimination is solvable from the background alone; the class lives only in the parts
(crest shape, wing-patch colour, tail band, breast marking, eye stripe). Every pixel-level choice
that is not the class is drawn from a numpy Generator seeded by (seed, split, index) *before* the
class is looked at, so rendering one index as two different classes changes only the part regions.

Pure PIL + numpy, drawn at twice the resolution and box-downsampled (cheap anti-aliasing).
"""

from __future__ import annotations

import colorsys
import functools
import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from lcr_core.errors import LCRError

SPLITS = ("train", "test")
SUPERSAMPLE = 2
COARSE_CLASSES = 6  # orientation: facing left/right x pitched down/level/up, the coarse task of `coarse_init`
CLUTTER_KINDS = 4  # ellipse, rectangle, thick line, triangle

# Class-bearing part slots, in the order `num_differing_parts` enables them. Each slot has an anchor
# in the object's own frame (body length 1, facing +x, y down) and variants that all stay within
# PART_EXTENT * part_size of the anchor, so the slot's region is known whatever the class.
PART_SLOTS: dict[str, dict[str, Any]] = {
    "wing": {"anchor": (-0.04, 0.03), "variants": ("white", "black", "red", "yellow", "blue")},
    "crest": {"anchor": (0.37, -0.15), "variants": ("none", "spike", "tuft", "fork")},
    "tail": {"anchor": (-0.47, -0.02), "variants": ("plain", "white", "black", "orange")},
    "breast": {"anchor": (0.2, 0.07), "variants": ("plain", "spot", "bars", "ring")},
    "eye": {"anchor": (0.4, -0.06), "variants": ("plain", "white", "black", "yellow")},
}
PART_COLOURS = {
    "white": (245, 245, 240), "black": (20, 20, 25), "red": (215, 30, 35), "yellow": (250, 215, 30),
    "blue": (40, 80, 220), "orange": (245, 130, 20), "dark": (30, 25, 20),
}
PART_EXTENT = 1.15  # every variant lies within PART_EXTENT * part_size of its anchor

_UNIT_CIRCLE = {n: np.stack([np.cos(t), np.sin(t)], axis=1)
                for n in (10, 20) for t in [np.linspace(0, 2 * math.pi, n, endpoint=False)]}


def _ellipse(centre: tuple[float, float], axes: tuple[float, float], n: int = 20) -> np.ndarray:
    return _UNIT_CIRCLE[n] * axes + centre


# The common body plan, in the object's frame (see PART_SLOTS).
BODY_AXES = (0.32, 0.14)
HEAD_CENTRE, HEAD_RADIUS = (0.38, -0.06), 0.105
BEAK = ((0.47, -0.09), (0.6, -0.05), (0.47, -0.02))
WING = ((0.16, -0.03), (-0.18, -0.06), (-0.3, 0.07), (0.06, 0.09))
TAIL = ((-0.27, -0.04), (-0.52, -0.13), (-0.52, 0.09), (-0.27, 0.05))
LEGS = (((0.02, 0.12), (0.0, 0.24)), ((0.1, 0.12), (0.12, 0.24)))


def _object_outline() -> np.ndarray:
    return np.concatenate([TAIL, _ellipse((0, 0), BODY_AXES), _ellipse(HEAD_CENTRE, (HEAD_RADIUS,) * 2), BEAK,
                           *LEGS])


BODY_RADIUS = float(np.linalg.norm(_object_outline(), axis=1).max())  # in body lengths, about 0.6
EDGE_MARGIN = 0.075  # fraction of the image side kept free around the object


def object_radius(part_size: float) -> float:
    """How far (in body lengths) the object, parts included, reaches from its centre."""
    anchors = max(math.hypot(*slot["anchor"]) for slot in PART_SLOTS.values())
    return max(BODY_RADIUS, anchors + PART_EXTENT * part_size)


def max_object_scale(part_size: float) -> float:
    return math.floor((0.5 - EDGE_MARGIN) / object_radius(part_size) * 100) / 100


@dataclass(frozen=True)
class SyntheticSpec:
    """What to generate and how hard it is. The defaults are the calibrated demo setting (DESIGN §4)."""

    num_classes: int = 12
    train_per_class: int = 40
    test_per_class: int = 20
    image_size: int = 96
    seed: int = 0
    part_size: float = 0.18  # radius of a class-bearing part, as a fraction of the body length
    num_differing_parts: int = 3  # how many part slots vary between classes (1..len(PART_SLOTS))
    clutter_density: float = 0.5  # clutter shapes per image = round(24 * density)
    clutter_contrast: float = 0.3  # 0..1: colour deviation of clutter from the background's own hues
    # 0..1: spread of the background's colours around mid-grey (1 = the whole RGB cube). A wide spread
    # makes the global background colour an instance cue that even colour jitter leaves intact.
    background_variety: float = 0.2
    object_scale: tuple[float, float] = (0.58, 0.62)  # body length as a fraction of the image side
    max_tilt: float = 30.0  # degrees the object may pitch up or down; it also faces left or right

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> SyntheticSpec:
        """A spec from field: value pairs (a command line's, a manifest's), naming any unknown field."""
        known = {f.name for f in fields(cls)}
        unknown = set(options) - known
        if unknown:
            raise LCRError(f"synthetic spec option {min(unknown)!r}: expected SyntheticSpec fields "
                           f"({', '.join(sorted(known))})")
        return cls(**options)

    def __post_init__(self) -> None:
        if isinstance(self.object_scale, list):  # YAML and JSON give lists
            object.__setattr__(self, "object_scale", tuple(self.object_scale))
        self.validate()

    def validate(self) -> None:
        def bad(name: str, expected: str) -> None:
            raise LCRError(f"synthetic spec field '{name}' = {getattr(self, name)!r}: expected {expected}")

        for name in ("num_classes", "train_per_class", "test_per_class", "image_size", "num_differing_parts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                bad(name, "an integer >= 1")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            bad("seed", "an integer >= 0")
        for name in ("part_size", "clutter_density", "clutter_contrast", "background_variety", "max_tilt"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                bad(name, "a number")
        if self.num_classes < 2:
            bad("num_classes", "at least 2")
        if self.image_size < 16:
            bad("image_size", "at least 16 pixels")
        if self.num_differing_parts > len(PART_SLOTS):
            bad("num_differing_parts", f"at most {len(PART_SLOTS)} (the part slots: {', '.join(PART_SLOTS)})")
        if self.num_classes > max_classes(self.num_differing_parts):
            bad("num_classes", f"at most {max_classes(self.num_differing_parts)} with "
                               f"num_differing_parts={self.num_differing_parts}")
        if not 0.03 <= self.part_size <= 0.2:
            bad("part_size", "a number in [0.03, 0.2] (fraction of the body length)")
        if not 0.0 <= self.clutter_density <= 5.0:
            bad("clutter_density", "a number in [0, 5]")
        if not 0.0 <= self.clutter_contrast <= 1.0:
            bad("clutter_contrast", "a number in [0, 1]")
        if not 0.0 <= self.background_variety <= 1.0:
            bad("background_variety", "a number in [0, 1]")
        low_high = self.object_scale
        if (not isinstance(low_high, tuple) or len(low_high) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in low_high)
                or not 0.2 <= low_high[0] <= low_high[1] <= max_object_scale(self.part_size)):
            bad("object_scale", f"a pair (low, high) with 0.2 <= low <= high <= "
                                f"{max_object_scale(self.part_size)} (larger objects leave the frame)")
        if not 0.0 <= self.max_tilt <= 60.0:
            bad("max_tilt", "a number of degrees in [0, 60]")

    def split_size(self, split: str) -> int:
        check_split(split)
        return self.num_classes * (self.train_per_class if split == "train" else self.test_per_class)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}


@dataclass
class SyntheticSample:
    key: str  # syn-<split>-<index>: no dots (WebDataset treats everything after one as an extension)
    image: Image.Image
    label: int
    meta: dict[str, Any]


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise LCRError(f"synthetic split {split!r}: expected one of {', '.join(SPLITS)}")


def max_classes(num_differing_parts: int) -> int:
    return math.prod(len(slot["variants"]) for slot in list(PART_SLOTS.values())[:num_differing_parts])


def class_parts(spec: SyntheticSpec) -> tuple[dict[str, str], ...]:
    """The part variants of each class: distinct combinations over the differing slots, in a fixed
    shuffled order (independent of `seed`, so class k means the same thing in every data set)."""
    return _class_parts(spec.num_differing_parts, spec.num_classes)


@functools.lru_cache(maxsize=64)
def _class_parts(num_differing_parts: int, num_classes: int) -> tuple[dict[str, str], ...]:
    differing = list(PART_SLOTS)[:num_differing_parts]
    combos = list(itertools.product(*(PART_SLOTS[name]["variants"] for name in differing)))
    order = np.random.default_rng(len(combos)).permutation(len(combos))
    fixed = {name: slot["variants"][0] for name, slot in PART_SLOTS.items()}
    return tuple(fixed | dict(zip(differing, combos[i])) for i in order[:num_classes])


def class_names(spec: SyntheticSpec) -> list[str]:
    differing = list(PART_SLOTS)[: spec.num_differing_parts]
    return ["_".join(f"{name}-{parts[name]}" for name in differing) for parts in class_parts(spec)]


def label_of(spec: SyntheticSpec, index: int) -> int:
    return index % spec.num_classes  # interleaved, so any contiguous run (a shard) holds every class


def sample_key(split: str, index: int) -> str:
    return f"syn-{split}-{index:06d}"


def coarse_label(facing: int, tilt: float, max_tilt: float) -> int:
    """Orientation bucket: 3 * (facing left) + tilt tercile, balanced because tilt is uniform."""
    tercile = 1 if max_tilt == 0 else min(2, int((tilt + max_tilt) / (2 * max_tilt) * 3))
    return 3 * int(facing < 0) + tercile


# ---------------------------------------------------------------------------------------------
# Random per-image choices (everything but the class), drawn in a fixed order.

def _draw_layout(spec: SyntheticSpec, rng: np.random.Generator) -> dict[str, Any]:
    side = spec.image_size
    length = rng.uniform(*spec.object_scale) * side
    facing = 1 if rng.random() < 0.5 else -1
    tilt = rng.uniform(-spec.max_tilt, spec.max_tilt)
    # keep the object inside a margin wider than what the evaluation center crop cuts (256/224: 6.25 %)
    margin = EDGE_MARGIN * side + object_radius(spec.part_size) * length
    centre = rng.uniform(min(margin, side / 2), max(side - margin, side / 2), 2)
    hue = rng.uniform(0.02, 0.16)  # browns to olives: a plausible plumage shade, class-independent
    body = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.15, 0.55), rng.uniform(0.35, 0.8))) * 255
    n = round(24 * spec.clutter_density)
    return {
        "length": length, "facing": facing, "tilt": tilt, "centre": centre, "body": body,
        "bg_corners": 127.5 + spec.background_variety * (rng.uniform(0, 255, (4, 3)) - 127.5),
        "bg_blotch": rng.standard_normal((6, 6, 3)),
        "clutter_kind": rng.integers(CLUTTER_KINDS, size=n),
        "clutter_points": rng.uniform(-0.1, 1.1, (n, 6)) * side,  # centre or end points, third vertex
        "clutter_size": rng.uniform(0.03, 0.25, n) * side,
        "clutter_colour": rng.uniform(0, 255, (n, 3)),
    }


# ---------------------------------------------------------------------------------------------
# Drawing.

def _background(spec: SyntheticSpec, layout: dict[str, Any]) -> Image.Image:
    """A bilinear blend of four random corner colours plus low-frequency blotches: unique per image.
    Interpolated at the output size, then doubled by pixel repetition (3x cheaper, same after `reduce`)."""
    corners = layout["bg_corners"].reshape(2, 2, 3)
    weights = np.linspace(0.0, 1.0, 6)[:, None, None]
    left = corners[0, 0] * (1 - weights) + corners[1, 0] * weights
    right = corners[0, 1] * (1 - weights) + corners[1, 1] * weights
    grid = left * (1 - weights.transpose(1, 0, 2)) + right * weights.transpose(1, 0, 2)
    grid += 60.0 * spec.clutter_contrast * layout["bg_blotch"]
    small = Image.fromarray(np.clip(grid, 0, 255).astype(np.uint8), "RGB")
    side = spec.image_size
    return small.resize((side, side), Image.BILINEAR).resize((side * SUPERSAMPLE,) * 2, Image.NEAREST)


def _draw_clutter(draw: ImageDraw.ImageDraw, spec: SyntheticSpec, layout: dict[str, Any]) -> None:
    mean = layout["bg_corners"].mean(axis=0)
    colours = np.clip(mean + spec.clutter_contrast * (layout["clutter_colour"] - mean), 0, 255).astype(int)
    points = (layout["clutter_points"] * SUPERSAMPLE).tolist()
    radii = (layout["clutter_size"] * SUPERSAMPLE).tolist()
    for kind, (x, y, x2, y2, x3, y3), r, colour in zip(layout["clutter_kind"].tolist(), points, radii,
                                                      map(tuple, colours.tolist())):
        if kind == 0:
            draw.ellipse((x - r, y - 0.6 * r, x + r, y + 0.6 * r), fill=colour)
        elif kind == 1:
            draw.rectangle((x - r, y - r / 2, x + r, y + r / 2), fill=colour)
        elif kind == 2:
            draw.line((x, y, x2, y2), fill=colour, width=max(1, int(r / 4)))
        else:
            draw.polygon((x, y, x2, y2, x3, y3), fill=colour)


def _rgb(colour: np.ndarray | tuple) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.clip(np.asarray(colour), 0, 255))


def _object_frame(layout: dict[str, Any]) -> Callable[[np.ndarray], np.ndarray]:
    """Maps points of the object's own frame to supersampled image pixels (mirror, tilt, scale, move)."""
    angle = math.radians(layout["tilt"])
    scale = layout["length"] * SUPERSAMPLE
    # mirror x when facing left, then rotate, then scale: one 2x2 matrix acting on row vectors
    matrix = np.array([[layout["facing"] * math.cos(angle), layout["facing"] * math.sin(angle)],
                       [-math.sin(angle), math.cos(angle)]]) * scale
    offset = layout["centre"] * SUPERSAMPLE

    def to_image(points: np.ndarray) -> np.ndarray:
        return np.asarray(points, dtype=np.float64).reshape(-1, 2) @ matrix + offset

    return to_image


def _flat(points: np.ndarray) -> list[float]:
    return points.ravel().tolist()  # the fastest vertex format PIL accepts


def _draw_body(draw: ImageDraw.ImageDraw, layout: dict[str, Any], to_image) -> None:
    body = layout["body"]
    dark, light = _rgb(body * 0.6), _rgb(body * 1.15 + 20)
    width = max(1, round(0.02 * layout["length"] * SUPERSAMPLE))
    for leg in LEGS:
        draw.line(_flat(to_image(leg)), fill=PART_COLOURS["dark"], width=width)
    draw.polygon(_flat(to_image(TAIL)), fill=dark)
    draw.polygon(_flat(to_image(_ellipse((0, 0), BODY_AXES))), fill=_rgb(body))
    draw.polygon(_flat(to_image(_ellipse(HEAD_CENTRE, (HEAD_RADIUS, HEAD_RADIUS)))), fill=light)
    draw.polygon(_flat(to_image(BEAK)), fill=PART_COLOURS["orange"])
    draw.polygon(_flat(to_image(WING)), fill=dark)


def _part_shapes(slot: str, variant: str, size: float) -> list[tuple[np.ndarray, str]]:
    """Polygons (object frame, relative to the slot's anchor) and colour names of one part variant."""
    s = size
    if slot == "wing":
        return [(_ellipse((0, 0), (1.1 * s, 0.6 * s)), variant)]
    if slot == "crest":
        shapes = {
            "none": [],
            "spike": [np.array([(-0.4 * s, s), (0.1 * s, -s), (0.4 * s, s)])],
            "tuft": [_ellipse((0, 0.2 * s), (0.8 * s, 0.8 * s))],
            "fork": [np.array([(-0.9 * s, s), (-0.6 * s, -s), (-0.1 * s, s)]),
                     np.array([(0.1 * s, s), (0.6 * s, -s), (0.9 * s, s)])],
        }[variant]
        return [(shape, "dark") for shape in shapes]
    if slot == "tail":
        return [] if variant == "plain" else [(np.array([(-0.5 * s, -s), (0.5 * s, -0.8 * s),
                                                         (0.5 * s, 0.9 * s), (-0.5 * s, s)]), variant)]
    if slot == "breast":
        shapes = {
            "plain": [],
            "spot": [(_ellipse((0, 0), (0.7 * s, 0.7 * s)), "red")],
            "bars": [(np.array([(x - 0.15 * s, -s), (x + 0.15 * s, -s), (x + 0.15 * s, s), (x - 0.15 * s, s)]),
                      "dark") for x in (-0.7 * s, 0.0, 0.7 * s)],
            "ring": [(_ellipse((0, 0), (s, s)), "white"), (_ellipse((0, 0), (0.55 * s, 0.55 * s)), "black")],
        }
        return shapes[variant]
    # eye: a stripe through the eye; the eye itself is common to every class and drawn on top
    return [] if variant == "plain" else [(np.array([(-s, -0.3 * s), (s, -0.3 * s), (s, 0.3 * s),
                                                     (-s, 0.3 * s)]), variant)]


def _draw_parts(draw: ImageDraw.ImageDraw, parts: dict[str, str], size: float, to_image) -> None:
    for slot, variant in parts.items():
        anchor = np.array(PART_SLOTS[slot]["anchor"])
        for shape, colour in _part_shapes(slot, variant, size):
            draw.polygon(_flat(to_image(shape + anchor)), fill=PART_COLOURS[colour])
    eye = PART_SLOTS["eye"]["anchor"]
    draw.polygon(_flat(to_image(_ellipse(eye, (0.025, 0.025), 10))), fill=PART_COLOURS["black"])


def _box(low: np.ndarray, high: np.ndarray, side: int) -> list[int]:
    """Output-pixel box [x0, y0, x1, y1) (exclusive end) around supersampled corners, clipped to the image;
    one pixel of padding covers the box filter of the downsampling."""
    def clip(value: float) -> int:
        return min(max(int(value), 0), side)

    return [clip(math.floor(v / SUPERSAMPLE) - 1) for v in low] + [clip(math.ceil(v / SUPERSAMPLE) + 1) for v in high]




def render(spec: SyntheticSpec, split: str, index: int, label: int | None = None) -> SyntheticSample:
    """Sample `index` of `split`. `label` overrides its class without changing anything else (the
    same background, pose and shade), which is how the tests show that classes differ only in parts."""
    check_split(split)
    size = spec.split_size(split)
    if not 0 <= index < size:
        raise LCRError(f"synthetic {split} index {index}: expected 0 <= index < {size}")
    label = label_of(spec, index) if label is None else label
    if not 0 <= label < spec.num_classes:
        raise LCRError(f"synthetic label {label}: expected 0 <= label < {spec.num_classes}")
    rng = np.random.default_rng([spec.seed, SPLITS.index(split), index])
    layout = _draw_layout(spec, rng)
    to_image = _object_frame(layout)

    canvas = _background(spec, layout)
    draw = ImageDraw.Draw(canvas)
    _draw_clutter(draw, spec, layout)
    _draw_body(draw, layout, to_image)
    _draw_parts(draw, class_parts(spec)[label], spec.part_size, to_image)
    image = canvas.reduce(SUPERSAMPLE)

    side = spec.image_size
    reach = PART_EXTENT * spec.part_size * layout["length"] * SUPERSAMPLE  # a disc stays a disc when turned
    anchors = to_image(np.array([slot["anchor"] for slot in PART_SLOTS.values()]))
    part_boxes = {slot: _box(a - reach, a + reach, side) for slot, a in zip(PART_SLOTS, anchors)}
    extent = np.concatenate([to_image(_object_outline()), anchors - reach, anchors + reach])
    heading = layout["tilt"] + (0.0 if layout["facing"] > 0 else 180.0)  # clockwise from +x (y is down)
    centre = layout["centre"]
    meta = {
        "class_name": class_names(spec)[label],
        "bbox": _box(extent.min(axis=0), extent.max(axis=0), side),
        "part_boxes": part_boxes,
        "heading_degrees": round(float(heading % 360.0), 3),
        "coarse_label": coarse_label(layout["facing"], layout["tilt"], spec.max_tilt),
        "facing": "right" if layout["facing"] > 0 else "left",
        "quadrant": int(centre[0] >= side / 2) + 2 * int(centre[1] >= side / 2),
        "object_length": round(float(layout["length"]), 3),
    }
    return SyntheticSample(sample_key(split, index), image, label, meta)


def generate(spec: SyntheticSpec, split: str) -> Iterator[SyntheticSample]:
    for index in range(spec.split_size(split)):
        yield render(spec, split, index)


class SyntheticDataset:
    """Map-style dataset of (transform(image), label), rendered on the fly (no disk, any size).

    Defined without subclassing torch's Dataset so this module needs only PIL and numpy; a torch
    DataLoader accepts any object with __len__ and __getitem__.
    """

    def __init__(self, spec: SyntheticSpec, split: str, transform: Callable | None = None,
                 target: Callable[[SyntheticSample], int] | None = None):
        check_split(split)
        self.spec, self.split, self.transform = spec, split, transform
        self.target = target  # e.g. lambda s: s.meta["coarse_label"]; default: the fine-grained class

    def __len__(self) -> int:
        return self.spec.split_size(self.split)

    def __getitem__(self, index: int):
        sample = render(self.spec, self.split, index)
        image = self.transform(sample.image) if self.transform else sample.image
        return image, (self.target(sample) if self.target else sample.label)
