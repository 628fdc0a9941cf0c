"""Each converter against a tiny copy of its data set's published layout: the real file names and line
formats (NOTES.md, "Data sets"), a handful of tiny images, `.mat` files written with scipy."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from components.converters import DatasetLayoutError, open_source, safe_key
from components.data import eval_loader, read_manifest
from components.shards import build_shards
from lcr_core.errors import LCRError


def write_jpeg(path: Path, colour=(120, 60, 30), size=(24, 20), banner: int = 0) -> None:
    """A tiny JPEG; `banner` white rows at the bottom stand in for FGVC-Aircraft's copyright strip."""
    image = Image.new("RGB", size, colour)
    if banner:
        image.paste((255, 255, 255), (0, size[1] - banner, size[0], size[1]))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, "JPEG", quality=95)


def write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))


def read_back(out: Path, split: str) -> dict[str, int]:
    """key -> label, as the evaluation reader returns them from the shards."""
    pairs = {}
    for _, labels, keys in eval_loader(str(out / split), 16, 16, batch_size=4, workers=0):
        pairs.update(zip(keys, labels.tolist()))
    return pairs


def samples_of(source, split: str) -> list:
    return list(source.splits[split]())


# ---------------------------------------------------------------------------------------------
# CUB-200-2011

CUB_CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]


@pytest.fixture
def cub_root(tmp_path) -> Path:
    root = tmp_path / "CUB_200_2011"
    images, labels, split, boxes, locs = [], [], [], [], []
    image_id = 0
    for class_id, class_dir in enumerate(CUB_CLASSES, 1):
        bird = class_dir.split(".", 1)[1].title()
        for n in range(3):
            image_id += 1
            relpath = f"{class_dir}/{bird}_00{n + 1}_{790 + image_id}.jpg"
            write_jpeg(root / "images" / relpath, colour=(40 * class_id, 10 * n, 90))
            images.append(f"{image_id} {relpath}")
            labels.append(f"{image_id} {class_id}")
            split.append(f"{image_id} {1 if n < 2 else 0}")  # 1 = train
            boxes.append(f"{image_id} {2.0 + n} 3.0 17.0 12.5")
            locs += [f"{image_id} 1 0.0 0.0 0", f"{image_id} 2 {10.0 + n} 8.5 1"]
    write_lines(root / "images.txt", images)
    write_lines(root / "image_class_labels.txt", labels)
    write_lines(root / "train_test_split.txt", split)
    write_lines(root / "classes.txt", [f"{i} {name}" for i, name in enumerate(CUB_CLASSES, 1)])
    write_lines(root / "bounding_boxes.txt", boxes)
    write_lines(root / "parts" / "parts.txt", ["1 back", "2 left eye"])  # part names contain spaces
    write_lines(root / "parts" / "part_locs.txt", locs)
    return tmp_path  # the folder the archive unpacks into; CUB_200_2011 itself works too


def test_cub(cub_root, tmp_path):
    source = open_source("cub", cub_root)
    assert source.dataset == "CUB-200-2011"
    assert source.class_names == ["Black_footed_Albatross", "Laysan_Albatross", "Sooty_Albatross"]
    assert source.sizes == {"train": 6, "test": 3}
    train = {s.key: s for s in samples_of(source, "train")}
    test = {s.key: s for s in samples_of(source, "test")}
    assert sorted(test) == ["Black_Footed_Albatross_003_793", "Laysan_Albatross_003_796",
                            "Sooty_Albatross_003_799"]
    sample = train["Laysan_Albatross_001_794"]
    assert sample.label == 1 and sample.image.startswith(b"\xff\xd8")  # the file's own bytes
    assert sample.meta["image_id"] == 4 and sample.meta["bbox_xywh"] == [2.0, 3.0, 17.0, 12.5]
    assert sample.meta["parts"][1] == {"part": "left eye", "x": 10.0, "y": 8.5, "visible": 1}

    out = tmp_path / "shards"
    built = build_shards("cub", str(out), cub_root / "CUB_200_2011", maxcount=4, progress=False)
    assert built["train"].manifest.class_names == source.class_names
    assert read_back(out, "train") == {k: s.label for k, s in train.items()}
    assert read_back(out, "test") == {k: s.label for k, s in test.items()}


def test_cub_wrong_layout(cub_root):
    (cub_root / "CUB_200_2011" / "train_test_split.txt").unlink()
    with pytest.raises(DatasetLayoutError, match=r"train_test_split.txt is missing; expected the published CUB"):
        open_source("cub", cub_root)
    with pytest.raises(DatasetLayoutError, match="images.txt is missing"):
        open_source("cub", cub_root / "CUB_200_2011" / "images")


def test_listed_but_missing_image_names_the_file(cub_root, tmp_path):
    missing = next((cub_root / "CUB_200_2011" / "images").rglob("*.jpg"))
    missing.unlink()
    with pytest.raises(DatasetLayoutError, match=f"image .*{missing.name} is listed but missing"):
        build_shards("cub", str(tmp_path / "out"), cub_root, progress=False)


# ---------------------------------------------------------------------------------------------
# Stanford Cars

CAR_CLASSES = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Ram C/V Cargo Van Minivan 2012"]
CAR_ANNOTATIONS = {  # fname, x1, y1, x2, y2, 1-based class
    "train": [("00001.jpg", 1, 2, 20, 18, 3), ("00002.jpg", 0, 1, 22, 19, 1), ("00003.jpg", 2, 2, 21, 17, 2),
              ("00004.jpg", 1, 1, 23, 19, 3)],
    "test": [("00001.jpg", 3, 1, 20, 18, 2), ("00002.jpg", 1, 2, 19, 16, 1)],
}


def cars_struct(rows, with_class: bool = True) -> np.ndarray:
    """A 1xN MATLAB struct array like the devkit's `annotations` (doubles and a char array)."""
    names = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", *(["class"] if with_class else []), "fname"]
    array = np.zeros((1, len(rows)), dtype=[(n, "O") for n in names])
    for i, (fname, *numbers) in enumerate(rows):
        values = [np.array([[float(v)]]) for v in numbers[: 5 if with_class else 4]]
        array[0, i] = (*values, np.array([fname]))
    return array


@pytest.fixture
def cars_devkit_root(tmp_path) -> Path:
    root = tmp_path / "stanford_cars"
    (root / "devkit").mkdir(parents=True)
    savemat(root / "devkit" / "cars_meta.mat", {"class_names": np.array([CAR_CLASSES], dtype=object)})
    savemat(root / "devkit" / "cars_train_annos.mat", {"annotations": cars_struct(CAR_ANNOTATIONS["train"])})
    savemat(root / "devkit" / "cars_test_annos.mat",  # the devkit's own test file has no labels
            {"annotations": cars_struct(CAR_ANNOTATIONS["test"], with_class=False)})
    savemat(root / "cars_test_annos_withlabels.mat", {"annotations": cars_struct(CAR_ANNOTATIONS["test"])})
    for split, rows in CAR_ANNOTATIONS.items():
        for n, (fname, *_, class_id) in enumerate(rows):
            write_jpeg(root / f"cars_{split}" / fname, colour=(60 * class_id, 20 * n, 10))
    return root


@pytest.fixture
def cars_csv_root(tmp_path) -> Path:
    """The common CSV variant: names.csv, anno_{train,test}.csv, images under per-class folders."""
    root = tmp_path / "car_csv"
    write_lines(root / "names.csv", CAR_CLASSES)
    for split, rows in CAR_ANNOTATIONS.items():
        write_lines(root / f"anno_{split}.csv", [",".join(map(str, row)) for row in rows])
        for fname, *_, class_id in rows:
            folder = CAR_CLASSES[class_id - 1].replace("/", "-")
            write_jpeg(root / "car_data" / "car_data" / split / folder / fname)
    return root


@pytest.mark.parametrize("layout", ["devkit", "csv"])
def test_cars(layout, cars_devkit_root, cars_csv_root, tmp_path):
    root = cars_devkit_root if layout == "devkit" else cars_csv_root
    source = open_source("cars", root)
    assert source.dataset == f"Stanford-Cars ({layout})"
    assert source.class_names == CAR_CLASSES  # including the one with a '/'
    assert source.sizes == {"train": 4, "test": 2}
    for split, rows in CAR_ANNOTATIONS.items():
        samples = {s.key: s for s in samples_of(source, split)}
        assert {k: s.label for k, s in samples.items()} == {f[:-4]: c - 1 for f, *_, c in rows}
        assert samples["00001"].meta["bbox_x1y1x2y2"] == list(rows[0][1:5])
    out = tmp_path / f"out-{layout}"
    build_shards("cars", str(out), root, progress=False)
    assert read_back(out, "test") == {"00001": 1, "00002": 0}
    assert read_manifest(str(out / "train")).class_names[2] == "Ram C/V Cargo Van Minivan 2012"


def test_cars_wrong_layout(cars_devkit_root, tmp_path):
    with pytest.raises(DatasetLayoutError, match="neither devkit/cars_meta.mat nor names.csv"):
        open_source("cars", tmp_path)
    (cars_devkit_root / "cars_train" / "00003.jpg").unlink()
    with pytest.raises(DatasetLayoutError, match="train image 00003.jpg is listed but missing"):
        open_source("cars", cars_devkit_root)


# ---------------------------------------------------------------------------------------------
# FGVC-Aircraft

AIRCRAFT = {  # id: (variant, family, manufacturer, split)
    "0034309": ("707-320", "Boeing 707", "Boeing", "trainval"),
    "0056978": ("707-320", "Boeing 707", "Boeing", "test"),
    "1025794": ("A300B4", "A300", "Airbus", "trainval"),
    "1340192": ("F/A-18", "F/A-18", "McDonnell Douglas", "trainval"),
    "0062781": ("F/A-18", "F/A-18", "McDonnell Douglas", "test"),
    "1514522": ("737-200", "Boeing 737", "Boeing", "trainval"),
}


@pytest.fixture
def aircraft_root(tmp_path) -> Path:
    root = tmp_path / "fgvc-aircraft-2013b"
    data = root / "data"
    write_lines(data / "variants.txt", ["707-320", "737-200", "A300B4", "F/A-18"])
    write_lines(data / "families.txt", ["A300", "Boeing 707", "Boeing 737", "F/A-18"])
    write_lines(data / "manufacturers.txt", ["Airbus", "Boeing", "McDonnell Douglas"])
    for level, column in (("variant", 0), ("family", 1), ("manufacturer", 2)):
        for split in ("trainval", "test"):
            write_lines(data / f"images_{level}_{split}.txt",
                        [f"{i} {row[column]}" for i, row in AIRCRAFT.items() if row[3] == split])
    for n, image_id in enumerate(AIRCRAFT):
        write_jpeg(data / "images" / f"{image_id}.jpg", colour=(30 * n, 90, 160), size=(40, 50), banner=20)
    return root


def test_aircraft_variant_level_and_banner_crop(aircraft_root, tmp_path):
    source = open_source("aircraft", aircraft_root)
    assert source.class_names == ["707-320", "737-200", "A300B4", "F/A-18"]
    assert source.sizes == {"train": 4, "test": 2}
    train = {s.key: s for s in samples_of(source, "train")}
    assert {k: s.label for k, s in train.items()} == {"0034309": 0, "1025794": 2, "1340192": 3, "1514522": 1}
    assert train["1340192"].meta == {"image_id": "1340192", "variant": "F/A-18", "family": "F/A-18",
                                     "manufacturer": "McDonnell Douglas"}

    out = tmp_path / "out"
    build_shards("aircraft", str(out), aircraft_root, progress=False)
    for images, _, _ in eval_loader(str(out / "test"), 16, 16, batch_size=4, workers=0):
        assert len(images) == 2
    with tarfile.open(next((out / "train").glob("*.tar"))) as tar:
        jpg = next(tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg"))
    image = Image.open(io.BytesIO(jpg)).convert("RGB")
    assert image.size == (40, 30)  # 20 px banner gone
    assert max(image.getpixel((20, 29))) < 200  # the bottom row is the picture, not the white banner


@pytest.mark.parametrize("level, names, labels", [
    ("family", ["A300", "Boeing 707", "Boeing 737", "F/A-18"], {"0056978": 1, "0062781": 3}),
    ("manufacturer", ["Airbus", "Boeing", "McDonnell Douglas"], {"0056978": 1, "0062781": 2}),
])
def test_aircraft_other_levels(aircraft_root, level, names, labels):
    source = open_source("aircraft", aircraft_root / "data", {"level": level})
    assert source.class_names == names and source.options == {"level": level}
    assert {s.key: s.label for s in samples_of(source, "test")} == labels


def test_aircraft_bad_option_and_layout(aircraft_root):
    with pytest.raises(LCRError, match="level='model': expected one of variant, family, manufacturer"):
        open_source("aircraft", aircraft_root, {"level": "model"})
    (aircraft_root / "data" / "images_variant_test.txt").unlink()
    with pytest.raises(DatasetLayoutError, match="images_variant_test.txt is missing"):
        open_source("aircraft", aircraft_root)


# ---------------------------------------------------------------------------------------------
# iNaturalist 2019

INAT_CATEGORIES = [
    {"id": 0, "name": "Abies concolor", "kingdom": "Plantae", "phylum": "Tracheophyta", "class": "Pinopsida",
     "order": "Pinales", "family": "Pinaceae", "genus": "Abies"},
    {"id": 1, "name": "Abies lasiocarpa", "kingdom": "Plantae", "phylum": "Tracheophyta",
     "class": "Pinopsida", "order": "Pinales", "family": "Pinaceae", "genus": "Abies"},
    {"id": 200, "name": "Aix sponsa", "kingdom": "Animalia", "phylum": "Chordata", "class": "Aves",
     "order": "Anseriformes", "family": "Anatidae", "genus": "Aix"},
    {"id": 201, "name": "Anas acuta", "kingdom": "Animalia", "phylum": "Chordata", "class": "Aves",
     "order": "Anseriformes", "family": "Anatidae", "genus": "Anas"},
]
SUPER = {0: "Plants", 1: "Plants", 200: "Birds", 201: "Birds"}


@pytest.fixture
def inat_root(tmp_path) -> Path:
    root = tmp_path / "inat2019"
    image_id = 0
    for stem, per_class in (("train2019", 2), ("val2019", 1)):
        images, annotations = [], []
        for category in INAT_CATEGORIES:
            for _ in range(per_class):
                md5 = f"{image_id:032x}"
                file_name = f"train_val2019/{SUPER[category['id']]}/{category['id']}/{md5}.jpg"
                write_jpeg(root / file_name, colour=(image_id * 9 % 255, 50, 50))
                images.append({"id": image_id, "file_name": file_name, "width": 24, "height": 20,
                               "license": 1, "rights_holder": "someone"})
                annotations.append({"id": image_id, "image_id": image_id, "category_id": category["id"]})
                image_id += 1
        table = {"info": {"year": 2019}, "licenses": [], "images": images, "annotations": annotations,
                 "categories": INAT_CATEGORIES}
        (root / f"{stem}.json").write_text(json.dumps(table))
    return root


def test_inat2019_all_and_one_supercategory(inat_root, tmp_path):
    source = open_source("inat2019", inat_root)
    assert source.class_names == ["Abies concolor", "Abies lasiocarpa", "Aix sponsa", "Anas acuta"]
    assert source.sizes == {"train": 8, "test": 4}

    birds = open_source("inat2019", inat_root, {"supercategory": "Birds"})
    assert birds.class_names == ["Aix sponsa", "Anas acuta"] and birds.sizes == {"train": 4, "test": 2}
    test = samples_of(birds, "test")
    assert sorted(s.label for s in test) == [0, 1]
    sample = next(s for s in test if s.label == 1)
    assert sample.meta["category_id"] == 201 and sample.meta["supercategory"] == "Birds"
    assert sample.meta["taxonomy"]["class"] == "Aves" and sample.meta["taxonomy"]["genus"] == "Anas"
    assert sample.key == safe_key(Path(sample.meta["file"]).stem)

    out = tmp_path / "out"
    build_shards("inat2019", str(out), inat_root, options={"supercategory": "Birds"}, progress=False)
    assert read_back(out, "test") == {s.key: s.label for s in test}
    assert read_manifest(str(out / "train")).options == {"supercategory": "Birds", "root": str(inat_root.resolve())}


def test_inat2019_bad_supercategory_and_layout(inat_root):
    with pytest.raises(LCRError, match="supercategory='Fish': no such super-category; expected one of Birds, Plants"):
        open_source("inat2019", inat_root, {"supercategory": "Fish"})
    (inat_root / "val2019.json").write_text('{"images": []')
    with pytest.raises(DatasetLayoutError, match="val2019.json is not valid JSON"):
        open_source("inat2019", inat_root)
    (inat_root / "val2019.json").unlink()
    with pytest.raises(DatasetLayoutError, match="val2019.json is missing"):
        open_source("inat2019", inat_root)


# ---------------------------------------------------------------------------------------------
# ImageFolder

def test_imagefolder_with_splits_png_and_keys(tmp_path):
    root = tmp_path / "folder"
    write_jpeg(root / "train" / "finch" / "a.jpg")
    write_jpeg(root / "train" / "finch" / "nested" / "b.v2.jpg")
    Image.new("RGB", (20, 16), (0, 200, 0)).save(root / "train" / "finch" / "c.png")
    write_jpeg(root / "train" / "wren" / "a.jpg")
    write_jpeg(root / "val" / "wren" / "d.JPG")
    (root / "train" / "wren" / "notes.txt").write_text("not an image")

    source = open_source("imagefolder", root)
    assert source.class_names == ["finch", "wren"] and source.sizes == {"train": 4, "test": 1}
    train = {s.key: s.label for s in samples_of(source, "train")}
    assert train == {"finch-a": 0, "finch-nested-b_v2": 0, "finch-c": 0, "wren-a": 1}

    out = tmp_path / "out"
    build_shards("imagefolder", str(out), root, progress=False)
    assert read_back(out, "train") == train  # the PNG was re-encoded as JPEG and reads back
    assert read_back(out, "test") == {"wren-d": 1}


def test_imagefolder_without_split_folders_is_one_train_split(tmp_path):
    write_jpeg(tmp_path / "a" / "1.jpg")
    write_jpeg(tmp_path / "b" / "2.jpg")
    source = open_source("imagefolder", tmp_path)
    assert list(source.splits) == ["train"] and source.class_names == ["a", "b"]


def test_imagefolder_wrong_layout(tmp_path):
    write_jpeg(tmp_path / "loose.jpg")
    with pytest.raises(DatasetLayoutError, match="has no class folders; expected root/<class>/<image>"):
        open_source("imagefolder", tmp_path)
    with pytest.raises(DatasetLayoutError, match="is not a folder"):
        open_source("imagefolder", tmp_path / "nope")


# ---------------------------------------------------------------------------------------------
# Synthetic and the shared checks

def test_synthetic_source_matches_the_generator(tmp_path):
    from lcr_core import synthetic

    spec = synthetic.SyntheticSpec(num_classes=3, train_per_class=2, test_per_class=1, image_size=24)
    source = open_source("synthetic", None, {"num_classes": 3, "train_per_class": 2, "test_per_class": 1,
                                             "image_size": 24})
    assert source.class_names == synthetic.class_names(spec) and source.sizes == {"train": 6, "test": 3}
    expected = {s.key: s.label for s in synthetic.generate(spec, "train")}
    out = tmp_path / "out"
    build_shards(source, str(out), splits=["train"], progress=False)
    assert read_back(out, "train") == expected
    assert not (out / "test").exists()


def test_unknown_source_split_and_missing_root(tmp_path):
    with pytest.raises(LCRError, match="source 'coco': expected one of cub, cars"):
        open_source("coco", tmp_path)
    with pytest.raises(LCRError, match="source 'cub' needs --root"):
        open_source("cub", None)
    with pytest.raises(LCRError, match="split 'val': synthetic has splits train, test"):
        build_shards("synthetic", str(tmp_path), splits=["val"], options={"num_classes": 2}, progress=False)
