"""Readers of each data set's own published layout, turned into uniform samples for the shard writer.

`open_source(name, root, options)` returns a `Source`: the class names and, per split, a stream of
`Sample(key, image, label, meta)` where `image` is the file's JPEG bytes (passed through untouched)
or a PIL image, `label` indexes `class_names`, and `meta` is JSON-able per-sample information
(boxes, parts, taxonomy). Keys are stable across runs and contain no dots (WebDataset reads
everything after the first dot as an extension). File-based sources shuffle their samples with a
fixed seed, so that every shard holds a mix of classes and a rebuild writes identical shards.

Layouts are documented in `../shared/NOTES.md` ("Data sets"); a root that does not match raises a
`DatasetLayoutError` naming the missing file.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import random
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from lcr_core.errors import LCRError

SOURCES = ("cub", "cars", "aircraft", "inat2019", "imagefolder", "synthetic")
ORDER_SEED = 20230601  # fixed: the same root always gives the same shards
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
AIRCRAFT_BANNER = 20  # px of copyright banner at the bottom of every FGVC-Aircraft image
AIRCRAFT_LEVELS = ("variant", "family", "manufacturer")
AIRCRAFT_CLASS_FILES = {"variant": "variants.txt", "family": "families.txt", "manufacturer": "manufacturers.txt"}

log = logging.getLogger("lcr.converters")


class DatasetLayoutError(LCRError):
    """The data-set root does not have the published layout; the message names what is missing."""


@dataclass
class Sample:
    key: str
    image: bytes | Image.Image
    label: int
    meta: dict[str, Any]


@dataclass
class Source:
    """A data set ready to be written: `splits[name]()` streams that split's samples."""

    dataset: str  # e.g. "CUB-200-2011"
    class_names: list[str]
    splits: dict[str, Callable[[], Iterator[Sample]]]
    sizes: dict[str, int]  # samples per split, for progress bars
    options: dict[str, Any] = field(default_factory=dict)  # what was selected (level, super-category, spec)
    root: str | None = None  # the absolute folder it was read from (None: generated)


@dataclass
class _Record:
    """One image file of a file-based data set, read only when it is written."""

    key: str
    path: Path
    label: int
    meta: dict[str, Any]


def safe_key(text: str) -> str:
    """A WebDataset key: letters, digits, '_' and '-' only (no dots, no slashes)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


def _require(path: Path, dataset: str, what: str = "") -> Path:
    if not path.exists():
        hint = f" ({what})" if what else ""
        raise DatasetLayoutError(f"{dataset} root: {path} is missing{hint}; expected the published {dataset} layout")
    return path


def _lines(path: Path) -> list[str]:
    return [line.rstrip("\n\r") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _numbered(path: Path, dataset: str) -> dict[int, list[str]]:
    """`<id> <field> <field> ...` lines (CUB's txt files) -> {id: fields}."""
    table = {}
    for number, line in enumerate(_lines(path), 1):
        head, *rest = line.split()
        if not head.isdigit():
            raise DatasetLayoutError(f"{dataset} root: {path} line {number} {line!r}: expected '<id> ...'")
        table[int(head)] = rest
    return table


def _unchanged(data: bytes) -> bytes:
    return data


def open_image(data: bytes) -> Image.Image | None:
    """The fully decoded image, or None: `Image.open` reads only the header, so a truncated or garbage
    file passes it; only `load()` decodes every pixel."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None
    return image


def _file_samples(records: list[_Record], dataset: str,
                  load: Callable[[bytes], bytes | Image.Image] = _unchanged) -> Iterator[Sample]:
    """Stream records in a fixed shuffled order, reading each image file only now."""
    order = list(records)
    random.Random(ORDER_SEED).shuffle(order)
    for record in order:
        try:
            data = record.path.read_bytes()
        except FileNotFoundError:
            raise DatasetLayoutError(f"{dataset} root: image {record.path} is listed but missing; "
                                     "expected every listed image to exist") from None
        yield Sample(record.key, load(data), record.label, record.meta)


def _file_source(dataset: str, class_names: list[str], records: dict[str, list[_Record]],
                 options: dict[str, Any] | None = None,
                 load: Callable[[bytes], bytes | Image.Image] = _unchanged) -> Source:
    return Source(
        dataset=dataset,
        class_names=class_names,
        splits={split: (lambda rs=rs: _file_samples(rs, dataset, load)) for split, rs in records.items()},
        sizes={split: len(rs) for split, rs in records.items()},
        options=options or {},
    )


def _no_options(name: str, options: dict[str, Any]) -> None:
    if options:
        raise LCRError(f"source {name!r} takes no options, got {', '.join(sorted(options))}")


# ---------------------------------------------------------------------------------------------
# CUB-200-2011

def cub(root: Path, options: dict[str, Any]) -> Source:
    """`images.txt`, `image_class_labels.txt`, `train_test_split.txt` (1 = train), `classes.txt`;
    bounding boxes and part locations, when present, go into each sample's meta."""
    _no_options("cub", options)
    name = "CUB-200-2011"
    root = root / "CUB_200_2011" if (root / "CUB_200_2011" / "images.txt").exists() else root
    images = _numbered(_require(root / "images.txt", name), name)
    labels = _numbered(_require(root / "image_class_labels.txt", name), name)
    is_train = _numbered(_require(root / "train_test_split.txt", name), name)
    classes = _numbered(_require(root / "classes.txt", name), name)
    _require(root / "images", name, "the image folder")
    boxes = _numbered(root / "bounding_boxes.txt", name) if (root / "bounding_boxes.txt").exists() else {}
    parts = _cub_parts(root, name)

    class_ids = sorted(classes)
    class_names = [re.sub(r"^\d+\.", "", " ".join(classes[i])) for i in class_ids]
    label_of = {class_id: index for index, class_id in enumerate(class_ids)}
    records: dict[str, list[_Record]] = {"train": [], "test": []}
    for image_id, (relpath, *_) in sorted(images.items()):
        if image_id not in labels or image_id not in is_train:
            raise DatasetLayoutError(f"{name} root: image id {image_id} ({relpath}) has no line in "
                                     "image_class_labels.txt or train_test_split.txt")
        meta: dict[str, Any] = {"image_id": image_id, "file": relpath}
        if image_id in boxes:
            meta["bbox_xywh"] = [float(v) for v in boxes[image_id]]
        if image_id in parts:
            meta["parts"] = parts[image_id]
        split = "train" if is_train[image_id][0] == "1" else "test"
        records[split].append(_Record(safe_key(Path(relpath).stem), root / "images" / relpath,
                                      label_of[int(labels[image_id][0])], meta))
    return _file_source(name, class_names, records)


def _cub_parts(root: Path, name: str) -> dict[int, list[dict[str, Any]]]:
    """`parts/parts.txt` (`<part id> <name with spaces>`), `parts/part_locs.txt` (`<image> <part> x y visible`)."""
    names_file, locs_file = root / "parts" / "parts.txt", root / "parts" / "part_locs.txt"
    if not (names_file.exists() and locs_file.exists()):
        return {}
    part_names = {pid: " ".join(words) for pid, words in _numbered(names_file, name).items()}
    parts: dict[int, list[dict[str, Any]]] = {}
    for line in _lines(locs_file):
        image_id, part_id, x, y, visible = line.split()
        parts.setdefault(int(image_id), []).append({
            "part": part_names.get(int(part_id), part_id), "x": float(x), "y": float(y),
            "visible": int(float(visible))})
    return parts


# ---------------------------------------------------------------------------------------------
# Stanford Cars

def cars(root: Path, options: dict[str, Any]) -> Source:
    """The devkit (`devkit/cars_meta.mat`, `devkit/cars_train_annos.mat`,
    `cars_test_annos_withlabels.mat`, images in `cars_train/`, `cars_test/`) or the common CSV
    variant (`names.csv`, `anno_train.csv`, `anno_test.csv` with `fname,x1,y1,x2,y2,class` lines)."""
    _no_options("cars", options)
    name = "Stanford-Cars"
    if (root / "devkit" / "cars_meta.mat").exists():
        class_names, annotations = _cars_devkit(root, name)
        layout = "devkit"
    elif (root / "names.csv").exists():
        class_names, annotations = _cars_csv(root, name)
        layout = "csv"
    else:
        raise DatasetLayoutError(f"{name} root: {root} has neither devkit/cars_meta.mat nor names.csv; "
                                 "expected the devkit layout or the CSV variant")
    records = {}
    for split, rows in annotations.items():
        images = _cars_image_index(root, split, name)
        records[split] = []
        for fname, box, class_id in rows:
            if not 1 <= class_id <= len(class_names):
                raise DatasetLayoutError(f"{name} root: {split} image {fname} has class {class_id}; "
                                         f"expected 1..{len(class_names)}")
            if fname not in images:
                raise DatasetLayoutError(f"{name} root: {split} image {fname} is listed but missing; "
                                         "expected every listed image to exist")
            records[split].append(_Record(safe_key(Path(fname).stem), images[fname], class_id - 1,
                                          {"file": fname, "bbox_x1y1x2y2": box}))
    return _file_source(f"{name} ({layout})", class_names, records)


def _cars_devkit(root: Path, name: str) -> tuple[list[str], dict[str, list]]:
    from scipy.io import loadmat  # only this layout needs scipy

    def load(path: Path) -> dict:
        return loadmat(path, squeeze_me=True)

    class_names = [str(n) for n in load(root / "devkit" / "cars_meta.mat")["class_names"]]
    test_file = next((p for p in (root / "devkit" / "cars_test_annos_withlabels.mat",
                                  root / "cars_test_annos_withlabels.mat") if p.exists()), None)
    files = {"train": _require(root / "devkit" / "cars_train_annos.mat", name)}
    if test_file is not None:  # the devkit alone has no test labels; they were published separately
        files["test"] = test_file
    annotations = {}
    for split, path in files.items():
        annos = load(path)["annotations"]
        annos = annos.reshape(-1)  # squeeze_me turns a single annotation into a 0-d array
        annotations[split] = [
            (str(a["fname"]), [int(a[f"bbox_{c}"]) for c in ("x1", "y1", "x2", "y2")], int(a["class"]))
            for a in annos]
    return class_names, annotations


def _cars_csv(root: Path, name: str) -> tuple[list[str], dict[str, list]]:
    class_names = _lines(root / "names.csv")
    annotations = {}
    for split in ("train", "test"):
        path = _require(root / f"anno_{split}.csv", name)
        rows = []
        with open(path, newline="", encoding="utf-8") as stream:
            for number, row in enumerate(csv.reader(stream), 1):
                if not row:
                    continue
                try:
                    rows.append((row[0], [int(v) for v in row[1:5]], int(row[5])))
                except (IndexError, ValueError):
                    raise DatasetLayoutError(f"{name} root: {path} line {number} {','.join(row)!r}: "
                                             "expected fname,x1,y1,x2,y2,class") from None
        annotations[split] = rows
    return class_names, annotations


def _cars_image_index(root: Path, split: str, name: str) -> dict[str, Path]:
    """File name -> path. The devkit keeps images flat in cars_<split>/; copies of the CSV variant nest
    them (car_data/car_data/<split>/<class>/...), so look through the first folder that exists."""
    candidates = [root / f"cars_{split}", root / "car_data" / "car_data" / split, root / "car_data" / split,
                  root / split]
    folder = next((c for c in candidates if c.is_dir()), None)
    if folder is None:
        raise DatasetLayoutError(f"{name} root: no image folder for the {split} split; expected one of "
                                 + ", ".join(str(c.relative_to(root)) for c in candidates))
    return {p.name: p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS}


# ---------------------------------------------------------------------------------------------
# FGVC-Aircraft

def aircraft(root: Path, options: dict[str, Any]) -> Source:
    """`data/images/<id>.jpg`, `data/images_<level>_{trainval,test}.txt` (`<id> <label with spaces>`),
    `data/{variants,families,manufacturers}.txt`. Splits: train = trainval, test = test. Option
    `level` = variant (default) | family | manufacturer. The 20-px banner at the bottom is cropped."""
    name = "FGVC-Aircraft-2013b"
    unknown = set(options) - {"level"}
    if unknown:
        raise LCRError(f"source 'aircraft' option {min(unknown)!r}: expected only 'level'")
    level = options.get("level", "variant")
    if level not in AIRCRAFT_LEVELS:
        raise LCRError(f"source 'aircraft' option level={level!r}: expected one of {', '.join(AIRCRAFT_LEVELS)}")
    data = root / "data" if (root / "data").is_dir() else root
    class_names = _lines(_require(data / AIRCRAFT_CLASS_FILES[level], name))
    label_of = {n: i for i, n in enumerate(class_names)}
    _require(data / "images", name, "the image folder")

    records = {}
    for split, source_split in (("train", "trainval"), ("test", "test")):
        # every level's labels that are present go into the meta; `level` picks the class
        labels = {lv: _aircraft_labels(data / f"images_{lv}_{source_split}.txt", name)
                  for lv in AIRCRAFT_LEVELS if (data / f"images_{lv}_{source_split}.txt").exists()}
        if level not in labels:
            _require(data / f"images_{level}_{source_split}.txt", name)
        records[split] = []
        for image_id, label in labels[level].items():
            if label not in label_of:
                raise DatasetLayoutError(f"{name} root: image {image_id} has {level} {label!r}, which is not "
                                         f"in {AIRCRAFT_CLASS_FILES[level]}")
            meta = {"image_id": image_id, **{lv: table.get(image_id) for lv, table in labels.items()}}
            records[split].append(_Record(safe_key(image_id), data / "images" / f"{image_id}.jpg",
                                          label_of[label], meta))
    return _file_source(name, class_names, records, {"level": level}, load=_without_banner)


def _aircraft_labels(path: Path, name: str) -> dict[str, str]:
    table = {}
    for number, line in enumerate(_lines(path), 1):
        image_id, _, label = line.partition(" ")  # labels contain spaces: split on the first only
        if not label:
            raise DatasetLayoutError(f"{name} root: {path} line {number} {line!r}: expected '<id> <label>'")
        table[image_id] = label
    return table


def _without_banner(data: bytes) -> bytes | Image.Image:
    image = open_image(data)
    if image is None:
        return data  # undecodable: passed on as is, for the shard writer to skip and count
    width, height = image.size
    return image.crop((0, 0, width, height - AIRCRAFT_BANNER)) if height > AIRCRAFT_BANNER else image


# ---------------------------------------------------------------------------------------------
# iNaturalist 2019

def inat2019(root: Path, options: dict[str, Any]) -> Source:
    """COCO-style `train2019.json` / `val2019.json` (train and test splits); file names
    `train_val2019/<super-category>/<category>/<md5>.jpg`. Option `supercategory` (e.g. Birds) keeps
    one super-category and numbers its classes 0..n-1; the taxonomy goes into each sample's meta."""
    name = "iNat2019"
    unknown = set(options) - {"supercategory"}
    if unknown:
        raise LCRError(f"source 'inat2019' option {min(unknown)!r}: expected only 'supercategory'")
    wanted = options.get("supercategory")
    tables = {split: _inat_table(_require(root / f"{stem}.json", name), name)
              for split, stem in (("train", "train2019"), ("test", "val2019"))}
    categories = {c["id"]: c for table in tables.values() for c in table["categories"]}

    def supercategory(file_name: str) -> str:
        parts = file_name.split("/")
        return parts[1] if len(parts) > 2 else ""

    chosen: dict[str, list[tuple[dict, int]]] = {}
    for split, table in tables.items():
        category_of = {a["image_id"]: a["category_id"] for a in table["annotations"]}
        chosen[split] = [(image, category_of[image["id"]]) for image in table["images"]
                         if image["id"] in category_of
                         and (wanted is None or supercategory(image["file_name"]) == wanted)]
    if wanted is not None and not chosen["train"]:
        found = sorted({supercategory(i["file_name"]) for i in tables["train"]["images"]})
        raise LCRError(f"source 'inat2019' option supercategory={wanted!r}: no such super-category; "
                       f"expected one of {', '.join(found)}")
    class_ids = sorted({category for rows in chosen.values() for _, category in rows})
    label_of = {category: index for index, category in enumerate(class_ids)}
    class_names = [str(categories[c].get("name", c)) for c in class_ids]
    records = {}
    for split, rows in chosen.items():
        records[split] = [
            _Record(safe_key(Path(image["file_name"]).stem), root / image["file_name"], label_of[category],
                    {"image_id": image["id"], "file": image["file_name"], "category_id": category,
                     "supercategory": supercategory(image["file_name"]),
                     "taxonomy": {k: v for k, v in categories[category].items() if k != "id"}})
            for image, category in rows]
    return _file_source(name, class_names, records, {"supercategory": wanted} if wanted else {})


def _inat_table(path: Path, name: str) -> dict[str, list]:
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DatasetLayoutError(f"{name} root: {path} is not valid JSON ({err})") from None
    missing = [k for k in ("images", "annotations", "categories") if k not in table]
    if missing:
        raise DatasetLayoutError(f"{name} root: {path} has no {missing[0]!r} list; expected COCO-style "
                                 "images, annotations and categories")
    return table


# ---------------------------------------------------------------------------------------------
# ImageFolder

def imagefolder(root: Path, options: dict[str, Any]) -> Source:
    """`root/<class>/**/<image>`, or `root/<split>/<class>/...` when root holds train/ (and test/ or
    val/, written as the test split). Classes are the sorted folder names, shared by all splits. A
    folder without images in any split is left out with a warning: as a class it would have no sample,
    yet count in the class list (chance levels, probe outputs)."""
    _no_options("imagefolder", options)
    name = "ImageFolder"
    if not root.is_dir():
        raise DatasetLayoutError(f"{name} root: {root} is not a folder; expected root/<class>/<image>")
    if (root / "train").is_dir():
        split_dirs = {"train": root / "train"}
        test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
        if test_dir is not None:
            split_dirs["test"] = test_dir
    else:
        split_dirs = {"train": root}
    images = {split: _class_images(folder) for split, folder in split_dirs.items()}
    folders = sorted({class_name for found in images.values() for class_name in found})
    if not folders:
        raise DatasetLayoutError(f"{name} root: {root} has no class folders; expected root/<class>/<image>")
    class_names = [c for c in folders if any(found.get(c) for found in images.values())]
    for empty in sorted(set(folders) - set(class_names)):
        log.warning("%s root: class folder %s has no images; left out of the classes", name,
                    " and ".join(str(folder / empty) for folder in split_dirs.values() if (folder / empty).is_dir()))
    records = {split: _imagefolder_records(folder, images[split], class_names, name)
               for split, folder in split_dirs.items()}
    return _file_source(name, class_names, records)


def _class_images(folder: Path) -> dict[str, list[Path]]:
    """{class folder name: its image files, sorted, at any depth}."""
    return {d.name: sorted(p for p in d.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
            for d in folder.iterdir() if d.is_dir()}


def _imagefolder_records(folder: Path, images: dict[str, list[Path]], class_names: list[str],
                         name: str) -> list[_Record]:
    records, seen = [], {}
    for label, class_name in enumerate(class_names):
        for path in images.get(class_name, []):
            relative = path.relative_to(folder)
            key = safe_key(str(relative.with_suffix("")).replace("/", "-"))
            if key in seen:
                raise DatasetLayoutError(f"{name} root: {path} and {seen[key]} map to the same key {key!r}; "
                                         "expected file names that differ in more than punctuation or extension")
            seen[key] = path
            records.append(_Record(key, path, label, {"file": str(relative)}))
    if not records:
        raise DatasetLayoutError(f"{name} root: {folder} has no images with extensions {' '.join(IMAGE_EXTENSIONS)}")
    return records


# ---------------------------------------------------------------------------------------------
# Synthetic (DESIGN §4)

def synthetic(root: Path | None, options: dict[str, Any]) -> Source:
    """`lcr_core.synthetic`'s generator; options are `SyntheticSpec` fields (root is not used), plus
    `drop` = N (default 0): the generator's next samples instead, as a new drop to `--append`. Drop N
    of a split is samples N * size .. (N + 1) * size - 1: new keys and images, the same classes."""
    from lcr_core import synthetic as gen

    options = dict(options)
    drop = options.pop("drop", 0)
    if isinstance(drop, bool) or not isinstance(drop, int) or drop < 0:
        raise LCRError(f"source 'synthetic' option drop={drop!r}: expected an integer >= 0")
    spec = gen.SyntheticSpec.from_options(options)
    # render() takes indices below the split's size only; the per-class counts affect nothing else
    # about an image, so a spec with (drop + 1) times as many samples reaches this drop's
    reach = replace(spec, train_per_class=spec.train_per_class * (drop + 1),
                    test_per_class=spec.test_per_class * (drop + 1))

    def samples(split: str) -> Iterator[Sample]:
        size = spec.split_size(split)
        for index in range(drop * size, (drop + 1) * size):
            s = gen.render(reach, split, index)
            yield Sample(s.key, s.image, s.label, s.meta)

    return Source(
        dataset="synthetic",
        class_names=gen.class_names(spec),
        splits={split: (lambda split=split: samples(split)) for split in gen.SPLITS},
        sizes={split: spec.split_size(split) for split in gen.SPLITS},
        options=spec.to_dict() | ({"drop": drop} if drop else {}),
    )


CONVERTERS: dict[str, Callable[[Path | None, dict[str, Any]], Source]] = {
    "cub": cub, "cars": cars, "aircraft": aircraft, "inat2019": inat2019,
    "imagefolder": imagefolder, "synthetic": synthetic,
}


def parse_options(pairs: Iterable[str]) -> dict[str, Any]:
    """`key=value` strings from the command line; values are read as YAML (numbers, lists, text)."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise LCRError(f"option {pair!r}: expected key=value")
        options[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return options


def open_source(name: str, root: str | Path | None, options: dict[str, Any] | None = None) -> Source:
    if name not in CONVERTERS:
        raise LCRError(f"source {name!r}: expected one of {', '.join(SOURCES)}")
    if name != "synthetic":
        if root is None:
            raise LCRError(f"source {name!r} needs --root: the folder holding the data set")
        if not Path(root).is_dir():
            raise DatasetLayoutError(f"{name} root: {root} is not a folder; expected the data set's root")
        return replace(CONVERTERS[name](Path(root), dict(options or {})), root=str(Path(root).resolve()))
    return CONVERTERS[name](None, dict(options or {}))
