"""A synthetic fine-grained data set: one kind of object whose classes differ only in small parts,
over cluttered backgrounds that are distinctive per image (DESIGN §4).

Two object families share every knob and guarantee, so a method tuned on one can be reported on the
other (`SyntheticSpec.family`):
- "bird" (the default): a stylised bird in profile over blotchy backgrounds with ellipses, boxes,
  straight lines and triangles as clutter; the class is in the wing patch, crest, tail band, breast
  marking and eye stripe;
- "beetle": a beetle seen from above (wide shell, six jointed legs, antennae) over striped, wavy
  backgrounds with pebbles, leaves, twigs and rings as clutter; the class is in the shell colour,
  horn shape, shell-tip patch, thorax marking and head colour.

Instance discrimination is solvable from the background alone; the class lives only in the parts.
Every pixel-level choice that is not the class is drawn from a numpy Generator seeded by
(seed, split, index) *before* the class is looked at, so rendering one index as two different
classes changes only the part regions.

Pure PIL + numpy, drawn at twice the resolution and box-downsampled (cheap anti-aliasing).
`render(..., with_mask=True)` also returns the object's pixel mask (`SyntheticSample.mask`).
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
CLUTTER_KINDS = 4  # per family: four clutter shapes (the bird's: ellipse, rectangle, thick line, triangle)

# Class-bearing part slots, in the order `num_differing_parts` enables them. Each slot has an anchor
# in the object's own frame (body length 1, facing +x, y down) and variants that all stay within
# PART_EXTENT * part_size of the anchor, so the slot's region is known whatever the class.
# These are the bird's; every family has its own table of the same form (`FAMILIES[name].slots`).
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
EDGE_MARGIN = 0.075  # fraction of the image side kept free around the object

_UNIT_CIRCLE = {n: np.stack([np.cos(t), np.sin(t)], axis=1)
                for n in (10, 20) for t in [np.linspace(0, 2 * math.pi, n, endpoint=False)]}


def _ellipse(centre: tuple[float, float], axes: tuple[float, float], n: int = 20) -> np.ndarray:
    return _UNIT_CIRCLE[n] * axes + centre


def _quad(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([(x0, y0), (x1, y0), (x1, y1), (x0, y1)])


def _rgb(colour: np.ndarray | tuple) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.clip(np.asarray(colour), 0, 255))


def _flat(points: np.ndarray) -> list[float]:
    return points.ravel().tolist()  # the fastest vertex format PIL accepts


class _Pen:
    """Draws the object's shapes on the image and, when there is one, in white on the object mask."""

    def __init__(self, draw: ImageDraw.ImageDraw, mask: ImageDraw.ImageDraw | None = None):
        self.draw, self.mask = draw, mask

    def polygon(self, points: list[float], fill: tuple[int, int, int]) -> None:
        self.draw.polygon(points, fill=fill)
        if self.mask is not None:
            self.mask.polygon(points, fill=255)

    def line(self, points: list[float], fill: tuple[int, int, int], width: int) -> None:
        self.draw.line(points, fill=fill, width=width)
        if self.mask is not None:
            self.mask.line(points, fill=255, width=width)


def _clutter_colours(spec: SyntheticSpec, layout: dict[str, Any]) -> list[tuple[int, ...]]:
    """Clutter colours pulled towards the background's mean by `clutter_contrast`."""
    mean = layout["bg_corners"].mean(axis=0)
    colours = np.clip(mean + spec.clutter_contrast * (layout["clutter_colour"] - mean), 0, 255).astype(int)
    return list(map(tuple, colours.tolist()))


# ---------------------------------------------------------------------------------------------
# The bird: profile view, blotchy background.

BODY_AXES = (0.32, 0.14)
HEAD_CENTRE, HEAD_RADIUS = (0.38, -0.06), 0.105
BEAK = ((0.47, -0.09), (0.6, -0.05), (0.47, -0.02))
WING = ((0.16, -0.03), (-0.18, -0.06), (-0.3, 0.07), (0.06, 0.09))
TAIL = ((-0.27, -0.04), (-0.52, -0.13), (-0.52, 0.09), (-0.27, 0.05))
LEGS = (((0.02, 0.12), (0.0, 0.24)), ((0.1, 0.12), (0.12, 0.24)))


def _bird_outline() -> np.ndarray:
    return np.concatenate([TAIL, _ellipse((0, 0), BODY_AXES), _ellipse(HEAD_CENTRE, (HEAD_RADIUS,) * 2), BEAK,
                           *LEGS])


def _bird_shade(rng: np.random.Generator) -> np.ndarray:
    hue = rng.uniform(0.02, 0.16)  # browns to olives: a plausible plumage shade, class-independent
    return np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.15, 0.55), rng.uniform(0.35, 0.8))) * 255


def _bird_texture(spec: SyntheticSpec, rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal((6, 6, 3))  # blotch amplitudes on a 6 x 6 grid


def _bird_background(spec: SyntheticSpec, layout: dict[str, Any]) -> Image.Image:
    """A bilinear blend of four random corner colours plus low-frequency blotches: unique per image.
    Interpolated at the output size, then doubled by pixel repetition (3x cheaper, same after `reduce`)."""
    corners = layout["bg_corners"].reshape(2, 2, 3)
    weights = np.linspace(0.0, 1.0, 6)[:, None, None]
    left = corners[0, 0] * (1 - weights) + corners[1, 0] * weights
    right = corners[0, 1] * (1 - weights) + corners[1, 1] * weights
    grid = left * (1 - weights.transpose(1, 0, 2)) + right * weights.transpose(1, 0, 2)
    grid += 60.0 * spec.clutter_contrast * layout["texture"]
    small = Image.fromarray(np.clip(grid, 0, 255).astype(np.uint8), "RGB")
    side = spec.image_size
    return small.resize((side, side), Image.BILINEAR).resize((side * SUPERSAMPLE,) * 2, Image.NEAREST)


def _bird_clutter(draw: ImageDraw.ImageDraw, spec: SyntheticSpec, layout: dict[str, Any]) -> None:
    points = (layout["clutter_points"] * SUPERSAMPLE).tolist()
    radii = (layout["clutter_size"] * SUPERSAMPLE).tolist()
    for kind, (x, y, x2, y2, x3, y3), r, colour in zip(layout["clutter_kind"].tolist(), points, radii,
                                                      _clutter_colours(spec, layout)):
        if kind == 0:
            draw.ellipse((x - r, y - 0.6 * r, x + r, y + 0.6 * r), fill=colour)
        elif kind == 1:
            draw.rectangle((x - r, y - r / 2, x + r, y + r / 2), fill=colour)
        elif kind == 2:
            draw.line((x, y, x2, y2), fill=colour, width=max(1, int(r / 4)))
        else:
            draw.polygon((x, y, x2, y2, x3, y3), fill=colour)


def _bird_body(pen: _Pen, layout: dict[str, Any], to_image) -> None:
    body = layout["body"]
    dark, light = _rgb(body * 0.6), _rgb(body * 1.15 + 20)
    width = max(1, round(0.02 * layout["length"] * SUPERSAMPLE))
    for leg in LEGS:
        pen.line(_flat(to_image(leg)), fill=PART_COLOURS["dark"], width=width)
    pen.polygon(_flat(to_image(TAIL)), fill=dark)
    pen.polygon(_flat(to_image(_ellipse((0, 0), BODY_AXES))), fill=_rgb(body))
    pen.polygon(_flat(to_image(_ellipse(HEAD_CENTRE, (HEAD_RADIUS, HEAD_RADIUS)))), fill=light)
    pen.polygon(_flat(to_image(BEAK)), fill=PART_COLOURS["orange"])
    pen.polygon(_flat(to_image(WING)), fill=dark)


def _bird_part_shapes(slot: str, variant: str, size: float) -> list[tuple[np.ndarray, str]]:
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


def _bird_finish(pen: _Pen, layout: dict[str, Any], to_image) -> None:
    eye = PART_SLOTS["eye"]["anchor"]
    pen.polygon(_flat(to_image(_ellipse(eye, (0.025, 0.025), 10))), fill=PART_COLOURS["black"])


# ---------------------------------------------------------------------------------------------
# The beetle: seen from above, striped background.

BEETLE_SLOTS: dict[str, dict[str, Any]] = {
    "shell": {"anchor": (-0.12, 0.0), "variants": ("white", "black", "red", "yellow", "blue")},
    "horn": {"anchor": (0.46, 0.0), "variants": ("none", "spike", "pincers", "trident")},
    "tip": {"anchor": (-0.33, 0.0), "variants": ("plain", "white", "black", "orange")},
    "thorax": {"anchor": (0.22, 0.0), "variants": ("plain", "dots", "stripe", "triangle")},
    "head": {"anchor": (0.37, 0.0), "variants": ("plain", "white", "yellow", "red")},
}
SHELL_CENTRE, SHELL_AXES = (-0.12, 0.0), (0.3, 0.165)  # the elytra: the wide rear of the body
THORAX_CENTRE, THORAX_AXES = (0.22, 0.0), (0.1, 0.125)
BEETLE_HEAD_CENTRE, BEETLE_HEAD_AXES = (0.36, 0.0), (0.06, 0.075)
_ONE_SIDE_LEGS = (((0.24, 0.09), (0.32, 0.19), (0.40, 0.22)),  # front leg: reaches forwards
                  ((0.06, 0.13), (0.08, 0.25), (0.02, 0.31)),  # middle leg: reaches out
                  ((-0.14, 0.14), (-0.24, 0.25), (-0.36, 0.28)))  # hind leg: reaches back
BEETLE_LEGS = tuple(tuple((x, sign * y) for x, y in leg) for sign in (-1, 1) for leg in _ONE_SIDE_LEGS)
ANTENNAE = tuple(((0.4, 0.04 * sign), (0.47, 0.1 * sign), (0.55, 0.12 * sign)) for sign in (-1, 1))
BEETLE_EYES = ((0.385, -0.05), (0.385, 0.05))
BEETLE_LEG_WIDTH, ANTENNA_WIDTH = 0.02, 0.012  # in body lengths


def _beetle_outline() -> np.ndarray:
    # line ends padded by half the leg width, so the object box holds the lines' square ends
    pad = _quad(-BEETLE_LEG_WIDTH / 2, -BEETLE_LEG_WIDTH / 2, BEETLE_LEG_WIDTH / 2, BEETLE_LEG_WIDTH / 2)
    ends = np.concatenate([*BEETLE_LEGS, *ANTENNAE])
    return np.concatenate([_ellipse(SHELL_CENTRE, SHELL_AXES), _ellipse(THORAX_CENTRE, THORAX_AXES),
                           _ellipse(BEETLE_HEAD_CENTRE, BEETLE_HEAD_AXES), (ends[:, None, :] + pad).reshape(-1, 2)])


def _beetle_shade(rng: np.random.Generator) -> np.ndarray:
    hue = rng.uniform(0.22, 0.5)  # greens to teals: a plausible shell shade, class-independent
    return np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7))) * 255


def _beetle_texture(spec: SyntheticSpec, rng: np.random.Generator) -> dict[str, Any]:
    return {
        "angle": rng.uniform(0, math.pi),  # stripe direction
        "frequency": rng.uniform(3.0, 8.0),  # stripes per image side
        "phase": rng.uniform(0, 2 * math.pi),
        "warp": rng.uniform(0.5, 2.5),  # radians of waviness along the stripes
        "warp_frequency": rng.uniform(0.5, 2.0),
        "warp_phase": rng.uniform(0, 2 * math.pi),
        "colour": rng.standard_normal(3),  # the stripes' colour direction
    }


TEXTURE_SIDE = 96  # the beetle's background texture is computed on at most this many pixels a side


@functools.lru_cache(maxsize=8)
def _pixel_grid(side: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x and y in [0, 1] of every output pixel, and each pixel's bilinear weights of the four
    background corners (and a zero column for the texture), as float32 (read-only, cached)."""
    t = np.linspace(0.0, 1.0, side, dtype=np.float32)
    y, x = np.meshgrid(t, t, indexing="ij")
    weights = np.stack([(1 - y) * (1 - x), (1 - y) * x, y * (1 - x), y * x, 0 * x], axis=-1).reshape(-1, 5)
    for array in (x, y, weights):
        array.flags.writeable = False
    return x, y, weights


def _beetle_background(spec: SyntheticSpec, layout: dict[str, Any]) -> Image.Image:
    """The same four-corner blend as the bird's plus wavy, sharp-edged stripes of random direction,
    spacing and colour (instead of blotches). Computed at the output size up to TEXTURE_SIDE pixels
    (interpolated above: the same look at every size, at a bounded cost), then doubled by pixel repetition."""
    side, texture = spec.image_size, layout["texture"]
    grid_side = min(side, TEXTURE_SIDE)
    x, y, weights = _pixel_grid(grid_side)
    cos, sin = np.float32(math.cos(texture["angle"])), np.float32(math.sin(texture["angle"]))
    turns = np.float32(2 * math.pi * texture["frequency"]) * (x * cos + y * sin) + np.float32(texture["phase"])
    bend = np.float32(2 * math.pi * texture["warp_frequency"]) * (y * cos - x * sin) + np.float32(texture["warp_phase"])
    stripes = np.tanh(np.float32(2.5) * np.sin(turns + np.float32(texture["warp"]) * np.sin(bend)))
    features = weights.copy()  # one matrix product blends the corners and adds the stripes' colour
    features[:, 4] = stripes.ravel()
    # a colour direction of fixed length: stripes as strong as the bird's blotches (same RMS on average)
    stripe_colour = 1.48 * texture["colour"] / max(float(np.linalg.norm(texture["colour"])), 1e-6)
    colours = np.concatenate([layout["bg_corners"], 60.0 * spec.clutter_contrast * stripe_colour[None]])
    grid = (features @ colours.astype(np.float32)).reshape(grid_side, grid_side, 3)
    image = Image.fromarray(np.clip(grid, 0, 255).astype(np.uint8), "RGB")
    if grid_side < side:
        image = image.resize((side, side), Image.BILINEAR)
    return image.resize((side * SUPERSAMPLE,) * 2, Image.NEAREST)


def _leaf() -> np.ndarray:
    """A pointed lens, 1.2 long either side of its centre and 0.35 wide."""
    u = np.linspace(-1.0, 1.0, 9)
    half = np.stack([1.2 * u, 0.35 * (1 - u ** 2)], axis=1)
    return np.concatenate([half, half[-2:0:-1] * (1, -1)])


_PEBBLE, _LEAF = _ellipse((0, 0), (0.8, 0.55)), _leaf()  # clutter shapes of radius 1


def _beetle_clutter(draw: ImageDraw.ImageDraw, spec: SyntheticSpec, layout: dict[str, Any]) -> None:
    """Pebbles (turned ovals), leaves (pointed lenses), forked twigs and rings."""
    points = (layout["clutter_points"] * SUPERSAMPLE).tolist()
    radii = (layout["clutter_size"] * SUPERSAMPLE).tolist()
    for kind, (x, y, x2, y2, x3, y3), r, colour in zip(layout["clutter_kind"].tolist(), points, radii,
                                                      _clutter_colours(spec, layout)):
        angle = math.atan2(y2 - y, x2 - x)  # the shape's direction
        c, s = math.cos(angle), math.sin(angle)
        if kind < 2:  # pebble or leaf
            turn = np.array([[c * r, s * r], [-s * r, c * r]])
            draw.polygon(_flat((_PEBBLE if kind == 0 else _LEAF) @ turn + (x, y)), fill=colour)
        elif kind == 2:  # twig: a bent thin branch with one side shoot
            bx, by = x + 1.5 * r * c, y + 1.5 * r * s
            tip = (bx + 1.5 * r * math.cos(angle + 0.5), by + 1.5 * r * math.sin(angle + 0.5))
            shoot = (bx + 0.8 * r * math.cos(angle - 0.9), by + 0.8 * r * math.sin(angle - 0.9))
            width = max(1, int(r / 6))
            draw.line((x, y, bx, by, *tip), fill=colour, width=width)
            draw.line((bx, by, *shoot), fill=colour, width=width)
        else:  # ring
            draw.ellipse((x3 - 0.7 * r, y3 - 0.7 * r, x3 + 0.7 * r, y3 + 0.7 * r), outline=colour,
                         width=max(1, int(r / 5)))


def _beetle_body(pen: _Pen, layout: dict[str, Any], to_image) -> None:
    body = layout["body"]
    dark, darker = _rgb(body * 0.6), _rgb(body * 0.4)
    scale = layout["length"] * SUPERSAMPLE
    legs, feelers = max(1, round(BEETLE_LEG_WIDTH * scale)), max(1, round(ANTENNA_WIDTH * scale))
    for leg in BEETLE_LEGS:
        pen.line(_flat(to_image(leg)), fill=PART_COLOURS["dark"], width=legs)
    for antenna in ANTENNAE:
        pen.line(_flat(to_image(antenna)), fill=PART_COLOURS["dark"], width=feelers)
    pen.polygon(_flat(to_image(_ellipse(SHELL_CENTRE, SHELL_AXES))), fill=_rgb(body))
    pen.line(_flat(to_image(((0.17, 0.0), (-0.41, 0.0)))), fill=dark, width=feelers)  # the elytra's seam
    pen.polygon(_flat(to_image(_ellipse(THORAX_CENTRE, THORAX_AXES))), fill=dark)
    pen.polygon(_flat(to_image(_ellipse(BEETLE_HEAD_CENTRE, BEETLE_HEAD_AXES))), fill=darker)


def _beetle_part_shapes(slot: str, variant: str, size: float) -> list[tuple[np.ndarray, str]]:
    """Polygons (object frame, relative to the slot's anchor) and colour names of one part variant."""
    s = size
    if slot == "shell":  # a patch of colour on each wing case
        return [(_ellipse((0, y), (1.0 * s, 0.42 * s)), variant) for y in (-0.45 * s, 0.45 * s)]
    if slot == "horn":
        shapes = {
            "none": [],
            "spike": [np.array([(-0.6 * s, -0.5 * s), (s, 0.0), (-0.6 * s, 0.5 * s)])],
            "pincers": [np.array([(-0.6 * s, y * 0.05 * s), (0.4 * s, y * 1.0 * s), (0.9 * s, y * 0.5 * s),
                                  (0.2 * s, y * 0.45 * s)]) for y in (-1, 1)],
            "trident": [np.array([(-0.6 * s, y - 0.22 * s), (0.9 * s, y), (-0.6 * s, y + 0.22 * s)])
                        for y in (-0.65 * s, 0.0, 0.65 * s)],
        }[variant]
        return [(shape, "dark") for shape in shapes]
    if slot == "tip":  # a coloured patch on the rear end of the shell
        return [] if variant == "plain" else [(_ellipse((0, 0), (0.45 * s, 0.8 * s)), variant)]
    if slot == "thorax":
        shapes = {
            "plain": [],
            "dots": [(_ellipse((0, y), (0.3 * s, 0.3 * s)), "white") for y in (-0.55 * s, 0.55 * s)],
            "stripe": [(_quad(-s, -0.22 * s, s, 0.22 * s), "black")],
            "triangle": [(np.array([(0.8 * s, 0.0), (-0.6 * s, -0.75 * s), (-0.6 * s, 0.75 * s)]), "yellow")],
        }
        return shapes[variant]
    # head: a coloured cap over the head; the eyes are common to every class and drawn on top
    return [] if variant == "plain" else [(_ellipse((0, 0), (0.5 * s, 0.6 * s)), variant)]


def _beetle_finish(pen: _Pen, layout: dict[str, Any], to_image) -> None:
    for eye in BEETLE_EYES:
        pen.polygon(_flat(to_image(_ellipse(eye, (0.02, 0.02), 10))), fill=PART_COLOURS["black"])


# ---------------------------------------------------------------------------------------------
# The families.

@dataclass(frozen=True, eq=False)
class Family:
    """What differs between object families; everything else (the knobs, the pose, the class
    mechanism, the metadata) is shared."""

    slots: dict[str, dict[str, Any]]  # class-bearing part slots, as PART_SLOTS
    outline: np.ndarray  # points (object frame) that bound the body, parts aside
    shade: Callable[[np.random.Generator], np.ndarray]  # draws the body colour (RGB, 0..255)
    texture: Callable[[SyntheticSpec, np.random.Generator], Any]  # draws the background's own randomness
    background: Callable[[SyntheticSpec, dict[str, Any]], Image.Image]  # supersampled background
    clutter: Callable[[ImageDraw.ImageDraw, SyntheticSpec, dict[str, Any]], None]
    body: Callable[[_Pen, dict[str, Any], Callable], None]
    part_shapes: Callable[[str, str, float], list[tuple[np.ndarray, str]]]
    finish: Callable[[_Pen, dict[str, Any], Callable], None]  # drawn over the parts, the same for every class

    @functools.cached_property
    def body_radius(self) -> float:
        return float(np.linalg.norm(self.outline, axis=1).max())  # in body lengths, about 0.6


FAMILIES: dict[str, Family] = {
    "bird": Family(PART_SLOTS, _bird_outline(), _bird_shade, _bird_texture, _bird_background, _bird_clutter,
                   _bird_body, _bird_part_shapes, _bird_finish),
    "beetle": Family(BEETLE_SLOTS, _beetle_outline(), _beetle_shade, _beetle_texture, _beetle_background,
                     _beetle_clutter, _beetle_body, _beetle_part_shapes, _beetle_finish),
}
BODY_RADIUS = FAMILIES["bird"].body_radius


def object_radius(part_size: float, family: str = "bird") -> float:
    """How far (in body lengths) the object, parts included, reaches from its centre."""
    kind = FAMILIES[family]
    anchors = max(math.hypot(*slot["anchor"]) for slot in kind.slots.values())
    return max(kind.body_radius, anchors + PART_EXTENT * part_size)


def max_object_scale(part_size: float, family: str = "bird") -> float:
    return math.floor((0.5 - EDGE_MARGIN) / object_radius(part_size, family) * 100) / 100


@dataclass(frozen=True)
class SyntheticSpec:
    """What to generate and how hard it is. The defaults are the calibrated demo setting (DESIGN §4)."""

    num_classes: int = 12
    train_per_class: int = 40
    test_per_class: int = 20
    image_size: int = 96
    seed: int = 0
    part_size: float = 0.18  # radius of a class-bearing part, as a fraction of the body length
    num_differing_parts: int = 3  # how many part slots vary between classes (1..5, the family's slots)
    clutter_density: float = 0.5  # clutter shapes per image = round(24 * density)
    clutter_contrast: float = 0.3  # 0..1: colour deviation of clutter (and texture) from the background's hues
    # 0..1: spread of the background's colours around mid-grey (1 = the whole RGB cube). A wide spread
    # makes the global background colour an instance cue that even colour jitter leaves intact.
    background_variety: float = 0.2
    object_scale: tuple[float, float] = (0.58, 0.62)  # body length as a fraction of the image side
    max_tilt: float = 30.0  # degrees the object may pitch up or down; it also faces left or right
    family: str = "bird"  # the object family (FAMILIES): "bird" or "beetle"

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

        if not isinstance(self.family, str) or self.family not in FAMILIES:
            bad("family", f"one of {', '.join(FAMILIES)}")
        slots = FAMILIES[self.family].slots
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
        if self.num_differing_parts > len(slots):
            bad("num_differing_parts", f"at most {len(slots)} (the {self.family}'s part slots: {', '.join(slots)})")
        most = max_classes(self.num_differing_parts, self.family)
        if self.num_classes > most:
            bad("num_classes", f"at most {most} with num_differing_parts={self.num_differing_parts}")
        if not 0.03 <= self.part_size <= 0.2:
            bad("part_size", "a number in [0.03, 0.2] (fraction of the body length)")
        if not 0.0 <= self.clutter_density <= 5.0:
            bad("clutter_density", "a number in [0, 5]")
        if not 0.0 <= self.clutter_contrast <= 1.0:
            bad("clutter_contrast", "a number in [0, 1]")
        if not 0.0 <= self.background_variety <= 1.0:
            bad("background_variety", "a number in [0, 1]")
        low_high = self.object_scale
        largest = max_object_scale(self.part_size, self.family)
        if (not isinstance(low_high, tuple) or len(low_high) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in low_high)
                or not 0.2 <= low_high[0] <= low_high[1] <= largest):
            bad("object_scale", f"a pair (low, high) with 0.2 <= low <= high <= {largest} "
                                f"(larger objects leave the frame)")
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
    # Only with render(..., with_mask=True): where the object (body, legs, parts) is, a bool array
    # (image_size x image_size, rows first): the output pixels that the object's shapes cover at least
    # half of. Not part of `meta`, which goes into the JSON of shards.
    mask: np.ndarray | None = None


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise LCRError(f"synthetic split {split!r}: expected one of {', '.join(SPLITS)}")


def max_classes(num_differing_parts: int, family: str = "bird") -> int:
    slots = FAMILIES[family].slots
    return math.prod(len(slot["variants"]) for slot in list(slots.values())[:num_differing_parts])


def class_parts(spec: SyntheticSpec) -> tuple[dict[str, str], ...]:
    """The part variants of each class: distinct combinations over the differing slots, in a fixed
    shuffled order (independent of `seed`, so class k means the same thing in every data set)."""
    return _class_parts(spec.family, spec.num_differing_parts, spec.num_classes)


@functools.lru_cache(maxsize=64)
def _class_parts(family: str, num_differing_parts: int, num_classes: int) -> tuple[dict[str, str], ...]:
    slots = FAMILIES[family].slots
    differing = list(slots)[:num_differing_parts]
    combos = list(itertools.product(*(slots[name]["variants"] for name in differing)))
    order = np.random.default_rng(len(combos)).permutation(len(combos))
    fixed = {name: slot["variants"][0] for name, slot in slots.items()}
    return tuple(fixed | dict(zip(differing, combos[i])) for i in order[:num_classes])


def class_names(spec: SyntheticSpec) -> list[str]:
    differing = list(FAMILIES[spec.family].slots)[: spec.num_differing_parts]
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
    family = FAMILIES[spec.family]
    side = spec.image_size
    length = rng.uniform(*spec.object_scale) * side
    facing = 1 if rng.random() < 0.5 else -1
    tilt = rng.uniform(-spec.max_tilt, spec.max_tilt)
    # keep the object inside a margin wider than what the evaluation center crop cuts (256/224: 6.25 %)
    margin = EDGE_MARGIN * side + object_radius(spec.part_size, spec.family) * length
    centre = rng.uniform(min(margin, side / 2), max(side - margin, side / 2), 2)
    body = family.shade(rng)
    n = round(24 * spec.clutter_density)
    return {
        "length": length, "facing": facing, "tilt": tilt, "centre": centre, "body": body,
        "bg_corners": 127.5 + spec.background_variety * (rng.uniform(0, 255, (4, 3)) - 127.5),
        "texture": family.texture(spec, rng),
        "clutter_kind": rng.integers(CLUTTER_KINDS, size=n),
        "clutter_points": rng.uniform(-0.1, 1.1, (n, 6)) * side,  # centre or end points, third vertex
        "clutter_size": rng.uniform(0.03, 0.25, n) * side,
        "clutter_colour": rng.uniform(0, 255, (n, 3)),
    }


# ---------------------------------------------------------------------------------------------
# Drawing.

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


def _draw_parts(pen: _Pen, family: Family, parts: dict[str, str], size: float, to_image) -> None:
    for slot, variant in parts.items():
        anchor = np.array(family.slots[slot]["anchor"])
        for shape, colour in family.part_shapes(slot, variant, size):
            pen.polygon(_flat(to_image(shape + anchor)), fill=PART_COLOURS[colour])


def _box(low: np.ndarray, high: np.ndarray, side: int) -> list[int]:
    """Output-pixel box [x0, y0, x1, y1) (exclusive end) around supersampled corners, clipped to the image;
    one pixel of padding covers the box filter of the downsampling."""
    def clip(value: float) -> int:
        return min(max(int(value), 0), side)

    return [clip(math.floor(v / SUPERSAMPLE) - 1) for v in low] + [clip(math.ceil(v / SUPERSAMPLE) + 1) for v in high]


def render(spec: SyntheticSpec, split: str, index: int, label: int | None = None, *,
           with_mask: bool = False) -> SyntheticSample:
    """Sample `index` of `split`. `label` overrides its class without changing anything else (the
    same background, pose and shade), which is how the tests show that classes differ only in parts.
    `with_mask` also draws the object's mask (`SyntheticSample.mask`; 10-25 % more render time)."""
    check_split(split)
    size = spec.split_size(split)
    if not 0 <= index < size:
        raise LCRError(f"synthetic {split} index {index}: expected 0 <= index < {size}")
    label = label_of(spec, index) if label is None else label
    if not 0 <= label < spec.num_classes:
        raise LCRError(f"synthetic label {label}: expected 0 <= label < {spec.num_classes}")
    family = FAMILIES[spec.family]
    rng = np.random.default_rng([spec.seed, SPLITS.index(split), index])
    layout = _draw_layout(spec, rng)
    to_image = _object_frame(layout)

    canvas = family.background(spec, layout)
    draw = ImageDraw.Draw(canvas)
    family.clutter(draw, spec, layout)
    mask_canvas = Image.new("L", canvas.size, 0) if with_mask else None
    pen = _Pen(draw, ImageDraw.Draw(mask_canvas) if mask_canvas is not None else None)
    family.body(pen, layout, to_image)
    _draw_parts(pen, family, class_parts(spec)[label], spec.part_size, to_image)
    family.finish(pen, layout, to_image)
    image = canvas.reduce(SUPERSAMPLE)
    mask = None if mask_canvas is None else np.asarray(mask_canvas.reduce(SUPERSAMPLE)) >= 128  # >= half covered

    side = spec.image_size
    reach = PART_EXTENT * spec.part_size * layout["length"] * SUPERSAMPLE  # a disc stays a disc when turned
    anchors = to_image(np.array([slot["anchor"] for slot in family.slots.values()]))
    part_boxes = {slot: _box(a - reach, a + reach, side) for slot, a in zip(family.slots, anchors)}
    extent = np.concatenate([to_image(family.outline), anchors - reach, anchors + reach])
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
    return SyntheticSample(sample_key(split, index), image, label, meta, mask)


def generate(spec: SyntheticSpec, split: str, *, with_mask: bool = False) -> Iterator[SyntheticSample]:
    for index in range(spec.split_size(split)):
        yield render(spec, split, index, with_mask=with_mask)


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
